"""Inference engines: the Engine protocol the HTTP layer talks to, and its llama-cpp-python implementation.

The HTTP layer builds a GenerationRequest (token ids and sampling values, nothing OpenAI-specific) and
iterates ``engine.generate(request)``, an async iterator of TokenEvent ending in one FinishEvent. Closing the
iterator cancels the generation; the engine notices before the next token. A continuous-batching engine
implements the same protocol with ``max_concurrency`` > 1.

LlamaCppEngine runs one sequence at a time in a worker thread over llama.cpp's C API (through llama_cpp's
ctypes bindings): it loads with explicit model/context parameters (the tuner's plan), keeps ``n_seq_max``
slots whose KV cache is reused for prompts that share a prefix, and samples with a native sampler chain.
It knows nothing of FastAPI.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from server.chat_template import ChatTemplate
from server.errors import EngineError, InvalidRequestError
from server.textstream import TextAssembler

log = logging.getLogger("llamasplit.engine")

# ggml_type values (ggml.h) of the KV cache types the tuner knows; llama_cpp lacks a constant for bf16.
GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}
SPLIT_MODES = {"none": 0, "layer": 1, "row": 2}
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
UINT32_SEEDS = 2**32 - 1  # 0xFFFFFFFF is LLAMA_DEFAULT_SEED ("random"), so seeds are reduced below it


# --- the engine-neutral request and events ---------------------------------------------------------------


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
    """Constrain the output to JSON: any object (``schema`` None) or one matching a JSON Schema."""

    schema: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class GenerationRequest:
    prompt_tokens: tuple[int, ...]
    max_tokens: int | None  # None: until end of generation or the sequence's context is full
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    constraint: OutputConstraint | None = None
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's logprob and the top k


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
    time_s: float  # time.perf_counter() when it was sampled


@dataclass(frozen=True)
class FinishEvent:
    finish_reason: Literal["stop", "length"]
    text: str  # text held back until the end (a partial stop-string match that never completed)
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV cache was reused


GenerationEvent = TokenEvent | FinishEvent


class Engine(Protocol):
    """What the HTTP layer needs from a model. Implementations must be safe to call from the event loop."""

    @property
    def n_ctx_per_seq(self) -> int: ...

    @property
    def n_vocab(self) -> int: ...

    @property
    def max_concurrency(self) -> int: ...

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]: ...

    def encode_text(self, text: str) -> list[int]: ...

    def decode_tokens(self, tokens: Sequence[int]) -> str: ...

    def stop_strings(self) -> tuple[str, ...]:
        """Stop strings every chat request gets (the fallback template's end marker)."""

    def chat_template_source(self) -> str:
        """Where the chat template came from: "config", "gguf" or "fallback"."""

    def check(self, request: GenerationRequest) -> None:
        """Raise InvalidRequestError for what only the model can judge (token ids, schema grammar)."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]: ...

    def close(self) -> None: ...


# --- loading ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadParams:
    """Everything llama.cpp needs to load one model; the registry fills it from the tuner's plan."""

    n_gpu_layers: int = 0
    split_mode: str = "layer"
    main_gpu: int = 0
    tensor_split: tuple[float, ...] = ()
    n_ctx: int = 4096
    n_seq_max: int = 1
    n_batch: int = 512
    n_ubatch: int = 512
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: str = "auto"  # "on" | "off" | "auto"
    swa_full: bool = True
    kv_unified: bool = False
    n_threads: int | None = None
    n_threads_batch: int | None = None
    use_mmap: bool = True
    # llama-server's --no-repack: False keeps CPU weights in their file layout (no AMX / CPU_REPACK buffers).
    repack: bool = True


# ggml_log_level of this ggml (DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 continues the previous line).
_LOG_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_llama_log = logging.getLogger("llamasplit.llama_cpp")
_log_state = {"level": logging.DEBUG, "partial": ""}


def _on_llama_log(level: int, text: bytes | None, _user_data: Any) -> None:
    # llama.cpp's INFO lines are load chatter: they go to DEBUG. Never raise into C.
    try:
        if level != 5:
            _log_state["level"] = _LOG_LEVELS.get(level, logging.DEBUG)
        data = str(_log_state["partial"]) + (text or b"").decode("utf-8", errors="replace")
        *lines, _log_state["partial"] = data.split("\n")
        for line in lines:
            if line.strip():
                _llama_log.log(int(_log_state["level"]), "%s", line)
    except Exception:
        pass


@functools.cache
def install_llama_logger() -> Any:
    """Route llama.cpp's log into Python logging (``llamasplit.llama_cpp``) instead of stderr."""
    lc = _llama()
    callback = lc.llama_log_callback(_on_llama_log)
    lc.llama_log_set(callback, None)
    return callback  # cached: the ctypes thunk must live as long as the process


@functools.cache
def _llama() -> Any:
    import llama_cpp

    llama_cpp.llama_backend_init()
    return llama_cpp


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class _Slot:
    """One llama.cpp sequence and the tokens its KV cache holds."""

    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        self.tokens: list[int] = []
        self.last_used_s = 0.0


class LlamaCppEngine:
    """llama.cpp through llama_cpp's ctypes bindings; one generation at a time, in one worker thread."""

    def __init__(self, model: Any, ctx: Any, params: LoadParams, template: ChatTemplate, name: str) -> None:
        lc = _llama()
        self._lc = lc
        self._model = model
        self._ctx = ctx
        self._vocab = lc.llama_model_get_vocab(model)
        self._mem = lc.llama_get_memory(ctx)
        self.params = params
        self.name = name
        self.template = template
        self._n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        self._n_ctx = lc.llama_n_ctx(ctx)
        self._n_batch = lc.llama_n_batch(ctx)
        self._n_seq = lc.llama_n_seq_max(ctx)
        self._n_ctx_seq = lc.llama_n_ctx_seq(ctx) if hasattr(lc, "llama_n_ctx_seq") else self._n_ctx // self._n_seq
        self._add_bos = bool(lc.llama_vocab_get_add_bos(self._vocab))
        self._batch = lc.llama_batch_init(self._n_batch, 0, 1)
        self._slots = [_Slot(i) for i in range(self._n_seq)]
        # One thread owns the llama_context: llama.cpp contexts are not thread-safe.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{name}")
        self._cancel: threading.Event | None = None
        self._abort_cb = lc.ggml_abort_callback(self._should_abort)
        self._grammars: dict[str, str] = {}
        self._grammars_lock = threading.Lock()  # requests are prepared in a thread pool
        self._closed = False

    # -- loading --

    @classmethod
    def load(
        cls,
        path: str | Path,
        params: LoadParams,
        *,
        name: str,
        chat_template: str | None = None,
        devices: Sequence[int] | None = None,
    ) -> LlamaCppEngine:
        """Load the model and create its context; llama.cpp failures become EngineError with the reason.

        ``devices`` are ggml_backend_dev_t pointers to place layers on (llama.cpp's default list when None),
        needed for RPC devices, which the default list does not pick up.
        """
        lc = _llama()
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = params.n_gpu_layers
        mparams.split_mode = SPLIT_MODES[params.split_mode]
        mparams.main_gpu = params.main_gpu
        keep: list[Any] = []  # ctypes arrays that must outlive the load call
        if params.tensor_split:
            n_max = lc.llama_max_devices()
            if len(params.tensor_split) > n_max:
                raise EngineError(f"tensor_split has {len(params.tensor_split)} entries; llama.cpp allows {n_max}")
            split = (ctypes.c_float * n_max)(*params.tensor_split)
            keep.append(split)
            mparams.tensor_split = split
        if devices:
            dev_array = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
            keep.append(dev_array)
            mparams.devices = ctypes.cast(dev_array, ctypes.c_void_p)
        mparams.use_extra_bufts = params.repack
        if not params.use_mmap:
            mparams.load_mode = lc.LLAMA_LOAD_MODE_NONE
        model = lc.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise EngineError(f"llama.cpp could not load {path}")
        threads = params.n_threads or default_threads()
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = params.n_ctx
        cparams.n_batch = params.n_batch
        cparams.n_ubatch = min(params.n_ubatch, params.n_batch)
        cparams.n_seq_max = params.n_seq_max
        cparams.n_threads = threads
        cparams.n_threads_batch = params.n_threads_batch or threads
        cparams.type_k = GGML_TYPES[params.type_k]
        cparams.type_v = GGML_TYPES[params.type_v]
        cparams.flash_attn_type = FLASH_ATTN[params.flash_attn]
        cparams.swa_full = params.swa_full
        cparams.kv_unified = params.kv_unified
        cparams.no_perf = True
        ctx = lc.llama_init_from_model(model, cparams)
        if not ctx:
            lc.llama_model_free(model)
            raise EngineError(
                f"llama.cpp could not create the context for {path} (n_ctx={params.n_ctx}, "
                f"n_seq_max={params.n_seq_max})"
            )
        template = ChatTemplate.choose(
            chat_template,
            _gguf_chat_template(lc, model),
            bos_token=_token_text(lc, model, lc.llama_vocab_bos(lc.llama_model_get_vocab(model))),
            eos_token=_token_text(lc, model, lc.llama_vocab_eos(lc.llama_model_get_vocab(model))),
        )
        return cls(model, ctx, params, template, name)

    @property
    def model_pointer(self) -> int:
        """The llama_model address, for tuner.llamacpp.libs.model_devices."""
        return ctypes.cast(self._model, ctypes.c_void_p).value or 0

    @property
    def ctx_pointer(self) -> int:
        """The llama_context address, for memory reports (tuner.llamacpp.libs.memory_breakdown)."""
        return ctypes.cast(self._ctx, ctypes.c_void_p).value or 0

    # -- Engine protocol: metadata and tokenisation --

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def n_ctx_per_seq(self) -> int:
        return self._n_ctx_seq

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def n_seq_max(self) -> int:
        return self._n_seq

    @property
    def max_concurrency(self) -> int:
        return 1

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        prompt = self.template.render(messages)
        # Templates that write the BOS text themselves must not get a second BOS from the tokenizer.
        bos = self.template.bos_token
        add_bos = self._add_bos and not (bos and prompt.startswith(bos))
        return self._tokenize(prompt, add_bos=add_bos, parse_special=True)

    def encode_text(self, text: str) -> list[int]:
        return self._tokenize(text, add_bos=self._add_bos, parse_special=True)

    def decode_tokens(self, tokens: Sequence[int]) -> str:
        return b"".join(self._piece(t, special=False) for t in tokens).decode("utf-8", errors="replace")

    def stop_strings(self) -> tuple[str, ...]:
        return self.template.stop_strings

    def chat_template_source(self) -> str:
        return self.template.source

    def _tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> list[int]:
        lc = self._lc
        data = text.encode("utf-8")
        n_max = len(data) + 2
        buf = (lc.llama_token * n_max)()
        n = lc.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_bos, parse_special)
        if n < 0:  # the buffer was too small; -n is the size needed
            buf = (lc.llama_token * -n)()
            n = lc.llama_tokenize(self._vocab, data, len(data), buf, -n, add_bos, parse_special)
        if n < 0:
            raise InvalidRequestError("the prompt could not be tokenized", param="prompt")
        return list(buf[:n])

    def _piece(self, token: int, *, special: bool) -> bytes:
        return _piece(self._lc, self._vocab, token, special)

    # -- request checks that need the model --

    def check(self, request: GenerationRequest) -> None:
        for token, _ in request.sampling.logit_bias.items():
            if not 0 <= token < self._n_vocab:
                raise InvalidRequestError(
                    f"logit_bias key {token} is not a token id of this model (ids run from 0 to {self._n_vocab - 1})",
                    param="logit_bias",
                )
        if request.constraint is not None:
            self._grammar(request.constraint)

    def _grammar(self, constraint: OutputConstraint) -> str:
        """GBNF for the constraint, compiled once per schema; a schema llama.cpp cannot express is a 400."""
        from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

        key = json.dumps(constraint.schema, sort_keys=True) if constraint.schema is not None else ""
        with self._grammars_lock:
            cached = self._grammars.get(key)
        if cached is not None:
            return cached
        if constraint.schema is None:
            gbnf = JSON_GBNF
        else:
            try:
                gbnf = json_schema_to_gbnf(key)
            except Exception as exc:  # the converter raises bare Exception/ValueError/KeyError on bad schemas
                raise InvalidRequestError(
                    f"the JSON schema cannot be turned into a grammar: {type(exc).__name__}: {exc}",
                    param="response_format.json_schema.schema",
                ) from exc
        sampler = self._lc.llama_sampler_init_grammar(self._vocab, gbnf.encode(), b"root")
        if not sampler:
            raise InvalidRequestError(
                "the JSON schema produced a grammar llama.cpp rejects; simplify the schema",
                param="response_format.json_schema.schema",
            )
        self._lc.llama_sampler_free(sampler)
        with self._grammars_lock:
            if len(self._grammars) >= 64:  # a small cache: schemas repeat per client, not per request
                self._grammars.pop(next(iter(self._grammars)))
            self._grammars[key] = gbnf
        return gbnf

    # -- generation --

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Run the request in the worker thread; closing this iterator stops it before the next token."""
        if self._closed:
            raise EngineError(f"model {self.name} is shut down")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerationEvent | BaseException | None] = asyncio.Queue()
        cancel = threading.Event()

        def emit(event: GenerationEvent | BaseException | None) -> None:
            if not cancel.is_set():
                loop.call_soon_threadsafe(events.put_nowait, event)

        future = loop.run_in_executor(self._executor, self._run, request, cancel, emit)
        try:
            while True:
                event = await events.get()
                if event is None:
                    break
                if isinstance(event, BaseException):
                    raise event
                yield event
        finally:
            cancel.set()
            if future.done() and not future.cancelled() and future.exception() is not None:
                log.debug("generation failed: %r", future.exception())

    def _run(
        self,
        request: GenerationRequest,
        cancel: threading.Event,
        emit: Callable[[GenerationEvent | BaseException | None], None],
    ) -> None:
        try:
            self._generate(request, cancel, emit)
        except BaseException as exc:
            emit(exc if isinstance(exc, EngineError) else EngineError(f"generation failed: {exc}"))
            log.exception("generation failed")
        finally:
            emit(None)

    def _generate(self, request: GenerationRequest, cancel: threading.Event, emit: Callable[[Any], None]) -> None:
        lc = self._lc
        prompt = list(request.prompt_tokens)
        slot, cached = self._prepare_slot(prompt)
        slot.last_used_s = time.monotonic()

        # Step 1: prefill the part of the prompt the slot's cache does not hold, in n_batch chunks.
        # The abort callback lets a disconnect interrupt a long prefill mid-batch.
        self._cancel = cancel
        lc.llama_set_abort_callback(self._ctx, self._abort_cb, None)
        try:
            for start in range(cached, len(prompt), self._n_batch):
                if cancel.is_set():
                    return
                chunk = prompt[start : start + self._n_batch]
                if not self._decode(slot, chunk):
                    return
        finally:
            lc.llama_set_abort_callback(self._ctx, lc.ggml_abort_callback(0), None)
            self._cancel = None

        # Step 2: sample until end of generation, a stop string, max_tokens or the end of the context.
        room = self._n_ctx_seq - len(prompt)
        limit = room if request.max_tokens is None else min(request.max_tokens, room)
        assembler = TextAssembler(request.stop)
        chain = self._sampler_chain(request)
        n_generated = 0
        finish: Literal["stop", "length"] = "length"
        try:
            while n_generated < limit:
                if cancel.is_set():
                    return
                logprob = self._logprob_before_sampling(request.logprobs) if request.logprobs is not None else None
                token = lc.llama_sampler_sample(chain, self._ctx, -1)
                now = time.perf_counter()
                if lc.llama_vocab_is_eog(self._vocab, token):
                    finish = "stop"
                    break
                n_generated += 1
                if logprob is not None:
                    logprob = logprob(token)
                text = assembler.push(self._piece(token, special=False))
                emit(TokenEvent(token_id=token, text=text, logprob=logprob, time_s=now))
                if assembler.stopped:
                    finish = "stop"
                    break
                if n_generated < limit and not self._decode(slot, [token]):
                    return
        finally:
            lc.llama_sampler_free(chain)
        emit(
            FinishEvent(
                finish_reason=finish,
                text=assembler.flush(),
                prompt_tokens=len(prompt),
                completion_tokens=n_generated,
                cached_tokens=cached,
            )
        )

    def _should_abort(self, _data: Any) -> bool:
        cancel = self._cancel
        return bool(cancel is not None and cancel.is_set())

    def _prepare_slot(self, prompt: list[int]) -> tuple[_Slot, int]:
        """Pick the slot for ``prompt`` and trim its cache to the prefix they share; returns (slot, kept).

        A slot whose cache the prompt continues (the next turn of its chat) or repeats is reused, the one
        sharing most first. Otherwise the least recently used slot is taken, so that a new conversation
        evicts the oldest one rather than the one that merely shares the system prompt with it.
        """
        lc = self._lc

        def shared(slot: _Slot) -> int:
            n = 0
            for a, b in zip(slot.tokens, prompt, strict=False):
                if a != b:
                    break
                n += 1
            return n

        lengths = [shared(s) for s in self._slots]
        reusable = [
            i
            for i, s in enumerate(self._slots)
            if lengths[i] and (lengths[i] == len(s.tokens) or lengths[i] >= len(prompt) - 1)
        ]
        if reusable:
            best = max(reusable, key=lambda i: lengths[i])
        else:
            best = min(range(len(self._slots)), key=lambda i: self._slots[i].last_used_s)
        slot = self._slots[best]
        # At least one prompt token must be decoded again: sampling needs its logits.
        keep = min(lengths[best], len(prompt) - 1)
        if not lc.llama_memory_seq_rm(self._mem, slot.seq_id, keep, -1):
            # Some caches (recurrent, reduced sliding window) cannot drop a tail; start the slot over.
            lc.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
            keep = 0
        del slot.tokens[keep:]
        return slot, keep

    def _decode(self, slot: _Slot, tokens: Sequence[int]) -> bool:
        """Decode ``tokens`` at the end of the slot's sequence; False when aborted by cancellation."""
        lc = self._lc
        batch = self._batch
        pos = len(slot.tokens)
        n = len(tokens)
        batch.n_tokens = n
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = pos + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot.seq_id
            batch.logits[i] = i == n - 1
        rc = lc.llama_decode(self._ctx, batch)
        if rc == 0:
            slot.tokens.extend(tokens)
            return True
        # Whatever part of the batch reached the cache is not tracked: drop it so the slot stays consistent.
        lc.llama_memory_seq_rm(self._mem, slot.seq_id, pos, -1)
        if rc == 2:  # aborted through the abort callback
            return False
        raise EngineError(
            f"llama_decode returned {rc} for {n} tokens at position {pos} of sequence {slot.seq_id} "
            f"(context {self._n_ctx_seq} per sequence)"
        )

    def _sampler_chain(self, request: GenerationRequest) -> Any:
        """logit bias -> penalties -> grammar -> (greedy | top-k -> top-p -> min-p -> temperature -> dist)."""
        lc = self._lc
        s = request.sampling
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())

        def add(sampler: Any, what: str) -> None:
            if not sampler:
                lc.llama_sampler_free(chain)
                raise EngineError(f"llama.cpp could not create the {what} sampler")
            lc.llama_sampler_chain_add(chain, sampler)

        if s.logit_bias:
            biases = (lc.llama_logit_bias * len(s.logit_bias))()
            for i, (token, bias) in enumerate(s.logit_bias.items()):
                biases[i].token = token
                biases[i].bias = bias
            add(lc.llama_sampler_init_logit_bias(self._n_vocab, len(s.logit_bias), biases), "logit bias")
        if s.presence_penalty or s.frequency_penalty:
            # OpenAI's penalties count every token generated so far: the window is the whole context.
            add(
                lc.llama_sampler_init_penalties(
                    self._n_vocab, self._n_ctx_seq, 1.0, s.frequency_penalty, s.presence_penalty
                ),
                "penalties",
            )
        if request.constraint is not None:
            gbnf = self._grammar(request.constraint)
            add(lc.llama_sampler_init_grammar(self._vocab, gbnf.encode(), b"root"), "grammar")
        if s.temperature == 0.0:
            add(lc.llama_sampler_init_greedy(), "greedy")
        else:
            if s.top_k > 0:
                add(lc.llama_sampler_init_top_k(s.top_k), "top-k")
            if s.top_p < 1.0:
                add(lc.llama_sampler_init_top_p(s.top_p, 1), "top-p")
            if s.min_p > 0.0:
                add(lc.llama_sampler_init_min_p(s.min_p, 1), "min-p")
            add(lc.llama_sampler_init_temp(s.temperature), "temperature")
            add(lc.llama_sampler_init_dist(s.seed % UINT32_SEEDS), "dist")
        return chain

    def _logprob_before_sampling(self, top_n: int) -> Callable[[int], TokenLogprob]:
        """Log-softmax of the model's raw logits (before any sampler) for the token about to be sampled."""
        ptr = self._lc.llama_get_logits_ith(self._ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).astype(np.float64)
        shift = logits.max()
        logprobs = logits - (shift + np.log(np.exp(logits - shift).sum()))
        top_ids: list[int] = []
        if top_n > 0:
            part = np.argpartition(-logprobs, top_n)[:top_n]
            top_ids = [int(i) for i in part[np.argsort(-logprobs[part])]]

        def finish(token: int) -> TokenLogprob:
            tops = tuple(TopLogprob(_text(b := self._piece(i, special=True)), b, float(logprobs[i])) for i in top_ids)
            chosen = self._piece(token, special=True)
            return TokenLogprob(_text(chosen), chosen, float(logprobs[token]), tops)

        return finish

    # -- shutdown --

    def close(self) -> None:
        """Free the context and the model once the worker is idle; later generate() calls fail cleanly."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)
        lc = self._lc
        lc.llama_batch_free(self._batch)
        lc.llama_free(self._ctx)
        lc.llama_model_free(self._model)


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _piece(lc: Any, vocab: Any, token: int, special: bool) -> bytes:
    buf = ctypes.create_string_buffer(64)
    n = lc.llama_token_to_piece(vocab, token, buf, 64, 0, special)
    if n < 0:  # a piece longer than 64 bytes: -n is its length
        buf = ctypes.create_string_buffer(-n)
        n = lc.llama_token_to_piece(vocab, token, buf, -n, 0, special)
    return buf.raw[: max(n, 0)]


def _gguf_chat_template(lc: Any, model: Any) -> str | None:
    raw = lc.llama_model_chat_template(model, None)
    return raw.decode("utf-8", errors="replace") if raw else None


def _token_text(lc: Any, model: Any, token: int) -> str:
    if token < 0:
        return ""
    return _text(_piece(lc, lc.llama_model_get_vocab(model), token, True))
