"""End to end through the official openai client: real uvicorn on loopback, real SmolLM2 in llama.cpp.

Generation lengths stay small (SmolLM2 makes 20-50 tokens/s on two cores). Expected texts are never
hard-coded: each test derives what to expect from another real generation or from the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.server.support import ALIAS, CTX

pytestmark = pytest.mark.llama

CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name three colours."},
]
CITY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Madrid"]},
        "is_capital": {"type": "boolean"},
        "rank": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["city", "is_capital", "rank"],
    "additionalProperties": False,
}


def counts(usage: Any) -> tuple[int, int, int]:
    """The token counts of a usage object (cached_tokens depends on what ran before, so it is left out)."""
    return (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)


@pytest.fixture(scope="module")
def vocab(smollm2: Path) -> Any:
    """llama-cpp-python's own tokenizer for the same file: an independent count of prompt tokens."""
    from llama_cpp import Llama

    return Llama(str(smollm2), vocab_only=True, verbose=False)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [ALIAS]
    card = client.models.retrieve(ALIAS)
    assert card.id == ALIAS
    assert card.model_extra is not None and card.model_extra["status"] == "ready"
    assert card.model_extra["n_ctx"] == CTX
    assert card.model_extra["chat_template"] == "gguf"  # SmolLM2 ships its template
    assert card.model_extra["embedding"] is False


def test_chat_completion_reports_text_finish_reason_and_usage(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=ALIAS, messages=CHAT, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    assert reply.object == "chat.completion" and reply.model == ALIAS
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None
    assert reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 12
    # What produced it: the same for the same model and load settings, on every response and chunk.
    assert reply.system_fingerprint and reply.system_fingerprint.startswith("fp_llamasplit-")
    chunks = list(client.chat.completions.create(model=ALIAS, messages=CHAT, max_tokens=2, stream=True))  # type: ignore[arg-type]
    assert {c.system_fingerprint for c in chunks} == {reply.system_fingerprint}


def test_chat_prompt_tokens_match_llama_cpp_pythons_own_count(client: openai.OpenAI, smollm2: Path) -> None:
    from llama_cpp import Llama

    # llama-cpp-python renders the same GGUF chat template with its own Jinja formatter.
    llm = Llama(str(smollm2), n_ctx=512, verbose=False)
    theirs = llm.create_chat_completion(messages=CHAT, max_tokens=1, temperature=0)  # type: ignore[arg-type]
    ours = client.chat.completions.create(model=ALIAS, messages=CHAT, max_tokens=1, temperature=0)  # type: ignore[arg-type]
    assert ours.usage is not None
    assert ours.usage.prompt_tokens == theirs["usage"]["prompt_tokens"]  # type: ignore[index]


def test_streaming_chat_matches_the_non_streaming_answer(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=ALIAS, messages=CHAT, max_tokens=16, temperature=0)  # type: ignore[arg-type]
    stream = client.chat.completions.create(
        model=ALIAS,
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content
    assert finish == [whole.choices[0].finish_reason]
    # include_usage: a last chunk with no choices carries the same usage as the whole answer.
    assert chunks[-1].choices == [] and counts(chunks[-1].usage) == counts(whole.usage)
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(model=ALIAS, messages=CHAT, max_tokens=4, temperature=0, stream=True)  # type: ignore[arg-type]
    )
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_sse_ends_with_done(http: Any) -> None:
    body = {"model": ALIAS, "messages": CHAT, "max_tokens": 3, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    for line in lines[:-1]:
        assert json.loads(line.removeprefix("data: "))["object"] == "chat.completion.chunk"


def test_stop_sequence_cuts_the_answer_before_it(client: openai.OpenAI) -> None:
    free = client.chat.completions.create(model=ALIAS, messages=CHAT, max_tokens=20, temperature=0)  # type: ignore[arg-type]
    text = free.choices[0].message.content or ""
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]  # a word from the middle of the greedy answer
    cut = client.chat.completions.create(model=ALIAS, messages=CHAT, max_tokens=20, temperature=0, stop=[stop])  # type: ignore[arg-type]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]
    streamed = client.chat.completions.create(
        model=ALIAS,
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=20,
        temperature=0,
        stop=stop,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[: text.index(stop)]


def test_json_schema_output_parses_and_validates(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=ALIAS,
        messages=[{"role": "user", "content": "Which is the capital of Italy? Answer in JSON."}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}},
    )
    assert reply.choices[0].finish_reason == "stop"
    value = json.loads(reply.choices[0].message.content or "")
    jsonschema.validate(value, CITY_SCHEMA)


def test_json_schema_output_streams_valid_json_at_temperature_one(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=ALIAS,
        messages=[{"role": "user", "content": "Describe a city as JSON."}],
        max_tokens=60,
        temperature=1.0,
        seed=7,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}},
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    jsonschema.validate(json.loads(text), CITY_SCHEMA)


def test_json_object_mode_returns_a_json_object(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=ALIAS,
        messages=[{"role": "user", "content": "Give me a JSON object with your name."}],
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_object"},
    )
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
    else:  # cut by max_tokens: still a JSON object so far
        assert (reply.choices[0].message.content or "").lstrip().startswith("{")


def test_same_seed_same_sample_and_greedy_is_deterministic(client: openai.OpenAI) -> None:
    def sample(seed: int, temperature: float) -> str:
        reply = client.chat.completions.create(
            model=ALIAS,
            messages=CHAT,  # type: ignore[arg-type]
            max_tokens=10,
            temperature=temperature,
            seed=seed,
            top_p=1.0,
        )
        return reply.choices[0].message.content or ""

    assert sample(11, 1.5) == sample(11, 1.5)
    assert sample(1, 0) == sample(2, 0)
    assert len({sample(seed, 2.0) for seed in (1, 2, 3)}) > 1  # different seeds, different samples


def test_logit_bias_bans_and_forces_tokens(client: openai.OpenAI, vocab: Any) -> None:
    greedy = client.chat.completions.create(model=ALIAS, messages=CHAT, max_tokens=1, temperature=0, logprobs=True)  # type: ignore[arg-type]
    first = greedy.choices[0].logprobs.content[0].token  # type: ignore[union-attr,index]
    first_id = vocab.tokenize(first.encode(), add_bos=False, special=True)[0]
    banned = client.chat.completions.create(
        model=ALIAS,
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=1,
        temperature=0,
        logprobs=True,
        logit_bias={str(first_id): -100},
    )
    assert banned.choices[0].logprobs.content[0].token != first  # type: ignore[union-attr,index]
    forced_id = vocab.tokenize(b" banana", add_bos=False)[0]
    forced = client.chat.completions.create(
        model=ALIAS,
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=1,
        temperature=0,
        logit_bias={str(forced_id): 100},
    )
    assert forced.choices[0].message.content == vocab.detokenize([forced_id]).decode()


def test_chat_logprobs_have_the_requested_alternatives(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=ALIAS,
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    entries = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert entries is not None and reply.usage is not None
    assert len(entries) == reply.usage.completion_tokens
    assert "".join(e.token for e in entries) == reply.choices[0].message.content
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0.0
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs))
        assert bytes(entry.bytes or []) == entry.token.encode()


def test_all_roles_render_through_the_models_template(client: openai.OpenAI) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "You answer with one word."},
        {"role": "user", "content": [{"type": "text", "text": "What is the weather in Paris?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "So?"},
    ]
    reply = client.chat.completions.create(model=ALIAS, messages=messages, max_tokens=4, temperature=0)
    assert reply.usage is not None and reply.usage.prompt_tokens > 30


def test_multi_turn_with_the_clients_own_reply_object(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "Pick a number between one and ten."}]
    first = client.chat.completions.create(model=ALIAS, messages=messages, max_tokens=6, temperature=0)
    messages.append(first.choices[0].message)  # the client serialises its own ChatCompletionMessage
    messages.append({"role": "user", "content": "Now double it."})
    second = client.chat.completions.create(model=ALIAS, messages=messages, max_tokens=6, temperature=0)
    assert first.usage is not None and second.usage is not None
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens
    # The second turn continues the first one's slot: its whole prompt up to the new message was cached.
    assert second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_completion_counts_prompt_tokens_like_the_tokenizer(client: openai.OpenAI, vocab: Any) -> None:
    prompt = "The three primary colours are"
    reply = client.completions.create(model=ALIAS, prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
    assert reply.object == "text_completion"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(vocab.tokenize(prompt.encode(), add_bos=True, special=True))
    assert reply.usage.completion_tokens == len(reply.choices[0].logprobs.tokens)  # type: ignore[union-attr,arg-type]
    if reply.choices[0].finish_reason == "length":
        assert reply.usage.completion_tokens == 6
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.text_offset is not None and logprobs.tokens is not None
    assert logprobs.text_offset[0] == 0
    assert "".join(logprobs.tokens) == reply.choices[0].text


def test_repeated_prompt_reuses_the_kv_cache(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "Spell the word 'cache' backwards."}]
    first = client.chat.completions.create(model=ALIAS, messages=messages, max_tokens=3, temperature=0)
    again = client.chat.completions.create(model=ALIAS, messages=messages, max_tokens=3, temperature=0)
    assert first.usage is not None and again.usage is not None
    assert again.usage.prompt_tokens_details is not None
    # Every prompt token but the last (re-decoded for its logits) comes from the cache.
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert again.choices[0].message.content == first.choices[0].message.content


def test_completion_from_token_ids_and_echo(client: openai.OpenAI, vocab: Any) -> None:
    prompt = "Once upon a time"
    ids = vocab.tokenize(prompt.encode(), add_bos=False)
    by_text = client.completions.create(model=ALIAS, prompt=prompt, max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=ALIAS, prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == len(ids)
    echoed = client.completions.create(model=ALIAS, prompt=prompt, max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + by_text.choices[0].text


def test_streaming_completion_with_usage(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=ALIAS, prompt="One, two, three,", max_tokens=8, temperature=0)
    chunks = list(
        client.completions.create(
            model=ALIAS,
            prompt="One, two, three,",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert counts(chunks[-1].usage) == counts(whole.usage)


def test_max_completion_tokens_limits_the_answer(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=ALIAS,
        messages=[{"role": "user", "content": "Count from one to one hundred in words."}],
        max_completion_tokens=5,
        temperature=0,
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 5


def test_penalties_change_a_repetitive_answer(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "Repeat the word 'apple' twenty times."}]
    plain = client.chat.completions.create(model=ALIAS, messages=messages, max_tokens=24, temperature=0)
    penalised = client.chat.completions.create(
        model=ALIAS, messages=messages, max_tokens=24, temperature=0, frequency_penalty=2.0, presence_penalty=2.0
    )
    assert plain.choices[0].message.content != penalised.choices[0].message.content
