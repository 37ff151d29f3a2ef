"""What the HTTP layer and an engine exchange: requests, events, statistics and the Engine protocol.

The HTTP layer builds a GenerationRequest (token ids and sampling values, nothing OpenAI-specific) and
iterates ``engine.generate(request)``, an async iterator of TokenEvent ending in one FinishEvent per choice. Closing the
iterator cancels the generation; the engine frees the sequence at its next step. Every type here is plain
data (picklable, no llama.cpp, no HTTP), because requests and events cross a process boundary.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    seed: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputConstraint:
    """Constrain the output to JSON: any object (``schema`` None) or one matching a JSON Schema; or to a ready
    GBNF grammar (``gbnf``: tool calls, server/tools.py) that, given ``triggers``, waits until the generated text
    matches one of those regular expressions (llama.cpp's lazy grammar) and holds from the match on.
    ``markers`` are literal texts of that grammar which a model may spell as one special token (Mistral's
    ``[TOOL_CALLS]``): such tokens keep their text in the output so that the caller can parse it."""

    schema: Mapping[str, Any] | None = None
    gbnf: str | None = None
    triggers: tuple[str, ...] = ()
    markers: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    prompt_tokens: tuple[int, ...]
    max_tokens: int | None  # None: until end of generation or the sequence's context is full
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    constraint: OutputConstraint | None = None
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's logprob and the top k
    # GBNF: the client's own (llama-server's ``grammar`` field), or compiled from ``constraint`` by prepare()
    grammar: str | None = None
    # Choices sampled from one decode of the prompt: the engine copies the prompt's cache to n sequences
    # (llama_memory_seq_cp) and samples choice i with seed + i. Events carry the choice's index.
    n: int = 1
    cache_prompt: bool = True  # False: decode the whole prompt again even where a sequence holds its prefix
    preserved_tokens: tuple[int, ...] = ()  # special tokens whose text is kept (from ``constraint.markers``)


@dataclass(frozen=True)
class TopLogprob:
    token: str
    token_bytes: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    token_bytes: bytes
    logprob: float
    top: tuple[TopLogprob, ...]


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token. ``text`` is what became safe to show with it ("" while held back)."""

    token_id: int
    text: str
    logprob: TokenLogprob | None
    time_s: float  # time.perf_counter() when it was sampled (CLOCK_MONOTONIC: comparable across processes)
    index: int = 0  # the choice it belongs to (0 .. n-1)


FinishReason = Literal["stop", "length"]
TemplateSource = Literal["config", "gguf", "fallback"]  # where a model's chat template came from


@dataclass(frozen=True)
class TemplateFacts:
    """A model's chat template as tool calling needs to know it (found by rendering probe conversations)."""

    source: TemplateSource
    text: str
    renders_tools: bool  # the template writes the ``tools`` it is given into the prompt
    renders_tool_calls: bool  # it writes an assistant message's ``tool_calls`` into the prompt


@dataclass(frozen=True)
class FinishEvent:
    finish_reason: FinishReason
    text: str  # text held back until the end (a partial stop-string match that never completed)
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV cache was reused
    note: str | None = None  # why a generation ended early (the shared KV cache ran full), for the log
    index: int = 0  # the choice it ends; a request with n choices ends after n FinishEvents


@dataclass(frozen=True)
class ErrorEvent:
    """The request failed inside the engine; the HTTP layer turns it into an EngineError."""

    message: str
    dead: bool = False  # the engine process is gone


GenerationEvent = TokenEvent | FinishEvent


@dataclass(frozen=True)
class StepStats:
    """One scheduler step: what went into the batch and how long llama_decode took."""

    batch_tokens: int  # tokens in the llama_batch (generated + prompt)
    decode_sequences: int  # sequences that contributed their next token
    prompt_tokens: int  # prompt tokens prefilled in this step
    step_s: float  # wall time of llama_decode plus sampling


@dataclass(frozen=True)
class EngineStats:
    """The engine's own accounting, after a step (or on request): the leak detector of the tests and /metrics."""

    sequences: int  # llama.cpp sequences (n_seq_max)
    busy_sequences: int  # sequences serving a request
    waiting_requests: int  # requests submitted but not yet holding a sequence
    kv_cells: int  # cells of the KV cache (all sequences together)
    kv_cells_busy: int  # cells held by sequences that serve a request
    kv_cells_cached: int  # cells kept by idle sequences for prompt-prefix reuse
    kv_cells_untracked: int  # cells llama.cpp holds that the engine does not know of: must be 0
    steps: int


@dataclass(frozen=True)
class ModelFacts:
    """What the HTTP layer needs to know of a loaded model."""

    n_ctx: int  # KV cells in all
    n_ctx_seq: int  # tokens one sequence may hold (the whole context when the cache is unified)
    n_seq_max: int
    n_vocab: int
    kv_unified: bool
    # An embedding model (server.engine.embedding): it serves /v1/embeddings, never generation. Then n_ctx is
    # the tokens of one encode and n_ctx_seq the tokens of one input; n_embd and pooling describe its vectors.
    embeddings: bool = False
    n_embd: int = 0
    pooling: str = "none"


class Engine(Protocol):
    """What the HTTP layer needs from a model. Implementations must be safe to call from the event loop."""

    @property
    def facts(self) -> ModelFacts: ...

    @property
    def n_ctx_per_seq(self) -> int: ...

    @property
    def n_vocab(self) -> int: ...

    @property
    def max_concurrency(self) -> int: ...

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        """The prompt of a conversation; ``tools`` (OpenAI tool objects) go to the template's ``tools``."""

    def encode_text(self, text: str) -> list[int]: ...

    def decode_tokens(self, tokens: Sequence[int]) -> str: ...

    def stop_strings(self) -> tuple[str, ...]:
        """Stop strings every chat request gets (the fallback template's end marker)."""

    def chat_template_source(self) -> TemplateSource:
        """Where the chat template came from: "config", "gguf" or "fallback"."""

    def chat_template_facts(self) -> TemplateFacts:
        """The chat template's text and what it renders (tools, tool calls)."""

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """Check what only the model can judge (token ids, schema grammar) and compile the grammar.

        Raises EngineRequestError; returns the request as the engine will run it.
        """

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]: ...

    def stats(self) -> EngineStats | None:
        """The latest accounting the engine reported (None before its first step)."""

    def close(self) -> None: ...
