"""The OpenAI API as pydantic models: requests validated against the API reference's ranges, and responses.

Requests are strict (no string-to-number coercion) and reject unknown fields, as the OpenAI API does.
Parameters that this server recognises but cannot honour (audio, predicted outputs, suffix) are refused with
a message that names them, never silently ignored. llama.cpp's extra sampling knobs (top_k, min_p) are
accepted as vLLM and llama-server accept them.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from server.errors import InvalidRequestError

# OpenAI limits (API reference, "Create chat completion" / "Create completion").
MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
MAX_CHOICES = 128
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


# A field recognised and refused whatever its value (a 400 that names it and says what to send instead): the
# OpenAPI document gives null, the one value it takes, so that a client reading the document never sends it.
Refused = Annotated[Any, WithJsonSchema({"type": "null", "description": "Not supported by this server"})]


def _unsupported(what: str, fix: str) -> Any:
    def check(value: Any) -> Any:
        if value is not None:
            raise ValueError(f"{what} is not supported by this server; {fix}")
        return value

    return check


# --- messages -------------------------------------------------------------------------------------------------


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: dict[str, Any]


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: dict[str, Any]


class FilePart(_Strict):
    type: Literal["file"]
    file: dict[str, Any]


class RefusalPart(_Strict):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[TextPart | ImagePart | AudioPart | FilePart, Field(discriminator="type")]
AssistantPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]


def _text_only(parts: list[Any]) -> list[Any]:
    for i, part in enumerate(parts):
        if not isinstance(part, TextPart | RefusalPart):
            raise ValueError(f"content[{i}] is a {part.type} part; this server accepts text parts only")
    return parts


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema; absent: the function takes no arguments
    strict: bool | None = None  # arguments always follow the schema here (a grammar), strict or not


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: ToolChoiceFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class SystemMessage(_Strict):
    role: Literal["system"]
    content: str | list[TextPart]
    name: str | None = None


class DeveloperMessage(_Strict):
    """OpenAI's newer name for the system role; the chat template sees it as "system"."""

    role: Literal["developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Strict):
    role: Literal["user"]
    content: str | list[ContentPart]
    name: str | None = None

    _check_parts = field_validator("content")(lambda v: _text_only(v) if isinstance(v, list) else v)


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: str | list[AssistantPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    # Output-only fields that clients send back when they append a previous reply to the conversation.
    annotations: list[Any] | None = None
    audio: Refused = None
    function_call: Refused = None

    _no_audio = field_validator("audio")(_unsupported("assistant audio", "send the transcript as content"))
    _no_function_call = field_validator("function_call")(
        _unsupported("function_call (legacy function calling)", "send tool_calls instead")
    )

    @model_validator(mode="after")
    def _has_something(self) -> AssistantMessage:
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self


class ToolMessage(_Strict):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


ChatMessage = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage,
    Field(discriminator="role"),
]


def message_text(content: str | list[Any] | None) -> str | None:
    """Flatten text parts the way vLLM does (joined by newlines); refusal parts count as text."""
    if content is None or isinstance(content, str):
        return content
    return "\n".join(p.text if isinstance(p, TextPart) else p.refusal for p in content)


# --- request options ------------------------------------------------------------------------------------------


class JSONSchemaSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    # "schema" shadows a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, populate_by_name=True)


class TextFormat(_Strict):
    type: Literal["text"]


class JSONObjectFormat(_Strict):
    type: Literal["json_object"]


class JSONSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaFormat, Field(discriminator="type")]


class StreamOptions(_Strict):
    include_usage: bool | None = None


Stop = str | Annotated[list[str], Field(min_length=0, max_length=MAX_STOP_SEQUENCES)] | None
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
PositiveInt = Annotated[int, Field(ge=1)]


class _SamplingRequest(_Strict):
    """Parameters shared by /v1/chat/completions and /v1/completions."""

    model: str = Field(min_length=1)
    temperature: Temperature | None = None
    top_p: Probability | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # llama.cpp extension; 0 disables it
    min_p: Probability | None = None  # llama.cpp extension
    stop: Stop = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    # The keys are token ids, which the document says; the vocabulary's size is checked once the model is known.
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        default=None, json_schema_extra={"propertyNames": {"pattern": "^[0-9]+$"}}
    )
    # Choices per request; the model's sequences (--parallel) are the real limit, checked in serving.py.
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    # llama-server's own request fields that clients send (docs/SERVER.md, "llama.cpp's request fields"):
    # honoured where this server can mean the same, refused by name where it cannot; never ignored.
    cache_prompt: bool | None = None
    grammar: Annotated[str, Field(min_length=1)] | None = None
    json_schema: dict[str, Any] | None = None
    id_slot: Refused = None
    n_probs: Refused = None
    timings_per_token: Refused = None

    _no_id_slot = field_validator("id_slot")(
        _unsupported(
            "id_slot (choosing llama-server's slot)",
            "remove it: the engine picks the sequence itself, and a returning conversation gets the sequence "
            "that holds its prefix",
        )
    )
    _no_n_probs = field_validator("n_probs")(
        _unsupported(
            "n_probs (llama-server's completion_probabilities)",
            "ask with OpenAI's logprobs / top_logprobs instead",
        )
    )
    _no_timings = field_validator("timings_per_token")(
        _unsupported(
            "timings_per_token (llama-server's per-chunk timings)",
            "remove it: time to first token and inter-token latency are in /metrics",
        )
    )

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: str | list[str] | None) -> str | list[str] | None:
        for s in [value] if isinstance(value, str) else value or []:
            if s == "":
                raise ValueError("stop sequences must not be empty strings")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys_are_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        # The vocabulary size is checked once the model is known (serving.py).
        for key in value or {}:
            if not key.isdigit():
                raise ValueError(f"key {key!r} is not a token id (a non-negative integer as a string)")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true", param="stream_options")
        return self

    @model_validator(mode="after")
    def _one_output_constraint(self) -> _SamplingRequest:
        given = [
            name
            for name, value in (
                ("response_format", self.response_format if not isinstance(self.response_format, TextFormat) else None),
                ("grammar", self.grammar),
                ("json_schema", self.json_schema),
            )
            if value is not None
        ]
        if len(given) > 1:
            raise InvalidRequestError(
                f"{' and '.join(given)} both constrain the output; send only one of them", param=given[1]
            )
        return self

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: Refused = None
    function_call: Refused = None
    audio: Refused = None
    modalities: Refused = None
    prediction: Refused = None

    _no_functions = field_validator("functions", "function_call")(
        _unsupported("legacy function calling (functions, function_call)", "send tools and tool_choice instead")
    )
    _no_audio = field_validator("audio", "modalities")(_unsupported("audio output", "ask for text output"))
    _no_prediction = field_validator("prediction")(_unsupported("predicted outputs", "remove `prediction`"))

    @model_validator(mode="after")
    def _token_limits(self) -> ChatCompletionRequest:
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise InvalidRequestError(
                f"max_tokens ({self.max_tokens}) and max_completion_tokens ({self.max_completion_tokens}) "
                "disagree; send only max_completion_tokens",
                param="max_tokens",
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
        return self

    @model_validator(mode="after")
    def _tools_agree(self) -> ChatCompletionRequest:
        # OpenAI's rules: tool_choice and parallel_tool_calls only with tools, a named choice among them.
        names = [tool.function.name for tool in self.tools or ()]
        if not names:
            for param in ("tool_choice", "parallel_tool_calls"):
                if getattr(self, param) is not None:
                    raise InvalidRequestError(f"{param} is only allowed when tools are specified", param=param)
            return self
        twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
        if twice is not None:
            raise InvalidRequestError(f"tools name the function {twice!r} twice; names must be unique", param="tools")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise InvalidRequestError(
                f"tool_choice names the function {choice.function.name!r}, which is not among the tools "
                f"({', '.join(names)})",
                param="tool_choice",
            )
        return self

    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_SamplingRequest):
    prompt: (
        str
        | TokenIds
        | Annotated[list[str], Field(min_length=1, max_length=1)]
        | Annotated[list[TokenIds], Field(min_length=1, max_length=1)]
    )
    max_tokens: PositiveInt | None = 16  # the OpenAI default for completions
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    echo: bool | None = None
    best_of: Annotated[PositiveInt | None, WithJsonSchema({"anyOf": [{"const": 1}, {"type": "null"}]})] = None
    suffix: Refused = None

    _no_suffix = field_validator("suffix")(_unsupported("suffix (insertion)", "remove `suffix`"))

    @field_validator("best_of")
    @classmethod
    def _best_of_is_one(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError(f"best_of={value} is not supported; this server returns one choice (best_of=1)")
        return value

    @model_validator(mode="after")
    def _echo_logprobs(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None:
            raise InvalidRequestError(
                "echo together with logprobs is not supported (prompt logprobs are not computed)", param="echo"
            )
        return self

    def prompt_value(self) -> str | list[int]:
        """The single prompt, unwrapped from the one-element batch forms."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt
        first = prompt[0] if prompt else None
        if isinstance(first, str | list):
            return first
        return [token for token in prompt if isinstance(token, int)]  # validated: all are ids


# Messages for fields whose every union branch failed (pydantic would list one error per branch).
UNION_HINTS = {
    "prompt": "must be a string, a non-empty list of token ids (integers >= 0), or a one-element list of either",
    "stop": f"must be a string or a list of at most {MAX_STOP_SEQUENCES} strings",
    "content": "must be a string or a list of content parts",
}


# --- responses ------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV cache was reused from an earlier request


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None
    refusal: list[TokenLogprobEntry] | None = None


class AssistantReply(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantReply
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = None  # in the call's first delta only
    arguments: str | None = None  # the next piece of the arguments' JSON text


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None  # in the call's first delta only, with type and the function's name
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


ModelStatus = Literal["unloaded", "loading", "ready", "failed"]


class ModelDevice(BaseModel):
    name: str
    bytes: int  # predicted: weights, KV cache, compute buffers and overhead
    layers: tuple[int, int] | None  # inclusive layer range; n_layer is the output layer


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llamasplit"
    # Extensions: where the model came from and whether it can take requests yet.
    status: ModelStatus
    path: str
    n_ctx: int  # KV cells of the context, all sequences together
    n_ctx_per_seq: int  # tokens one request may hold (prompt plus completion)
    parallel: int  # sequences decoded together in one batch
    kv_unified: bool  # the sequences share one KV cache (each may use all of it) rather than one each
    chat_template: Literal["config", "gguf", "fallback"] | None  # where the chat template came from
    embedding: bool = False  # an embedding model: it serves /v1/embeddings, not chat or completions
    error: str | None = None  # why the model failed (its engine process died, its load failed)
    pinned: bool = False  # never evicted nor expired
    keep_alive_s: float | None = None  # unloaded after this many idle seconds
    placement: str | None = None  # where it sits and why (loaded models)
    devices: list[ModelDevice] = Field(default_factory=list)  # what it holds per device (loaded models)
    host_bytes: int | None = None
    loads: int = 0
    evictions: int = 0


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- embeddings -----------------------------------------------------------------------------------------------

# OpenAI limits (API reference, "Create embeddings"): at most 2048 inputs, none of them empty.
MAX_EMBEDDING_INPUTS = 2048
NonEmptyText = Annotated[str, Field(min_length=1)]
UNION_HINTS["input"] = (
    "must be a non-empty string, a list of at most 2048 non-empty strings, a non-empty list of token ids "
    "(integers >= 0), or a list of at most 2048 such lists"
)


class EmbeddingRequest(_Strict):
    """POST /v1/embeddings. ``dimensions`` is accepted only where it changes nothing (the model's own width):
    no GGUF says that a model was trained to be shortened (Matryoshka), so any other value is refused."""

    model: str = Field(min_length=1)
    input: (
        NonEmptyText
        | Annotated[list[NonEmptyText], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = None
    user: str | None = None

    def inputs(self) -> list[str] | list[list[int]]:
        """Every input as a list: texts, or token arrays."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if all(isinstance(item, int) for item in value):
            return [[item for item in value if isinstance(item, int)]]  # validated: one token array
        if all(isinstance(item, str) for item in value):
            return [item for item in value if isinstance(item, str)]
        return [item for item in value if isinstance(item, list)]  # validated: token arrays


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32 (encoding_format "base64")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
