"""Embeddings in the engine process: one llama_context of an embedding model, many requests encoded together.

An encoder (BERT and its family) has no KV cache and attends over the whole batch at once, so llama.cpp
encodes every batch in one micro-batch: a batch holds at most ``n_ubatch`` tokens and ``n_seq_max``
sequences, one sequence per input, and llama.cpp pools each sequence as the GGUF says (mean, CLS, last).
The runner's thread owns the context (contexts are not thread-safe); callers hand it jobs and wait:

  Step 1: take every job waiting (several requests' inputs are packed into the same batches).
  Step 2: pack the inputs in arrival order: a batch closes when the next input would pass ``n_ubatch`` tokens
          or ``n_seq_max`` sequences.
  Step 3: llama_decode each batch and copy out one pooled vector per sequence (float32, as llama.cpp gives it).
  Step 4: hand each job its vectors; a failed batch fails only the jobs with inputs in it.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.engine.errors import EngineError, EngineRequestError
from server.engine.protocol import ModelFacts

log = logging.getLogger("llamasplit.engine")

# enum llama_pooling_type, as the HTTP layer names it
POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
# Pooling types that give one vector per input, the only shape OpenAI's embeddings have.
SEQUENCE_POOLING = ("mean", "cls", "last")


@dataclass
class _Job:
    inputs: Sequence[Sequence[int]]
    future: concurrent.futures.Future[list[bytes]]


def embedding_facts(opened: Any) -> ModelFacts:
    """What the HTTP layer needs to know of an embedding model opened by ``tuner.llamacpp.open_model``."""
    from server.engine.vocab import llama_cpp

    lc = llama_cpp()
    n_ubatch = int(lc.llama_n_ubatch(opened.ctx))
    n_ctx_train = int(lc.llama_model_n_ctx_train(opened.model))
    return ModelFacts(
        n_ctx=n_ubatch,
        # one input must fit one micro-batch, and positions past the training context have no position row
        n_ctx_seq=min(n_ubatch, n_ctx_train) if n_ctx_train > 0 else n_ubatch,
        n_seq_max=int(lc.llama_n_seq_max(opened.ctx)),
        n_vocab=int(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(opened.model))),
        kv_unified=False,
        embeddings=True,
        n_embd=int(lc.llama_model_n_embd(opened.model)),
        pooling=POOLING_NAMES.get(int(lc.llama_pooling_type(opened.ctx)), "none"),
    )


class EmbeddingRunner:
    """Encodes inputs on one embedding model's context; thread-safe ``embed``. See the module docstring."""

    def __init__(self, opened: Any, *, name: str = "model") -> None:
        """``opened`` is a tuner.llamacpp.OpenedModel created with ``embeddings=True``."""
        from server.engine.vocab import llama_cpp

        self._lc = llama_cpp()
        self._opened = opened
        self.name = name
        self.facts = embedding_facts(opened)
        if self.facts.pooling not in SEQUENCE_POOLING:
            raise EngineError(
                f"{name} pools its embeddings as {self.facts.pooling!r}, which gives no one vector per input; "
                f"serve an embedding model whose GGUF pools by {', '.join(SEQUENCE_POOLING)}"
            )
        self._batch = self._lc.llama_batch_init(self.facts.n_ctx, 0, 1)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"embed-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the batch in hand, fail the jobs still waiting, and free the batch (the caller frees the model)."""
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.set_exception(EngineError(f"model {self.name} was unloaded"))
        if self._batch is not None:
            self._lc.llama_batch_free(self._batch)
            self._batch = None

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[bytes]:
        """One pooled vector per input as float32 little-endian bytes; blocks until they are computed."""
        limit = self.facts.n_ctx_seq
        for index, tokens in enumerate(inputs):
            if not tokens:
                raise EngineRequestError(f"input[{index}] has no tokens", param="input")
            if len(tokens) > limit:
                raise EngineRequestError(
                    f"input[{index}] is {len(tokens):,} tokens; this model encodes at most {limit:,} per input",
                    param="input",
                )
            bad = next((t for t in tokens if not 0 <= t < self.facts.n_vocab), None)
            if bad is not None:
                raise EngineRequestError(
                    f"input[{index}] holds token id {bad}, but this model's ids run from 0 to {self.facts.n_vocab - 1}",
                    param="input",
                )
        if self._thread is None:
            raise EngineError(f"model {self.name} is not running")
        job = _Job(inputs, concurrent.futures.Future())
        self._jobs.put(job)
        return job.future.result()

    # -- the runner's thread --

    def _run(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                return
            jobs = [first]
            stopping = False
            # Step 1: everything waiting rides along.
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                jobs.append(job)
            self._serve(jobs)
            if stopping:
                return

    def _serve(self, jobs: list[_Job]) -> None:
        results: list[list[bytes | None]] = [[None] * len(job.inputs) for job in jobs]
        failed: dict[int, Exception] = {}
        items = [(j, i, tokens) for j, job in enumerate(jobs) for i, tokens in enumerate(job.inputs)]
        # Step 2: pack in arrival order; Step 3: encode each batch.
        batch: list[tuple[int, int, Sequence[int]]] = []
        n_tokens = 0
        for item in [*items, None]:
            full = item is not None and (
                n_tokens + len(item[2]) > self.facts.n_ctx or len(batch) == self.facts.n_seq_max
            )
            if batch and (item is None or full):
                try:
                    vectors = self._encode([tokens for _, _, tokens in batch])
                except Exception as exc:  # the thread must live on: a job left without an answer waits forever
                    if not isinstance(exc, EngineError):
                        log.exception("%s: encoding a batch of %d inputs failed", self.name, len(batch))
                        exc = EngineError(f"encoding failed inside the engine: {exc}")
                    for j, _, _ in batch:
                        failed[j] = exc
                else:
                    for (j, i, _), vector in zip(batch, vectors, strict=True):
                        results[j][i] = vector
                batch, n_tokens = [], 0
            if item is not None:
                batch.append(item)
                n_tokens += len(item[2])
        # Step 4.
        for j, job in enumerate(jobs):
            if j in failed:
                job.future.set_exception(failed[j])
            else:
                job.future.set_result([v for v in results[j] if v is not None])

    def _encode(self, inputs: Sequence[Sequence[int]]) -> list[bytes]:
        lc, ctx, batch = self._lc, self._opened.ctx, self._batch
        n = 0
        for seq_id, tokens in enumerate(inputs):
            for pos, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq_id
                batch.logits[n] = True  # pooling reads every token's output
                n += 1
        batch.n_tokens = n
        rc = lc.llama_decode(ctx, batch)
        if rc != 0:
            raise EngineError(f"llama_decode returned {rc} for a batch of {n} tokens in {len(inputs)} inputs")
        n_embd = self.facts.n_embd
        vectors = []
        for seq_id in range(len(inputs)):
            pointer = lc.llama_get_embeddings_seq(ctx, seq_id)
            if not pointer:
                raise EngineError(f"llama.cpp returned no pooled embedding for sequence {seq_id}")
            row = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(n_embd,))
            vectors.append(row.astype("<f4").tobytes())
        memory = lc.llama_get_memory(ctx)
        if memory:  # an embedding model that keeps a cache (decoder-based) must not see the last batch again
            lc.llama_memory_clear(memory, True)
        return vectors
