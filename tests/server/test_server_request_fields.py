"""llama-server's own request fields against a real server: each is honoured with its meaning or refused by
name (docs/SERVER.md, "llama.cpp's request fields"); none is accepted and ignored."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from tests.server.support import make_settings, served

pytestmark = pytest.mark.llama

ALIAS = "smol"


@pytest.fixture(scope="module")
def http(smollm2: Path) -> Iterator[httpx.Client]:
    settings = make_settings(models=[{"path": str(smollm2), "alias": ALIAS}], ctx=2 * 1024, parallel=2)
    with served(settings) as live, httpx.Client(base_url=live.url, timeout=120) as client:
        yield client


def chat(http: httpx.Client, content: str, **params: Any) -> httpx.Response:
    body = {"model": ALIAS, "messages": [{"role": "user", "content": content}], "max_tokens": 24, **params}
    return http.post("/v1/chat/completions", json=body)


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [("id_slot", 0, "sequence"), ("n_probs", 3, "top_logprobs"), ("timings_per_token", True, "/metrics")],
)
@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
def test_fields_this_server_cannot_mean_are_refused_by_name(
    http: httpx.Client, endpoint: str, field: str, value: Any, hint: str
) -> None:
    if endpoint == "/v1/completions":
        body: dict[str, Any] = {"model": ALIAS, "prompt": "Hello", "max_tokens": 4, field: value}
    else:
        body = {"model": ALIAS, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, field: value}
    reply = http.post(endpoint, json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == field
    assert field in error["message"] and hint in error["message"]


def test_a_gbnf_grammar_constrains_the_answer(http: httpx.Client) -> None:
    reply = chat(http, "Is the sky blue? Answer yes or no.", grammar='root ::= "yes" | "no"', temperature=0)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] in {"yes", "no"}
    words = http.post(
        "/v1/completions",
        json={"model": ALIAS, "prompt": "Three colours:", "max_tokens": 12, "grammar": "root ::= [a-z ]+"},
    )
    assert words.status_code == 200, words.text
    text = words.json()["choices"][0]["text"]
    assert text and all(c.islower() or c == " " for c in text), text


def test_a_grammar_llama_cpp_cannot_parse_is_a_400_naming_grammar(http: httpx.Client) -> None:
    reply = chat(http, "Hi", grammar="root ::= (unclosed")
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "grammar"


def test_a_top_level_json_schema_constrains_like_response_format(http: httpx.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "people": {"type": "integer"}},
        "required": ["city", "people"],
    }
    reply = chat(http, "Describe a city as JSON.", json_schema=schema, temperature=0, max_tokens=60)
    assert reply.status_code == 200, reply.text
    jsonschema.validate(json.loads(reply.json()["choices"][0]["message"]["content"]), schema)


def test_two_output_constraints_at_once_are_a_400(http: httpx.Client) -> None:
    reply = chat(http, "Hi", grammar='root ::= "a"', json_schema={"type": "object"})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "json_schema"
    reply = chat(http, "Hi", response_format={"type": "json_object"}, grammar='root ::= "a"')
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "grammar"


def test_cache_prompt_false_decodes_the_whole_prompt_again(http: httpx.Client) -> None:
    content = "Tell me one fact about owls, in a single sentence please."
    first = chat(http, content, temperature=0).json()
    again = chat(http, content, temperature=0).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, "a repeated prompt reuses its cache"
    fresh = chat(http, content, temperature=0, cache_prompt=False).json()
    assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # The same answer either way: the cache changes the cost, not the result.
    assert first["choices"][0]["message"]["content"] == fresh["choices"][0]["message"]["content"]
