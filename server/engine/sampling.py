"""Per-request sampling on llama.cpp: the native sampler chain, JSON grammars and logprobs.

Each request in a batch gets its own RequestSampler (its own seed, penalties, grammar state), built here from
the request's SamplingParams; the scheduler samples every sequence of a step with it at that sequence's row of
the batch's logits.
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


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data


class RequestSampler:
    """One request's sampling, in llama.cpp's own order (common/sampling.cpp): the chain picks a token from the
    raw logits, the grammar only checks that one token, and only a token the grammar refuses makes the grammar
    filter the whole vocabulary before the chain picks again. A grammar pass over the whole vocabulary costs
    milliseconds per token (6-13 ms on SmolLM2's 49,152 tokens), as long as a step of the batch, where checking
    one token costs microseconds. Greedy answers are the same as with the grammar first (the best token the
    grammar allows, either way)."""

    def __init__(self, lc: Any, vocab: Any, n_vocab: int, n_ctx_seq: int, request: GenerationRequest) -> None:
        self._lc = lc
        self._n_vocab = n_vocab
        self._logits_type = ctypes.c_float * n_vocab  # a view of one row of llama.cpp's logits
        self.greedy = GreedyPick.of(request, n_vocab)
        self.grammar: Any = grammar_sampler(lc, vocab, request)
        try:
            self.chain: Any = sampler_chain(lc, n_vocab, n_ctx_seq, request)
        except BaseException:
            if self.grammar is not None:
                lc.llama_sampler_free(self.grammar)
            raise
        if self.grammar is not None:
            # The candidate arrays are allocated once per request, not once per token.
            self._ids = np.arange(n_vocab, dtype=np.int32)
            self._candidates = np.zeros(n_vocab, dtype=_TOKEN_DATA)
            data = self._candidates.ctypes.data_as(ctypes.POINTER(lc.llama_token_data))
            self._all = lc.llama_token_data_array(data, n_vocab, -1, False)
            self._one = lc.llama_token_data()
            self._single = lc.llama_token_data_array(ctypes.pointer(self._one), 1, -1, False)

    def sample(self, ctx: Any, row: int) -> int:
        """Sample at batch ``row`` of ``ctx``'s logits and accept the token into the chain (and grammar)."""
        lc = self._lc
        if self.greedy is not None:
            token = self.greedy.pick(self._logits(ctx, row))
            if token is not None:  # None: NaN logits, which llama.cpp's own scan decides
                return token
        if self.grammar is None:
            return int(lc.llama_sampler_sample(self.chain, ctx, row))
        logits = self._logits(ctx, row)
        token = self._pick(logits, grammar_first=False)
        self._one.id, self._one.logit, self._one.p = token, 1.0, 0.0
        self._single.size, self._single.selected, self._single.sorted = 1, -1, False
        lc.llama_sampler_apply(self.grammar, ctypes.byref(self._single))
        if self._one.logit == -np.inf:  # the grammar refuses it: filter the whole vocabulary, then pick again
            token = self._pick(logits, grammar_first=True)
        lc.llama_sampler_accept(self.grammar, token)
        lc.llama_sampler_accept(self.chain, token)
        return token

    def _logits(self, ctx: Any, row: int) -> Any:
        """The logits of batch ``row`` as a NumPy view (numpy.ctypeslib.as_array builds the same view at a
        few times the cost, once per token of every stream)."""
        pointer = self._lc.llama_get_logits_ith(ctx, row)
        row_array: Any = self._logits_type.from_address(ctypes.addressof(pointer.contents))  # a buffer to NumPy
        return np.frombuffer(row_array, dtype=np.float32)

    def _pick(self, logits: Any, *, grammar_first: bool) -> int:
        candidates, array = self._candidates, self._all
        # Samplers sort and shrink the array in place: every pass starts from the whole vocabulary in id order.
        candidates["id"] = self._ids
        candidates["logit"] = logits
        candidates["p"] = 0.0
        array.size, array.selected, array.sorted = self._n_vocab, -1, False
        if grammar_first:
            self._lc.llama_sampler_apply(self.grammar, ctypes.byref(array))
        self._lc.llama_sampler_apply(self.chain, ctypes.byref(array))
        return int(array.data[array.selected].id)

    def free(self) -> None:
        for sampler in (self.chain, self.grammar):
            if sampler is not None:
                self._lc.llama_sampler_free(sampler)
        self.chain = self.grammar = None


class GreedyPick:
    """llama.cpp's greedy chain (logit bias, then the first highest logit) in NumPy, for requests that need
    nothing else: temperature 0, no penalties, no grammar, the usual request of a benchmark or an agent.

    ``llama_sampler_sample`` copies the whole vocabulary into an array of (id, logit, p) and scans it: about
    0.1 ms per token on SmolLM2's 49,152 tokens, in the scheduler thread between two decodes, so once per
    stream per step. An argmax over the logits themselves picks the same token in a fraction of that: the bias
    is added in float32 as llama.cpp adds it, and ``argmax`` returns the first of equal maxima as its strict
    ``>`` scan does. Neither sampler of that chain keeps state, so skipping the chain's accept changes nothing.
    NaN logits (a broken model) are left to llama.cpp, whose scan treats them differently."""

    __slots__ = ("_biases", "_ids")

    def __init__(self, request: GenerationRequest) -> None:
        bias = request.sampling.logit_bias
        self._ids = np.fromiter(bias.keys(), dtype=np.intp, count=len(bias))
        self._biases = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))

    @classmethod
    def of(cls, request: GenerationRequest, n_vocab: int) -> GreedyPick | None:
        """The fast path for ``request``, or None when it needs llama.cpp's chain (which also ignores a bias
        on an id outside the vocabulary, where NumPy would index from the end)."""
        s = request.sampling
        plain = s.temperature == 0.0 and not s.presence_penalty and not s.frequency_penalty
        in_vocabulary = all(0 <= token < n_vocab for token in s.logit_bias)
        return cls(request) if plain and in_vocabulary and request.grammar is None else None

    def pick(self, logits: Any) -> int | None:
        """The token llama.cpp's greedy chain picks from ``logits`` (float32, one per vocabulary id), or None
        when the winner is NaN. The bias goes on the few biased logits in place and comes off again before this
        returns (the other choices of the request read the same row): a copy of the whole row would cost more
        than the pick."""
        if not len(self._ids):
            token = int(logits.argmax())
            winner = logits[token]
        else:
            ids = self._ids
            saved = logits[ids]
            logits[ids] = saved + self._biases
            try:
                token = int(logits.argmax())
                winner = logits[token]
            finally:
                logits[ids] = saved
        return None if np.isnan(winner) else token


def grammar_sampler(lc: Any, vocab: Any, request: GenerationRequest) -> Any:
    """The request's grammar sampler (lazy when the constraint has trigger patterns), or None."""
    if request.grammar is None:
        return None
    triggers = request.constraint.triggers if request.constraint is not None else ()
    if triggers:
        # Lazy: free text until a trigger pattern matches, then the grammar holds from the match on (tool calls).
        patterns = (ctypes.c_char_p * len(triggers))(*(t.encode() for t in triggers))
        sampler = lc.llama_sampler_init_grammar_lazy_patterns(
            vocab, request.grammar.encode(), b"root", patterns, len(triggers), None, 0
        )
    else:
        sampler = lc.llama_sampler_init_grammar(vocab, request.grammar.encode(), b"root")
    if not sampler:
        raise EngineError("llama.cpp could not create the grammar sampler")
    return sampler


def sampler_chain(lc: Any, n_vocab: int, n_ctx_seq: int, request: GenerationRequest) -> Any:
    """logit bias -> penalties -> (greedy | top-k -> top-p -> min-p -> temperature -> dist); the grammar is not
    in the chain: RequestSampler keeps it apart."""
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
