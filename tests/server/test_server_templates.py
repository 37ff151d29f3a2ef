"""Chat templates: the GGUF's own, a configured one (inline or a file), the ChatML fallback for a model
without one (Gemma-3-270M is a base model), and a template that refuses a conversation (a 400).

The templates live on the tokenizer side, in the HTTP process; generation runs in a real engine process."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.engine import EngineError, EngineRequestError, FinishEvent, GenerationRequest, SamplingParams, TokenEvent
from server.engine.chat_template import CHATML_STOP, ChatTemplate
from server.engine.client import WorkerEngine, WorkerProcess
from server.engine.vocab import Tokenizer
from tuner import LoadSettings

pytestmark = pytest.mark.llama

STRICT = (
    "{% for m in messages %}"
    "{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('roles must alternate') }}{% endif %}"
    "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
)


def run(engine: WorkerEngine, request: GenerationRequest) -> tuple[str, FinishEvent]:
    async def collect() -> tuple[str, FinishEvent]:
        text, finish = [], None
        async for event in engine.generate(request):
            text.append(event.text)
            if isinstance(event, FinishEvent):
                finish = event
        assert finish is not None
        return "".join(text), finish

    return asyncio.run(collect())


@pytest.fixture(scope="module")
def worker() -> Iterator[WorkerProcess]:
    process = WorkerProcess("templates", log_level="WARNING")
    yield process
    process.close()


@pytest.fixture(scope="module")
def smol_engine(smollm2: Path, worker: WorkerProcess) -> Iterator[WorkerEngine]:
    engine, _ = WorkerEngine.load(worker, "smol-strict", smollm2, LoadSettings(n_ctx=512), chat_template=STRICT)
    yield engine
    engine.close()


def test_configured_template_renders_the_prompt(smollm2: Path) -> None:
    tokenizer = Tokenizer(smollm2, chat_template=STRICT)
    try:
        assert tokenizer.template.source == "config"
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        assert tokenizer.decode_tokens(tokenizer.encode_chat(messages)) == "[system] Be brief.\n[user] Hi\n[assistant] "
    finally:
        tokenizer.close()


def test_template_that_refuses_the_messages_is_a_400_with_its_words(smol_engine: WorkerEngine) -> None:
    with pytest.raises(EngineRequestError) as info:
        smol_engine.encode_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert info.value.param == "messages"
    assert "roles must alternate" in info.value.message


def test_configured_template_may_be_a_file_and_must_compile(tmp_path: Path) -> None:
    path = tmp_path / "chat.jinja"
    path.write_text(STRICT)
    assert ChatTemplate.choose(str(path), None, bos_token="", eos_token="").source == "config"
    with pytest.raises(EngineError, match="does not compile"):
        ChatTemplate.choose("{% for %}", None, bos_token="", eos_token="")
    with pytest.raises(EngineError, match="neither a Jinja template nor a readable file"):
        ChatTemplate.choose(str(tmp_path / "missing.jinja"), None, bos_token="", eos_token="")


def test_model_without_a_template_falls_back_to_chatml_and_stops_at_its_end_marker(
    gemma3: Path, worker: WorkerProcess
) -> None:
    engine, _ = WorkerEngine.load(worker, "gemma", gemma3, LoadSettings(n_ctx=512))
    try:
        assert engine.chat_template_source() == "fallback"
        assert engine.stop_strings() == (CHATML_STOP,)
        tokens = engine.encode_chat([{"role": "user", "content": "Say hello."}])
        prompt = engine.decode_tokens(tokens)
        assert prompt.endswith("<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n")
        text, finish = run(
            engine,
            GenerationRequest(tuple(tokens), 24, SamplingParams(temperature=0), stop=engine.stop_strings()),
        )
        assert CHATML_STOP not in text
        assert finish.completion_tokens >= 1
    finally:
        engine.close()


def test_gguf_template_of_smollm2_is_used_by_default(smollm2: Path, worker: WorkerProcess) -> None:
    engine, _ = WorkerEngine.load(worker, "smol-gguf", smollm2, LoadSettings(n_ctx=256))
    try:
        assert engine.chat_template_source() == "gguf"
        assert engine.stop_strings() == ()
        prompt = engine.decode_tokens(engine.encode_chat([{"role": "user", "content": "Hi"}]))
        assert "user\nHi" in prompt and prompt.endswith("assistant\n")
    finally:
        engine.close()
    # A closed engine refuses work instead of touching freed memory.
    with pytest.raises(EngineError, match="unloaded"):
        run(engine, GenerationRequest((1, 2, 3), 1))


def test_token_events_carry_each_sampled_token(smol_engine: WorkerEngine) -> None:
    tokens = smol_engine.encode_text("One, two, three,")

    async def collect() -> list[TokenEvent]:
        return [e async for e in smol_engine.generate(GenerationRequest(tuple(tokens), 5)) if isinstance(e, TokenEvent)]

    events = asyncio.run(collect())
    assert len(events) <= 5
    assert all(0 <= e.token_id < smol_engine.n_vocab for e in events)
    assert [e.time_s for e in events] == sorted(e.time_s for e in events)
