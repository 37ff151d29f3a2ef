"""OpenAI requests in, engine requests out; engine events in, OpenAI responses and SSE chunks out.

Knows the OpenAI protocol and the Engine protocol, neither FastAPI nor llama.cpp. Every check that needs
the model (prompt length against the context, logit_bias ids, the schema's grammar) happens in ``prepare_*``
so that it is a 400 before any slot is taken or any byte of a stream is sent.
"""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.admission import Admission
from server.engine import (
    Engine,
    FinishEvent,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    OutputConstraint,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
)
from server.errors import ContextLengthError, InvalidRequestError, ModelNotReadyError, sse_error
from server.metrics import Metrics
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    DeveloperMessage,
    JSONObjectFormat,
    JSONSchemaFormat,
    PromptTokensDetails,
    TokenLogprobEntry,
    ToolCallDelta,
    ToolMessage,
    TopLogprob,
    Usage,
    message_text,
    new_id,
    now_s,
)
from server.protocol import FinishReason as ChatFinishReason
from server.registry import ServedModel
from server.tools import ToolPlan, call_for_template, plan_tools, reply
from server.tools import finish_reason as tool_finish_reason

DONE = "data: [DONE]\n\n"


@dataclass
class Prepared:
    """A validated request, ready for the engine."""

    model: ServedModel
    engine: Engine  # taken once: the model's engine may be replaced (reloaded) while the request runs
    generation: GenerationRequest
    received_s: float  # time.perf_counter() when the request arrived (time-to-first-token starts here)
    include_usage: bool = False
    top_logprobs: int = 0
    echo_text: str = ""
    tools: ToolPlan | None = None  # the request's tools: its replies are parsed for tool calls
    id: str = field(default_factory=lambda: new_id("chatcmpl"))
    created: int = field(default_factory=now_s)

    @functools.cached_property
    def fingerprint(self) -> str:
        """OpenAI's system_fingerprint: what produced the answer (server, llama.cpp, the model's placement)."""
        return system_fingerprint(self.model)


# --- request -> GenerationRequest ------------------------------------------------------------------------


def template_messages(request: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The messages as chat templates expect them: plain dicts, text content, developer -> system."""
    out: list[dict[str, Any]] = []
    for message in request.messages:
        role = "system" if isinstance(message, DeveloperMessage) else message.role
        item: dict[str, Any] = {"role": role, "content": message_text(message.content) or ""}
        name = getattr(message, "name", None)
        if name:
            item["name"] = name
        if isinstance(message, AssistantMessage) and message.tool_calls:
            item["tool_calls"] = [call_for_template(call.model_dump()) for call in message.tool_calls]
        if isinstance(message, ToolMessage):
            item["tool_call_id"] = message.tool_call_id
        out.append(item)
    return out


def prepare_chat(request: ChatCompletionRequest, model: ServedModel, received_s: float) -> Prepared:
    engine = engine_of(model)
    messages = template_messages(request)
    tools = plan_tools(request, engine.chat_template_facts(), model.alias) if request.tools else None
    if tools is not None:
        messages = tools.messages(messages)
    prompt = engine.encode_chat(messages, tools.tools if tools is not None else None)
    limit_param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    max_tokens = request.completion_limit()
    check_context(len(prompt), max_tokens, model.n_ctx_per_seq, prompt_param="messages", limit_param=limit_param)
    stop = request.stop_list() + tuple(s for s in engine.stop_strings() if s not in request.stop_list())
    generation = GenerationRequest(
        prompt_tokens=tuple(prompt),
        max_tokens=max_tokens,
        sampling=sampling_params(request, model),
        stop=stop,
        constraint=tools.constraint if tools is not None and tools.constraint else output_constraint(request),
        logprobs=(request.top_logprobs or 0) if request.logprobs else None,
        n=request.n or 1,
        grammar=request.grammar,
        cache_prompt=request.cache_prompt is not False,
    )
    return Prepared(
        model=model,
        engine=engine,
        generation=engine.prepare(generation),
        received_s=received_s,
        include_usage=request.include_usage(),
        top_logprobs=request.top_logprobs or 0,
        tools=tools,
        id=new_id("chatcmpl"),
    )


def prepare_completion(request: CompletionRequest, model: ServedModel, received_s: float) -> Prepared:
    engine = engine_of(model)
    prompt_value = request.prompt_value()
    if isinstance(prompt_value, str):
        prompt = engine.encode_text(prompt_value)
        echo_text = prompt_value
    else:
        prompt = list(prompt_value)
        echo_text = engine.decode_tokens(prompt) if request.echo else ""
    if not prompt:
        raise InvalidRequestError("the prompt is empty; send at least one token of text", param="prompt")
    check_context(len(prompt), request.max_tokens, model.n_ctx_per_seq, prompt_param="prompt", limit_param="max_tokens")
    generation = GenerationRequest(
        prompt_tokens=tuple(prompt),
        max_tokens=request.max_tokens,
        sampling=sampling_params(request, model),
        stop=request.stop_list(),
        constraint=output_constraint(request),
        logprobs=request.logprobs,
        n=request.n or 1,
        grammar=request.grammar,
        cache_prompt=request.cache_prompt is not False,
    )
    return Prepared(
        model=model,
        engine=engine,
        generation=engine.prepare(generation),
        received_s=received_s,
        include_usage=request.include_usage(),
        top_logprobs=request.logprobs or 0,
        echo_text=echo_text if request.echo else "",
        id=new_id("cmpl"),
    )


def system_fingerprint(model: ServedModel) -> str:
    """Changes when anything that can change an answer at a fixed seed changes: the server or llama.cpp
    version, the model file, or how it is loaded (split, cache types, context per sequence)."""
    return _fingerprint(model.path.name, model.load_settings.model_dump_json())


@functools.lru_cache(maxsize=64)
def _fingerprint(model_file: str, load_settings_json: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    from server import __version__

    try:
        llama_version = version("llama-cpp-python")  # reads package metadata from disk: once, not per request
    except PackageNotFoundError:
        llama_version = "unknown"
    key = f"{llama_version}|{model_file}|{load_settings_json}"
    return f"fp_llamasplit-{__version__}_{hashlib.sha256(key.encode()).hexdigest()[:10]}"


_SPLICE = "\u0000llamasplit-token\u0000"  # a text no token decodes to: where a chunk's text goes


def envelope(prepared: Prepared) -> dict[str, Any]:
    """The fields every response and chunk of one request shares."""
    return {
        "id": prepared.id,
        "created": prepared.created,
        "model": prepared.model.alias,
        "system_fingerprint": prepared.fingerprint,
    }


def engine_of(model: ServedModel) -> Engine:
    engine = model.engine
    if engine is None:  # it died or was unloaded after the registry handed the model out
        raise ModelNotReadyError(f"the model {model.alias!r} is not loaded: {model.error or 'unloaded'}")
    return engine


def check_context(n_prompt: int, max_tokens: int | None, n_ctx: int, *, prompt_param: str, limit_param: str) -> None:
    """400 when the prompt leaves no room to generate, or prompt + max_tokens exceeds the context."""
    if n_prompt >= n_ctx:
        raise ContextLengthError(
            f"the prompt is {n_prompt:,} tokens but the model's context holds {n_ctx:,} tokens per sequence "
            f"(and at least one must be left to generate); shorten the prompt or start the model with a larger "
            f"--ctx",
            param=prompt_param,
        )
    if max_tokens is not None and n_prompt + max_tokens > n_ctx:
        raise ContextLengthError(
            f"the prompt is {n_prompt:,} tokens and {limit_param} asks for {max_tokens:,} more, "
            f"{n_prompt + max_tokens:,} in all, but the model's context holds {n_ctx:,} tokens per sequence; "
            f"set {limit_param} to at most {n_ctx - n_prompt:,} or shorten the prompt",
            param=limit_param,
        )


def sampling_params(request: ChatCompletionRequest | CompletionRequest, model: ServedModel) -> SamplingParams:
    defaults = model.sampling

    def given(value: float | int | None, default: float | int) -> Any:
        return default if value is None else value

    return SamplingParams(
        temperature=given(request.temperature, defaults.temperature),
        top_p=given(request.top_p, defaults.top_p),
        top_k=given(request.top_k, defaults.top_k),
        min_p=given(request.min_p, defaults.min_p),
        # No seed: a fresh one per request, so that equal prompts do not get equal samples.
        seed=request.seed if request.seed is not None else secrets.randbits(32),
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logit_bias={int(k): v for k, v in (request.logit_bias or {}).items()},
    )


def output_constraint(request: ChatCompletionRequest | CompletionRequest) -> OutputConstraint | None:
    if request.json_schema is not None:  # llama-server's top-level field: the same as a json_schema format
        return OutputConstraint(schema=request.json_schema)
    fmt = request.response_format
    if isinstance(fmt, JSONObjectFormat):
        return OutputConstraint(schema=None)
    if isinstance(fmt, JSONSchemaFormat):
        return OutputConstraint(schema=fmt.json_schema.schema_)
    return None


# --- running ---------------------------------------------------------------------------------------------


async def events(prepared: Prepared, admission: Admission, metrics: Metrics) -> AsyncGenerator[GenerationEvent, None]:
    """Wait for a slot, run the engine, record metrics; closing this iterator cancels the generation."""
    model = prepared.model
    engine = prepared.engine
    label = model.alias
    # The labelled children once per request, not once per token.
    ttft, itl = metrics.ttft.labels(label), metrics.itl.labels(label)
    generated, prompt_tokens = metrics.generated_tokens.labels(label), metrics.prompt_tokens.labels(label)
    async with admission:
        stream = engine.generate(prepared.generation)
        last_s: dict[int, float] = {}  # per choice: inter-token latency is within one choice's stream
        prompt_counted = False  # the prompt is decoded once, whatever n is
        choices_left = prepared.generation.n
        try:
            async for event in stream:
                if not prompt_counted:
                    prompt_counted = True
                    prompt_tokens.inc(len(prepared.generation.prompt_tokens))
                if isinstance(event, TokenEvent):
                    previous = last_s.get(event.index)
                    if not last_s:
                        ttft.observe(max(event.time_s - prepared.received_s, 0.0))
                    elif previous is not None:
                        itl.observe(max(event.time_s - previous, 0.0))
                    last_s[event.index] = event.time_s
                    generated.inc()
                else:
                    choices_left -= 1
                yield event
        finally:
            if choices_left > 0:
                metrics.cancelled.labels(label).inc()
            await stream.aclose()
            model.touch()


def usage(finishes: Sequence[FinishEvent]) -> Usage:
    """One request's usage: its prompt once (decoded once for all n choices), every choice's completion."""
    first = finishes[0]
    completion_tokens = sum(f.completion_tokens for f in finishes)
    return Usage(
        prompt_tokens=first.prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=first.prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=first.cached_tokens),
    )


@dataclass
class _Choice:
    """What one choice of a non-streamed response has gathered."""

    text: list[str] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish: FinishEvent | None = None


async def gather_choices(
    n: int, stream: AsyncIterator[GenerationEvent], on_logprob: Callable[[TokenLogprob], Any]
) -> tuple[list[_Choice], list[FinishEvent]]:
    """Collect a non-streamed response's choices by index; ``on_logprob`` converts each token's logprob."""
    choices = [_Choice() for _ in range(n)]
    async for event in stream:
        choice = choices[event.index]
        choice.text.append(event.text)
        if isinstance(event, TokenEvent):
            if event.logprob is not None:
                choice.logprobs.append(on_logprob(event.logprob))
        else:
            choice.finish = event
    finishes = [c.finish for c in choices if c.finish is not None]
    assert len(finishes) == n, "the engine ended a request before every choice finished"
    return choices, finishes


def chat_logprob(lp: TokenLogprob, top_n: int) -> TokenLogprobEntry:
    return TokenLogprobEntry(
        token=lp.token,
        logprob=lp.logprob,
        bytes=list(lp.token_bytes),
        top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token_bytes)) for t in lp.top[:top_n]],
    )


async def chat_completion(prepared: Prepared, stream: AsyncIterator[GenerationEvent]) -> ChatCompletion:
    choices, finishes = await gather_choices(
        prepared.generation.n, stream, lambda lp: chat_logprob(lp, prepared.top_logprobs)
    )
    return ChatCompletion(
        **envelope(prepared),
        choices=[
            ChatChoice(
                index=index,
                logprobs=ChoiceLogprobs(content=choice.logprobs) if prepared.generation.logprobs is not None else None,
                **reply(prepared.tools, "".join(choice.text), finishes[index].finish_reason),
            )
            for index, choice in enumerate(choices)
        ],
        usage=usage(finishes),
    )


async def chat_sse(prepared: Prepared, stream: AsyncIterator[GenerationEvent]) -> AsyncGenerator[str, None]:
    """SSE events of a streamed chat completion, ending in ``data: [DONE]`` (or an error event)."""

    def chunk(
        delta: ChatDelta,
        finish: ChatFinishReason | None = None,
        logprobs: list[TokenLogprobEntry] | None = None,
        index: int = 0,
    ) -> str:
        choice = ChatChunkChoice(
            index=index,
            delta=delta,
            finish_reason=finish,
            logprobs=ChoiceLogprobs(content=logprobs) if logprobs is not None else None,
        )
        body = ChatCompletionChunk(**envelope(prepared), choices=[choice])
        return f"data: {body.model_dump_json(exclude_none=True)}\n\n"

    # The chunk of a plain token is the same JSON for every token but its text: serialise it once and splice
    # each token's text in (the per-token path runs once per token of every stream, on the event loop).
    # One template per choice index (n > 1 interleaves the choices' chunks).
    splices = [
        chunk(ChatDelta(content=_SPLICE), index=i).split(json.dumps(_SPLICE)) for i in range(prepared.generation.n)
    ]
    finishes: list[FinishEvent] = []
    # Replies parsed for tool calls (server/tools.py): one parser per choice.
    calls = [prepared.tools.stream() for _ in range(prepared.generation.n)] if prepared.tools is not None else None

    def parsed(event: GenerationEvent, new: tuple[str, list[ToolCallDelta]]) -> Iterator[str]:
        content, deltas = new
        logprob = event.logprob if isinstance(event, TokenEvent) else None
        lps = [chat_logprob(logprob, prepared.top_logprobs)] if logprob is not None else None
        if content or lps:
            yield chunk(ChatDelta(content=content), logprobs=lps, index=event.index)
        if deltas:
            yield chunk(ChatDelta(tool_calls=deltas), index=event.index)

    try:
        for index in range(prepared.generation.n):
            yield chunk(ChatDelta(role="assistant", content=""), index=index)
        async for event in stream:
            if isinstance(event, TokenEvent):
                if calls is not None:
                    for line in parsed(event, calls[event.index].feed(event.text)):
                        yield line
                elif event.logprob is not None:
                    lps = [chat_logprob(event.logprob, prepared.top_logprobs)]
                    yield chunk(ChatDelta(content=event.text), logprobs=lps, index=event.index)
                elif event.text:
                    head, tail = splices[event.index]
                    yield head + json.dumps(event.text, ensure_ascii=False) + tail
                continue
            reason: ChatFinishReason = event.finish_reason
            if calls is not None:
                for line in parsed(event, calls[event.index].finish(event.text)):
                    yield line
                reason = tool_finish_reason(event.finish_reason, calls[event.index])
            elif event.text:
                yield chunk(ChatDelta(content=event.text), index=event.index)
            yield chunk(ChatDelta(), finish=reason, index=event.index)
            finishes.append(event)
        if prepared.include_usage and finishes:
            body = ChatCompletionChunk(**envelope(prepared), choices=[], usage=usage(finishes))
            yield f"data: {body.model_dump_json(exclude_none=True)}\n\n"
        yield DONE
    except Exception as exc:  # the status line is sent: report the failure in-band
        yield sse_error(exc)


class _CompletionLogprobs:
    def __init__(self, top_n: int, start_offset: int) -> None:
        self.top_n = top_n
        self.offset = start_offset
        self.value = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])

    def add(self, lp: TokenLogprob) -> CompletionLogprobs:
        one = CompletionLogprobs(
            tokens=[lp.token],
            token_logprobs=[lp.logprob],
            top_logprobs=[{t.token: t.logprob for t in lp.top[: self.top_n]}],
            text_offset=[self.offset],
        )
        self.offset += len(lp.token)
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(self.value, name).extend(getattr(one, name))
        return one


async def completion(prepared: Prepared, stream: AsyncIterator[GenerationEvent]) -> Completion:
    n = prepared.generation.n
    logprobs = [_CompletionLogprobs(prepared.top_logprobs, len(prepared.echo_text)) for _ in range(n)]
    texts: list[list[str]] = [[prepared.echo_text] for _ in range(n)]
    finishes: dict[int, FinishEvent] = {}
    async for event in stream:
        texts[event.index].append(event.text)
        if isinstance(event, TokenEvent):
            if event.logprob is not None:
                logprobs[event.index].add(event.logprob)
        else:
            finishes[event.index] = event
    assert len(finishes) == n, "the engine ended a request before every choice finished"
    return Completion(
        **envelope(prepared),
        choices=[
            CompletionChoice(
                index=index,
                text="".join(texts[index]),
                logprobs=logprobs[index].value if prepared.generation.logprobs is not None else None,
                finish_reason=finishes[index].finish_reason,
            )
            for index in range(n)
        ],
        usage=usage([finishes[i] for i in range(n)]),
    )


async def completion_sse(prepared: Prepared, stream: AsyncIterator[GenerationEvent]) -> AsyncGenerator[str, None]:
    def chunk(
        text: str, finish: FinishReason | None = None, logprobs: CompletionLogprobs | None = None, index: int = 0
    ) -> str:
        body = Completion(
            **envelope(prepared),
            choices=[CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)],
        )
        # finish_reason and logprobs are null until they are known, as in OpenAI's stream (both are required
        # fields of a completion choice); usage comes only in its own last chunk.
        return f"data: {body.model_dump_json(exclude={'usage'})}\n\n"

    n = prepared.generation.n
    logprobs = [_CompletionLogprobs(prepared.top_logprobs, len(prepared.echo_text)) for _ in range(n)]
    finishes: list[FinishEvent] = []
    try:
        if prepared.echo_text:
            for index in range(n):
                yield chunk(prepared.echo_text, index=index)
        async for event in stream:
            if isinstance(event, TokenEvent):
                one = logprobs[event.index].add(event.logprob) if event.logprob is not None else None
                if event.text or one is not None:
                    yield chunk(event.text, logprobs=one, index=event.index)
                continue
            yield chunk(event.text, finish=event.finish_reason, index=event.index)
            finishes.append(event)
        if prepared.include_usage and finishes:
            body = Completion(**envelope(prepared), choices=[], usage=usage(finishes))
            yield f"data: {body.model_dump_json(exclude_none=True)}\n\n"
        yield DONE
    except Exception as exc:
        yield sse_error(exc)
