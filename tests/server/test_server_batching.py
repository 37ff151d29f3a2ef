"""Continuous batching against a real server: many requests decoded together, each with its own parameters
and its own answer; requests joining and leaving at any step; a long prompt that does not stall the streams;
a full cache that ends only the request it must; and the engine's accounting, which must show no sequence
or KV cell left behind.

Why exact equality with the solo answers holds: each sequence has its own KV cache (the default), so its
attention never sees another request's cells, and llama.cpp's CPU kernels compute each batch row on its own;
with a unified cache (one cache shared by all) the attention runs over cells of other sequences (masked), the
sums are taken in another order, and greedy answers may differ in late tokens — which is why the default is
per-sequence caches (docs/SERVER.md).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.server.support import (
    LiveServer,
    assert_engine_clean,
    make_settings,
    metric_value,
    model_metric,
    served,
    wait_for,
)

pytestmark = pytest.mark.llama

ALIAS = "smol"
PARALLEL = 4
CTX_PER_SEQ = 1024
# SmolLM2's end-of-generation tokens (<|endoftext|>, <|im_end|>): banned where a request must run to its limit.
NO_EOS = {"0": -100, "2": -100}


@pytest.fixture(scope="module")
def server(smollm2: Path) -> Iterator[LiveServer]:
    settings = make_settings(
        models=[{"path": str(smollm2), "alias": ALIAS}],
        ctx=PARALLEL * CTX_PER_SEQ,
        parallel=PARALLEL,
        step_tokens=64,  # small prompt chunks, so that a long prompt takes several steps
        max_queue=16,
    )
    with served(settings) as live:
        yield live


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    return model_metric(http, name, ALIAS, **labels)


def chat(http: httpx.Client, content: str, **params: Any) -> dict[str, Any]:
    body = {"model": ALIAS, "messages": [{"role": "user", "content": content}], "max_tokens": 24, **params}
    reply = http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


def answer(reply: dict[str, Any]) -> tuple[str, str, int]:
    choice = reply["choices"][0]
    return choice["message"]["content"], choice["finish_reason"], reply["usage"]["completion_tokens"]


def assert_nothing_leaked(http: httpx.Client) -> None:
    assert_engine_clean(http, ALIAS)


# Eight requests, each with parameters of its own: greedy, seeded sampling, penalties, a logit bias, a stop
# string, logprobs, a token limit, a JSON schema.
MIXED: list[tuple[str, dict[str, Any]]] = [
    ("Name a fruit that is red.", {"temperature": 0}),
    ("Write a line about the sea.", {"temperature": 0.9, "seed": 7, "top_p": 0.9}),
    ("List three animals.", {"temperature": 0, "frequency_penalty": 1.5, "presence_penalty": 0.5}),
    ("Say hello to Ada.", {"temperature": 0, "logit_bias": {"19556": -100}}),  # "Hello" may not start the reply
    ("Count from one to ten.", {"temperature": 0, "stop": ["\n4."]}),
    ("What is the capital of France?", {"temperature": 0, "logprobs": True, "top_logprobs": 3}),
    ("Describe a cat.", {"temperature": 0.7, "seed": 123, "top_k": 5, "min_p": 0.1, "max_tokens": 9}),
    (
        "Give me a person as JSON.",
        {
            "temperature": 0,
            "max_tokens": 60,
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "person",
                    "schema": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                        "required": ["name", "age"],
                    },
                },
            },
        },
    ),
]


def test_eight_requests_with_their_own_parameters_get_their_solo_answers_in_one_batch(http: httpx.Client) -> None:
    alone = [chat(http, content, **params) for content, params in MIXED]
    steps_before = metric(http, "llamasplit_batch_sequences_count")
    with ThreadPoolExecutor(max_workers=len(MIXED)) as pool:
        together = list(pool.map(lambda job: chat(http, job[0], **job[1]), MIXED))

    for (content, _), solo, batched in zip(MIXED, alone, together, strict=True):
        assert answer(batched) == answer(solo), content
    # Logprobs are the model's, per request, unchanged by the batch.
    solo_lp = alone[5]["choices"][0]["logprobs"]["content"]
    batch_lp = together[5]["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in batch_lp] == [e["token"] for e in solo_lp]
    assert all(len(e["top_logprobs"]) == 3 for e in batch_lp)
    assert [e["logprob"] for e in batch_lp] == pytest.approx([e["logprob"] for e in solo_lp], abs=1e-4)
    # The stop string cut the count, the JSON-schema answer parses, the bias kept "Hello" out.
    assert answer(together[4])[1] == "stop" and answer(together[4])[0].endswith("3. 3")
    assert not answer(together[3])[0].startswith("Hello")
    person = json.loads(answer(together[7])[0])
    assert isinstance(person["name"], str) and isinstance(person["age"], int)
    assert answer(together[6])[2] <= 9
    # They really were decoded together: some steps advanced several streams at once.
    text = http.get("/metrics").text
    one_stream_steps = metric_value(text, "llamasplit_batch_sequences_bucket", model=ALIAS, le="1.0")
    all_steps = metric_value(text, "llamasplit_batch_sequences_count", model=ALIAS)
    assert one_stream_steps is not None and all_steps is not None and all_steps > steps_before
    assert one_stream_steps < all_steps
    assert_nothing_leaked(http)


def test_a_disconnect_frees_its_sequence_while_the_others_keep_streaming(
    server: LiveServer, http: httpx.Client
) -> None:
    prompts = ["Tell a long story about a fox.", "Tell a long story about a bear.", "Tell a long story about an owl."]
    params = {"temperature": 0, "max_tokens": 60, "logit_bias": NO_EOS}
    alone = [answer(chat(http, p, **params)) for p in prompts[1:]]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    leaver_tokens = threading.Event()
    results: dict[str, tuple[str, str, int]] = {}

    def leave_early() -> None:
        stream = client.chat.completions.create(
            model=ALIAS,
            messages=[{"role": "user", "content": prompts[0]}],
            stream=True,
            **params,  # type: ignore[arg-type]
        )
        for n, _ in enumerate(stream):
            if n == 5:
                leaver_tokens.set()
                stream.close()  # the client goes away mid-stream
                return

    def stay(prompt: str) -> None:
        results[prompt] = answer(chat(http, prompt, **params))

    threads = [threading.Thread(target=leave_early)] + [threading.Thread(target=stay, args=(p,)) for p in prompts[1:]]
    for thread in threads:
        thread.start()
    assert leaver_tokens.wait(60)
    # Soon after the disconnect (a step or two; seconds on a loaded machine) only the two that stayed hold sequences.
    wait_for(lambda: metric(http, "llamasplit_sequences_busy") <= 2, 5)
    for thread in threads:
        thread.join(120)
    assert [results[p] for p in prompts[1:]] == alone
    assert all(r[2] == 60 for r in alone)
    assert_nothing_leaked(http)


def test_a_long_prompt_arriving_does_not_freeze_the_streams_already_running(
    server: LiveServer, http: httpx.Client
) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    arrivals: dict[str, list[float]] = {"a": [], "b": []}
    long_first_token: list[float] = []
    long_sent = threading.Event()

    def stream_short(key: str) -> None:
        stream = client.chat.completions.create(
            model=ALIAS, messages=[{"role": "user", "content": f"Tell a long story, part {key}."}], stream=True,
            max_tokens=120, temperature=0, logit_bias=NO_EOS,  # type: ignore[arg-type]
        )  # fmt: skip
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals[key].append(time.monotonic())
                if len(arrivals[key]) == 10 and key == "a":
                    long_sent.set()

    def long_prompt() -> None:
        assert long_sent.wait(60)
        started = time.monotonic()
        essay = " ".join(f"Sentence {i} tells of rivers, hills and the weather in spring." for i in range(60))
        stream = client.chat.completions.create(
            model=ALIAS, messages=[{"role": "user", "content": essay + " Summarise."}], stream=True, max_tokens=4,
            temperature=0,  # type: ignore[arg-type]
        )  # fmt: skip
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                long_first_token.append(time.monotonic())
                break
        long_first_token.insert(0, started)

    threads = [threading.Thread(target=stream_short, args=(k,)) for k in arrivals]
    threads.append(threading.Thread(target=long_prompt))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    started, first = long_first_token
    # The prompt (about 900 tokens) is prefilled in 64-token chunks; between chunks the streams advance.
    during = [t for key in arrivals for t in arrivals[key] if started < t < first]
    assert len(during) >= 8, f"{len(during)} tokens streamed during the {first - started:.2f} s prefill"
    assert_nothing_leaked(http)


def test_a_sequence_that_fills_its_own_cache_ends_with_length_and_only_it(http: httpx.Client) -> None:
    # About 930 prompt tokens: without max_tokens the request runs until its 1024-token sequence is full.
    prompt = " ".join(f"Line {i}: the sky was clear and blue." for i in range(80)) + " Continue the list."
    results: dict[str, dict[str, Any]] = {}

    def unbounded() -> None:
        results["full"] = chat(http, prompt, temperature=0, max_tokens=None, logit_bias=NO_EOS)

    def short() -> None:
        results["short"] = chat(http, "Name a colour.", temperature=0, max_tokens=12)

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda f: f(), [unbounded, short]))
    full = results["full"]
    assert answer(full)[1] == "length"
    assert 0 < full["usage"]["completion_tokens"] < 200
    assert full["usage"]["prompt_tokens"] + full["usage"]["completion_tokens"] == CTX_PER_SEQ
    assert answer(results["short"]) == answer(chat(http, "Name a colour.", temperature=0, max_tokens=12))
    assert_nothing_leaked(http)


SYSTEM = (
    "You are the help desk of a small town library. Answer in one short sentence, politely, and never invent "
    "opening hours, fees or titles that you were not told about."
)


def conversation(http: httpx.Client, messages: list[dict[str, str]], **params: Any) -> dict[str, Any]:
    body = {"model": ALIAS, "messages": messages, "max_tokens": 16, "temperature": 0, **params}
    reply = http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


def test_a_new_conversation_copies_the_shared_system_prompt_and_the_old_one_keeps_its_cache(
    http: httpx.Client,
) -> None:
    """A new chat whose system prompt another sequence holds gets a copy of that cache (llama_memory_seq_cp)
    instead of decoding it again, and the conversation it was copied from still continues from its cache."""
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Do you lend maps of the coast?"}]
    reply = conversation(http, first)
    first_prompt = reply["usage"]["prompt_tokens"]
    # Another conversation with the same system prompt: it takes an idle sequence, but not the first one's.
    second = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where can I print a letter?"}]
    copied = conversation(http, second)
    assert copied["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16, copied["usage"]
    assert copied["usage"]["prompt_tokens_details"]["cached_tokens"] < copied["usage"]["prompt_tokens"]
    # The copy is the cache a full prefill writes: the same answer as decoding every prompt token again.
    fresh = conversation(http, second, cache_prompt=False)
    assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert copied["choices"][0]["message"]["content"] == fresh["choices"][0]["message"]["content"]
    # The first conversation goes on where it was: its whole earlier prompt is still cached.
    follow_up = [
        *first,
        {"role": "assistant", "content": reply["choices"][0]["message"]["content"]},
        {"role": "user", "content": "And of the hills?"},
    ]
    resumed = conversation(http, follow_up)
    assert resumed["usage"]["prompt_tokens_details"]["cached_tokens"] >= first_prompt
    assert_nothing_leaked(http)


def test_a_full_queue_is_a_429_and_the_rest_complete(smollm2: Path) -> None:
    settings = make_settings(models=[{"path": str(smollm2), "alias": ALIAS}], ctx=2 * 512, parallel=2, max_queue=1)
    with served(settings) as live, httpx.Client(base_url=live.url, timeout=120) as http:
        body = {"model": ALIAS, "messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": 40,
                "temperature": 0, "logit_bias": NO_EOS}  # fmt: skip
        with ThreadPoolExecutor(max_workers=5) as pool:
            replies = list(pool.map(lambda _: http.post("/v1/chat/completions", json=body), range(5)))
        codes = sorted(r.status_code for r in replies)
        assert codes.count(200) >= 3 and set(codes) <= {200, 429}, codes
        for reply in replies:
            if reply.status_code == 429:
                assert reply.headers["Retry-After"] and reply.json()["error"]["code"] == "queue_full"
            else:
                assert reply.json()["usage"]["completion_tokens"] == 40
        assert_nothing_leaked(http)


def test_in_a_full_shared_cache_the_youngest_request_gives_way(smollm2: Path) -> None:
    """Unified cache of 512 cells for two sequences, two requests that want 400 tokens each: the older one
    completes, the younger ends with "length" when the cells run out, and nothing else is disturbed."""
    settings = make_settings(
        models=[{"path": str(smollm2), "alias": ALIAS}], ctx=512, parallel=2, kv_unified=True, max_queue=4
    )
    with served(settings) as live, httpx.Client(base_url=live.url, timeout=180) as http:
        older: dict[str, Any] = {}

        def run_older() -> None:
            older.update(chat(http, "Write a story.", temperature=0, max_tokens=400, logit_bias=NO_EOS))

        thread = threading.Thread(target=run_older)
        thread.start()
        wait_for(lambda: metric(http, "llamasplit_kv_cells_used") > 20, 30)
        younger = chat(http, "Write a poem.", temperature=0, max_tokens=400, logit_bias=NO_EOS)
        thread.join(180)
        assert answer(older)[1:] == ("length", 400)
        _, reason, n_tokens = answer(younger)
        assert reason == "length" and 0 < n_tokens < 400
        assert_nothing_leaked(http)
