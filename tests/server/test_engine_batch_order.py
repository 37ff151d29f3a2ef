"""The batch scheduler driven directly on a real llama.cpp context: the rows of a step go in sequence-id
order, whatever order the requests were admitted in. With a cache per sequence llama.cpp cuts a batch into
micro-batches of consecutive sequence ids in the order the rows come (split_equal, sequential), one graph
evaluation each; rows in admission order made a 16-stream step several evaluations (docs/BENCHMARKS.md §4)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.engine.batching import BatchScheduler
from server.engine.protocol import FinishEvent, GenerationRequest, SamplingParams
from tuner import LoadSettings
from tuner.llamacpp import open_model

pytestmark = pytest.mark.llama

SEQUENCES = 4


@pytest.fixture(scope="module")
def scheduler(smollm2: Path) -> Iterator[BatchScheduler]:
    settings = LoadSettings(n_gpu_layers=0, n_ctx=SEQUENCES * 256, n_seq_max=SEQUENCES, n_threads=1)
    opened = open_model(smollm2, settings)
    finished: list[int] = []
    scheduler = BatchScheduler(
        opened,
        lambda events, _step, _stats: finished.extend(rid for rid, event in events if isinstance(event, FinishEvent)),
    )
    scheduler.finished = finished  # type: ignore[attr-defined]
    yield scheduler
    opened.close()


def request(first_token: int, max_tokens: int) -> GenerationRequest:
    # Distinct short prompts: no sequence holds another's prefix, so nothing is reused or copied.
    return GenerationRequest(
        prompt_tokens=(1, first_token, 300, 301), max_tokens=max_tokens, sampling=SamplingParams(temperature=0.0)
    )


def run_until_done(scheduler: Any, rids: set[int]) -> None:
    for _ in range(200):
        if rids <= set(scheduler.finished):
            return
        scheduler.step()
    raise AssertionError(f"requests {rids - set(scheduler.finished)} never finished")


def test_rows_go_in_sequence_id_order_not_admission_order(scheduler: Any) -> None:
    # Use sequences 0 and 1 first, so that the least recently used ones are 2 and 3: the next four requests
    # are then admitted into sequences 2, 3, 0, 1.
    scheduler.step([("submit", 1, request(400, 2)), ("submit", 2, request(401, 2))])
    run_until_done(scheduler, {1, 2})
    scheduler.step([("submit", 10 + i, request(500 + i, 40)) for i in range(SEQUENCES)])
    admitted = [active.slot.seq_id for active in sorted(scheduler._active.values(), key=lambda a: a.admitted)]
    assert admitted == [2, 3, 0, 1], admitted
    for _ in range(3):  # past the prompts: every row is one stream's next token
        scheduler.step()
    batch = scheduler._batch
    rows = [batch.seq_id[i][0] for i in range(batch.n_tokens)]
    assert rows == [0, 1, 2, 3], rows
    run_until_done(scheduler, {10, 11, 12, 13})
    stats = scheduler.stats()
    assert stats.busy_sequences == 0 and stats.kv_cells_untracked == 0
