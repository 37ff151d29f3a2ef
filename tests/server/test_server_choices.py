"""``n`` choices per request, against a real server: the prompt is decoded once and copied to n sequences
(llama_memory_seq_cp), each choice samples with its own chain and seed (seed + index), and the choices stream
interleaved with their index.

Why choice i must equal a request of its own with seed + i: each sequence has its own KV cache (the default),
the copy of the prompt's cache is bit for bit the cache a solo prefill writes, and llama.cpp's CPU kernels
compute each batch row on its own; so the logits, and with the same seed the samples, are the same.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.server.support import LiveServer, assert_engine_clean, make_settings, metric_value, model_metric, served

pytestmark = pytest.mark.llama

ALIAS = "smol"
PARALLEL = 4
CTX_PER_SEQ = 1024


@pytest.fixture(scope="module")
def server(smollm2: Path) -> Iterator[LiveServer]:
    settings = make_settings(
        models=[{"path": str(smollm2), "alias": ALIAS}], ctx=PARALLEL * CTX_PER_SEQ, parallel=PARALLEL
    )
    with served(settings) as live:
        yield live


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def metric(http: httpx.Client, name: str) -> float:
    return model_metric(http, name, ALIAS)


def prompt_tokens_decoded(http: httpx.Client) -> float:
    """Prompt tokens the engine put through llama_decode so far: batch tokens less the streams' next tokens
    (0 before the model's first step: the histograms have no child yet)."""
    text = http.get("/metrics").text
    batch = metric_value(text, "llamasplit_batch_tokens_sum", model=ALIAS) or 0.0
    streams = metric_value(text, "llamasplit_batch_sequences_sum", model=ALIAS) or 0.0
    return batch - streams


def assert_nothing_leaked(http: httpx.Client) -> None:
    assert_engine_clean(http, ALIAS)


def chat_body(content: str, **params: Any) -> dict[str, Any]:
    return {"model": ALIAS, "messages": [{"role": "user", "content": content}], "max_tokens": 20, **params}


def test_three_choices_decode_the_prompt_once_and_each_equals_its_own_seed_alone(
    server: LiveServer, http: httpx.Client
) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    content = "Invent a name for a small red boat, then say why you chose it."
    decoded_before = prompt_tokens_decoded(http)
    reply = client.chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": content}], max_tokens=20, temperature=0.9, seed=41, n=3
    )
    decoded = prompt_tokens_decoded(http) - decoded_before
    assert reply.usage is not None
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    assert all(texts), texts
    assert len(set(texts)) > 1, f"three seeds gave one answer: {texts}"
    # One prefill for all three: the engine decoded the prompt's uncached tokens once, not three times.
    cached = reply.usage.prompt_tokens_details.cached_tokens if reply.usage.prompt_tokens_details else 0
    assert decoded == reply.usage.prompt_tokens - (cached or 0)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens - reply.usage.completion_tokens
    # Choice i is the answer a request of its own with seed 41 + i gets; usage counts every choice's tokens.
    solo_tokens = 0
    for index, choice in enumerate(reply.choices):
        alone = client.chat.completions.create(
            model=ALIAS,
            messages=[{"role": "user", "content": content}],
            max_tokens=20,
            temperature=0.9,
            seed=41 + index,
        )
        assert alone.choices[0].message.content == choice.message.content, f"choice {index}"
        assert alone.choices[0].finish_reason == choice.finish_reason
        assert alone.usage is not None
        solo_tokens += alone.usage.completion_tokens
    assert reply.usage.completion_tokens == solo_tokens
    assert_nothing_leaked(http)


def test_streamed_choices_arrive_interleaved_by_index_each_with_its_own_finish(http: httpx.Client) -> None:
    body = chat_body(
        "Write one sentence about rain.",
        n=2,
        temperature=0.8,
        seed=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts = {0: "", 1: ""}
    finishes: dict[int, str] = {}
    usage: dict[str, Any] = {}
    order: list[int] = []
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                index = choice["index"]
                texts[index] += choice["delta"].get("content") or ""
                order.append(index)
                if choice.get("finish_reason"):
                    assert index not in finishes, "a choice finished twice"
                    finishes[index] = choice["finish_reason"]
    assert set(finishes) == {0, 1}
    assert texts[0] and texts[1]
    # Both choices advance in the same steps, so their chunks interleave rather than come one after the other.
    first_of_one = order.index(1, 2)  # after the two role chunks
    assert 0 in order[first_of_one:], order
    whole = http.post("/v1/chat/completions", json={**body, "stream": False, "stream_options": None}).json()
    assert [c["message"]["content"] for c in whole["choices"]] == [texts[0], texts[1]]
    assert usage["completion_tokens"] == whole["usage"]["completion_tokens"]
    assert usage["prompt_tokens"] == whole["usage"]["prompt_tokens"]
    assert_nothing_leaked(http)


def test_completions_give_n_choices_with_echo_on_each(http: httpx.Client) -> None:
    body = {
        "model": ALIAS,
        "prompt": "The colour of the sky is",
        "max_tokens": 6,
        "n": 3,
        "echo": True,
        "temperature": 1.0,
        "seed": 9,
    }
    reply = http.post("/v1/completions", json=body)
    assert reply.status_code == 200, reply.text
    choices = reply.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert all(c["text"].startswith("The colour of the sky is") for c in choices)
    assert_nothing_leaked(http)


def test_more_choices_than_sequences_is_a_400_naming_n(http: httpx.Client) -> None:
    reply = http.post("/v1/chat/completions", json=chat_body("Hi", n=PARALLEL + 1))
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "n"
    assert f"{PARALLEL}" in error["message"]
    reply = http.post("/v1/chat/completions", json=chat_body("Hi", n=0))
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "n"


def test_a_client_leaving_mid_stream_frees_all_n_sequences(http: httpx.Client) -> None:
    body = chat_body(
        "Tell a long story about a lighthouse keeper.",
        n=3,
        max_tokens=400,
        stream=True,
        logit_bias={"0": -100, "2": -100},
    )
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen >= 12:
                break
    assert metric(http, "llamasplit_sequences_busy") <= 3
    assert_nothing_leaked(http)


def test_n_requests_and_single_requests_share_the_sequences(http: httpx.Client) -> None:
    """A request for 3 choices and three single ones at once: each gets its answer, nothing waits forever."""
    results: dict[str, Any] = {}

    def run(name: str, body: dict[str, Any]) -> None:
        results[name] = http.post("/v1/chat/completions", json=body).json()

    jobs = [("n3", chat_body("Name three birds.", n=3, temperature=0))] + [
        (f"single{i}", chat_body(f"Say the number {i}.", temperature=0)) for i in range(3)
    ]
    threads = [threading.Thread(target=run, args=job) for job in jobs]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert time.monotonic() - started < 120
    assert len(results["n3"]["choices"]) == 3
    # Greedy choices of one prompt are the same answer three times.
    assert len({c["message"]["content"] for c in results["n3"]["choices"]}) == 1
    for i in range(3):
        assert results[f"single{i}"]["choices"][0]["message"]["content"]
    assert_nothing_leaked(http)
