"""The greedy fast path (server.engine.sampling.GreedyPick) picks exactly what llama.cpp's greedy chain picks.

It replaces ``llama_sampler_sample`` with a NumPy argmax for temperature-0 requests without penalties or a
grammar, so every such answer depends on it: it is held against llama.cpp's own logit-bias + greedy chain on
crafted logits (ties, -inf and huge biases, the first and last ids) and on a real model's logits.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.engine.protocol import GenerationRequest, SamplingParams
from server.engine.sampling import GreedyPick, RequestSampler, sampler_chain
from server.engine.vocab import llama_cpp
from tuner import LoadSettings
from tuner.llamacpp import open_model

N_VOCAB = 4096


def request(temperature: float = 0.0, bias: dict[int, float] | None = None, **sampling: Any) -> GenerationRequest:
    params = SamplingParams(temperature=temperature, logit_bias=bias or {}, **sampling)
    return GenerationRequest(prompt_tokens=(1,), max_tokens=8, sampling=params)


def llama_greedy(logits: np.ndarray, bias: dict[int, float]) -> int:
    """llama.cpp's chain (logit bias -> greedy) applied to ``logits`` as llama_sampler_sample applies it."""
    lc = llama_cpp()
    chain = sampler_chain(lc, len(logits), 0, request(bias=bias))
    try:
        data = (lc.llama_token_data * len(logits))()
        for token, logit in enumerate(logits):
            data[token] = lc.llama_token_data(token, float(logit), 0.0)
        array = lc.llama_token_data_array(data, len(logits), -1, False)
        lc.llama_sampler_apply(chain, ctypes.byref(array))
        return int(data[array.selected].id)
    finally:
        lc.llama_sampler_free(chain)


def crafted_cases() -> Iterator[tuple[str, np.ndarray, dict[int, float]]]:
    rng = np.random.default_rng(7)
    for i in range(20):
        yield f"random {i}", rng.normal(0, 4, N_VOCAB).astype(np.float32), {}
    tied = np.zeros(N_VOCAB, dtype=np.float32)
    tied[[17, 900, 4000]] = 3.5
    yield "ties: the first maximum", tied, {}
    yield "bias breaks a tie", tied, {900: 1e-3}
    yield "bias forbids the maximum", tied, {17: float("-inf"), 900: -100.0}
    flat = np.full(N_VOCAB, -2.0, dtype=np.float32)
    yield "bias on the last id", flat, {N_VOCAB - 1: 0.5}
    yield "zero biases change nothing", flat, {0: 0.0, 5: -0.0}
    spread = rng.normal(0, 1, N_VOCAB).astype(np.float32)
    best = int(spread.argmax())
    # Lands exactly on the maximum in float32 (as llama.cpp adds it): the first id of the tie must win.
    yield "bias lands on a tie in float32", spread, {best + 1: float(spread[best] - spread[best + 1])}
    ids, biases = rng.integers(0, N_VOCAB, 300), rng.normal(0, 3, 300)
    yield "many biases", spread, {int(t): float(b) for t, b in zip(ids, biases, strict=True)}


@pytest.mark.parametrize(("logits", "bias"), [pytest.param(lg, b, id=name) for name, lg, b in crafted_cases()])
def test_greedy_pick_is_llama_cpp_greedy(logits: np.ndarray, bias: dict[int, float]) -> None:
    picker = GreedyPick.of(request(bias=bias), N_VOCAB)
    assert picker is not None
    before = logits.copy()
    assert picker.pick(logits) == llama_greedy(logits, bias)
    assert np.array_equal(logits, before), "the logits buffer belongs to llama.cpp: the bias goes on a copy"


def test_nan_logits_are_left_to_llama_cpp() -> None:
    logits = np.ones(N_VOCAB, dtype=np.float32)
    logits[3] = np.nan
    picker = GreedyPick.of(request(), N_VOCAB)
    assert picker is not None and picker.pick(logits) is None


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(request(temperature=0.7), id="temperature"),
        pytest.param(request(presence_penalty=0.5), id="presence penalty"),
        pytest.param(request(frequency_penalty=0.5), id="frequency penalty"),
        pytest.param(
            GenerationRequest(prompt_tokens=(1,), max_tokens=8, sampling=SamplingParams(temperature=0.0), grammar="x"),
            id="grammar",
        ),
        pytest.param(request(bias={N_VOCAB: -100.0}), id="bias past the vocabulary"),
        pytest.param(request(bias={-1: 5.0}), id="negative bias id"),
    ],
)
def test_only_plain_greedy_requests_take_the_fast_path(other: GenerationRequest) -> None:
    assert GreedyPick.of(other, N_VOCAB) is None


def test_real_logits_pick_what_llama_sampler_sample_picks(smollm2: Path) -> None:
    """Twelve steps of a real model's logits: the fast path and llama.cpp's chain agree at every one, with and
    without a bias that forbids the best token."""
    lc = llama_cpp()
    opened = open_model(smollm2, LoadSettings(n_gpu_layers=0, n_ctx=256, n_seq_max=1, n_threads=2))
    try:
        vocab = lc.llama_model_get_vocab(opened.model)
        n_vocab = lc.llama_vocab_n_tokens(vocab)
        ctx = opened.ctx
        batch = lc.llama_batch_get_one((lc.llama_token * 3)(1, 504, 3458), 3)
        assert lc.llama_decode(ctx, batch) == 0
        for _ in range(12):
            logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
            best = int(logits.argmax())
            for bias in ({}, {best: float("-inf")}, {best: -1.0, 0: 2.0}):
                fast = RequestSampler(lc, vocab, n_vocab, 256, request(bias=bias))
                chain = sampler_chain(lc, n_vocab, 256, request(bias=bias))
                try:
                    assert fast.greedy is not None
                    assert fast.sample(ctx, -1) == lc.llama_sampler_sample(chain, ctx, -1)
                finally:
                    fast.free()
                    lc.llama_sampler_free(chain)
            nxt = (lc.llama_token * 1)(best)
            assert lc.llama_decode(ctx, lc.llama_batch_get_one(nxt, 1)) == 0
    finally:
        opened.close()
