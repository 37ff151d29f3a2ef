"""Requests to one model are safe under concurrency: many clients at once get exactly the answers they get
one at a time, and with two slots (parallel 2) each conversation keeps its own KV cache."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.server.support import make_settings, served

pytestmark = pytest.mark.llama

PROMPTS = [
    "Name a fruit that is red.",
    "What is two plus two?",
    "Say something about the moon.",
]


@pytest.fixture(scope="module")
def two_slot_client(smollm2: Path) -> Iterator[openai.OpenAI]:
    settings = make_settings(models=[{"path": str(smollm2), "alias": "smol"}], ctx=1024, parallel=2, max_queue=16)
    with served(settings) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def ask(client: openai.OpenAI, prompt: str, stream: bool = False) -> tuple[str, int, int]:
    """(answer, cached prompt tokens, prompt tokens)."""
    messages = [{"role": "user", "content": prompt}]
    if stream:
        chunks = list(
            client.chat.completions.create(
                model="smol", messages=messages, max_tokens=8, temperature=0, stream=True,  # type: ignore[arg-type]
                stream_options={"include_usage": True},
            )
        )  # fmt: skip
        usage = chunks[-1].usage
        assert usage is not None
        return "".join(
            c.choices[0].delta.content or "" for c in chunks if c.choices
        ), usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
    reply = client.chat.completions.create(model="smol", messages=messages, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    usage = reply.usage
    return reply.choices[0].message.content or "", usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens  # type: ignore[union-attr]


def test_concurrent_requests_get_the_answers_they_get_alone(two_slot_client: openai.OpenAI) -> None:
    alone = {p: ask(two_slot_client, p)[0] for p in PROMPTS}
    jobs = [(p, i % 2 == 1) for i, p in enumerate(PROMPTS * 4)]  # 12 requests, half of them streamed
    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(lambda job: ask(two_slot_client, *job)[0], jobs))
    assert answers == [alone[p] for p, _ in jobs]


def test_each_slot_keeps_its_conversation_cached(two_slot_client: openai.OpenAI) -> None:
    first, second = "Tell me about tigers.", "Tell me about whales."
    ask(two_slot_client, first)
    ask(two_slot_client, second)  # goes to the other slot: the first conversation stays cached
    text, cached, n_prompt = ask(two_slot_client, first)
    # The whole prompt but its last token (re-decoded for the logits) came from the first slot's cache;
    # with one slot only the shared system prompt would have survived the second conversation.
    assert cached == n_prompt - 1
    assert text == ask(two_slot_client, first)[0]
