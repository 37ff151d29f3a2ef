"""Per-request sampling on llama.cpp: the native sampler chain, JSON grammars and logprobs.

Each request in a batch gets its own chain (its own seed, penalties, grammar state), built here from the
request's SamplingParams; the scheduler samples every sequence of a step with its chain at that sequence's
row of the batch's logits.
"""

from __future__ import annotations

import ctypes
import json
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from server.engine.errors import EngineError, EngineRequestError
from server.engine.protocol import GenerationRequest, OutputConstraint, TokenLogprob, TopLogprob
from server.engine.vocab import token_piece

UINT32_SEEDS = 2**32 - 1  # 0xFFFFFFFF is LLAMA_DEFAULT_SEED ("random"), so seeds are reduced below it
_SCHEMA_PARAM = "response_format.json_schema.schema"


class GrammarCache:
    """GBNF for a constraint, compiled and checked against the vocabulary once per schema."""

    def __init__(self, lc: Any, vocab: Any, size: int = 64) -> None:
        self._lc = lc
        self._vocab = vocab
        self._size = size  # schemas repeat per client, not per request: a small cache suffices
        self._grammars: dict[str, str] = {}
        self._lock = threading.Lock()  # requests are prepared in a thread pool

    def gbnf(self, constraint: OutputConstraint) -> str:
        """The grammar for ``constraint``; a schema llama.cpp cannot express is an EngineRequestError."""
        from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

        key = json.dumps(constraint.schema, sort_keys=True) if constraint.schema is not None else ""
        with self._lock:
            cached = self._grammars.get(key)
        if cached is not None:
            return cached
        if constraint.schema is None:
            gbnf = JSON_GBNF
        else:
            try:
                gbnf = json_schema_to_gbnf(key)
            except Exception as exc:  # the converter raises bare Exception/ValueError/KeyError on bad schemas
                raise EngineRequestError(
                    f"the JSON schema cannot be turned into a grammar: {type(exc).__name__}: {exc}",
                    param=_SCHEMA_PARAM,
                ) from exc
        self.check(
            gbnf, param=_SCHEMA_PARAM, what="the JSON schema produced a grammar llama.cpp rejects; simplify the schema"
        )
        with self._lock:
            if len(self._grammars) >= self._size:
                self._grammars.pop(next(iter(self._grammars)))
            self._grammars[key] = gbnf
        return gbnf

    def check(self, gbnf: str, *, param: str, what: str | None = None) -> None:
        """Raise EngineRequestError when llama.cpp cannot parse ``gbnf`` (its log says where)."""
        sampler = self._lc.llama_sampler_init_grammar(self._vocab, gbnf.encode(), b"root")
        if not sampler:
            raise EngineRequestError(
                what or "llama.cpp cannot parse the GBNF grammar (a rule named root is required); check its syntax",
                param=param,
            )
        self._lc.llama_sampler_free(sampler)


def sampler_chain(lc: Any, vocab: Any, n_vocab: int, n_ctx_seq: int, request: GenerationRequest) -> Any:
    """logit bias -> penalties -> grammar -> (greedy | top-k -> top-p -> min-p -> temperature -> dist)."""
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
        add(lc.llama_sampler_init_logit_bias(n_vocab, len(s.logit_bias), biases), "logit bias")
    if s.presence_penalty or s.frequency_penalty:
        # OpenAI's penalties count every token generated so far: the window is the whole context.
        add(
            lc.llama_sampler_init_penalties(n_vocab, n_ctx_seq, 1.0, s.frequency_penalty, s.presence_penalty),
            "penalties",
        )
    triggers = request.constraint.triggers if request.constraint is not None else ()
    if request.grammar is not None and triggers:
        # Lazy: free text until a trigger pattern matches, then the grammar holds from the match on (tool calls).
        patterns = (ctypes.c_char_p * len(triggers))(*(t.encode() for t in triggers))
        add(
            lc.llama_sampler_init_grammar_lazy_patterns(
                vocab, request.grammar.encode(), b"root", patterns, len(triggers), None, 0
            ),
            "lazy grammar",
        )
    elif request.grammar is not None:
        add(lc.llama_sampler_init_grammar(vocab, request.grammar.encode(), b"root"), "grammar")
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


def logprobs_of_row(lc: Any, ctx: Any, vocab: Any, n_vocab: int, row: int, top_n: int) -> Callable[[int], TokenLogprob]:
    """Log-softmax of the model's raw logits at batch ``row`` (before any sampler), for the token sampled next."""
    ptr = lc.llama_get_logits_ith(ctx, row)
    logits = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float64)
    shift = logits.max()
    logprobs = logits - (shift + np.log(np.exp(logits - shift).sum()))
    top_ids: list[int] = []
    if top_n > 0:
        part = np.argpartition(-logprobs, top_n)[:top_n]
        top_ids = [int(i) for i in part[np.argsort(-logprobs[part])]]

    def finish(token: int) -> TokenLogprob:
        tops = []
        for i in top_ids:
            piece = token_piece(lc, vocab, i, special=True)
            tops.append(TopLogprob(_text(piece), piece, float(logprobs[i])))
        chosen = token_piece(lc, vocab, token, special=True)
        return TokenLogprob(_text(chosen), chosen, float(logprobs[token]), tuple(tops))

    return finish


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")
