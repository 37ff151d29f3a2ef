"""The batch scheduler driven directly on a real llama.cpp context: the rows of a step go in sequence-id
order, whatever order the requests were admitted in. With a cache per sequence llama.cpp cuts a batch into
micro-batches of consecutive sequence ids in the order the rows come (split_equal, sequential), one graph
evaluation each; rows in admission order made a 16-stream step several evaluations (docs/BENCHMARKS.md §4)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.engine.batching import MIN_TOKENS_TO_MOVE, BatchScheduler
from server.engine.protocol import FinishEvent, GenerationRequest, SamplingParams
from tuner import LoadSettings
from tuner.llamacpp import open_model

pytestmark = pytest.mark.llama

SEQUENCES = 4


@contextlib.contextmanager
def fresh_scheduler(model: Path, sequences: int, ctx_per_seq: int) -> Iterator[tuple[Any, dict[int, list[str]]]]:
    """A scheduler on its own context whose requests' text is gathered per request id (``finished`` lists
    the ids in the order they ended)."""
    settings = LoadSettings(n_gpu_layers=0, n_ctx=sequences * ctx_per_seq, n_seq_max=sequences, n_threads=1)
    opened = open_model(model, settings)
    texts: dict[int, list[str]] = {}
    finished: list[int] = []

    def emit(events: list[Any], _step: Any, _stats: Any) -> None:
        for rid, event in events:
            texts.setdefault(rid, []).append(event.text)
            if isinstance(event, FinishEvent):
                finished.append(rid)

    scheduler = BatchScheduler(opened, emit)
    scheduler.finished = finished  # type: ignore[attr-defined]
    try:
        yield scheduler, texts
    finally:
        opened.close()


@pytest.fixture(scope="module")
def scheduler(smollm2: Path) -> Iterator[BatchScheduler]:
    with fresh_scheduler(smollm2, SEQUENCES, 256) as (scheduler, _):
        yield scheduler


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
    # are then admitted into sequences 2, 3, 1, 0 (least recently used, next to the busy ones).
    scheduler.step([("submit", 1, request(400, 2)), ("submit", 2, request(401, 2))])
    run_until_done(scheduler, {1, 2})
    scheduler.step([("submit", 10 + i, request(500 + i, 40)) for i in range(SEQUENCES)])
    admitted = [active.slot.seq_id for active in sorted(scheduler._active.values(), key=lambda a: a.admitted)]
    assert admitted == [2, 3, 1, 0], admitted
    for _ in range(3):  # past the prompts: every row is one stream's next token
        scheduler.step()
    batch = scheduler._batch
    rows = [batch.seq_id[i][0] for i in range(batch.n_tokens)]
    assert rows == [0, 1, 2, 3], rows
    run_until_done(scheduler, {10, 11, 12, 13})
    stats = scheduler.stats()
    assert stats.busy_sequences == 0 and stats.kv_cells_untracked == 0


def test_new_requests_take_sequences_next_to_the_busy_ones(smollm2: Path) -> None:
    """Sequences freed in a scattered order (least recently used: 1, 3, 5, 7, ...) must not scatter the next
    requests: llama.cpp evaluates each run of consecutive sequence ids as a graph of its own."""
    with fresh_scheduler(smollm2, 8, 128) as (scheduler, _):
        # Eight requests that end after different numbers of tokens: sequence i ends after steps[i].
        steps = [8, 1, 7, 2, 6, 3, 5, 4]
        scheduler.step([("submit", i, request(600 + i, steps[i])) for i in range(8)])
        assert scheduler.finished == [1]  # request i holds sequence i; request 1 ended at its first token
        assert {a.rid: a.slot.seq_id for a in scheduler._active.values()} == {i: i for i in range(8) if i != 1}
        run_until_done(scheduler, set(range(8)))
        scheduler.step([("submit", 100 + i, request(700 + i, 20)) for i in range(4)])
        taken = sorted(a.slot.seq_id for a in scheduler._active.values())
        assert taken == list(range(taken[0], taken[0] + 4)), taken  # one run of consecutive ids
        assert taken == [1, 2, 3, 4]  # the least recently used (1), then its least recently used neighbours
        run_until_done(scheduler, {100, 101, 102, 103})


def test_streams_move_to_close_holes_and_answer_as_alone(smollm2: Path) -> None:
    """Requests 1, 3 and 5 end early and leave holes at sequences 1, 3, 5 between streams that go on: the
    streams on 6 and 7 move into 1 and 3 (one run, 0-4), answer exactly as they would alone, and the idle
    conversation cached in sequence 3 is kept in another sequence, not overwritten."""
    long_tokens = MIN_TOKENS_TO_MOVE + 24
    limits = [long_tokens, 2, long_tokens, 2, long_tokens, 2, long_tokens, long_tokens]
    with fresh_scheduler(smollm2, 8, 256) as (scheduler, texts):
        scheduler.step([("submit", i, request(800 + i, limits[i])) for i in range(8)])
        while not {1, 3, 5} <= set(scheduler.finished):
            scheduler.step()
        idle_three = list(scheduler._slots[3].tokens)  # request 3's conversation, cached in sequence 3
        scheduler.step()  # admission, then the holes close
        where = {a.rid: a.slot.seq_id for a in scheduler._active.values()}
        assert sorted(where.values()) == [0, 1, 2, 3, 4], where
        assert where[0] == 0 and where[2] == 2 and where[4] == 4  # those already in the window stay
        kept = [s.seq_id for s in scheduler._slots if s.active is None and s.tokens == idle_three]
        assert kept, "the idle conversation of sequence 3 was overwritten"
        run_until_done(scheduler, {0, 2, 4, 6, 7})
        stats = scheduler.stats()
        assert stats.busy_sequences == 0 and stats.kv_cells_untracked == 0
        # Request 3's next turn finds its conversation cached.
        follow_up = dataclasses.replace(request(0, 4), prompt_tokens=(*idle_three, 302, 303))
        scheduler.step([("submit", 300, follow_up)])
        (active,) = scheduler._active.values()
        assert active.cached == len(idle_three)
        run_until_done(scheduler, {300})
        # The same requests alone, without any cache: the same text.
        for rid in (0, 2, 4, 6, 7):
            alone = 100 + rid
            solo = dataclasses.replace(request(800 + rid, limits[rid]), cache_prompt=False)
            scheduler.step([("submit", alone, solo)])
            run_until_done(scheduler, {alone})
            assert "".join(texts[alone]) == "".join(texts[rid]), rid


def test_a_stream_about_to_end_stays_and_the_others_move_around_it(smollm2: Path) -> None:
    """A stream with fewer than MIN_TOKENS_TO_MOVE tokens left is not moved (its copy would not pay): the
    window of consecutive ids is chosen around it. Sequences 0, 2 and 3 busy after request 1 ends, request 3
    near its end: request 0 moves from 0 to 1 (busy 1-3), rather than request 3 from 3 to 1."""
    limits = [MIN_TOKENS_TO_MOVE + 24, 2, MIN_TOKENS_TO_MOVE + 24, 12]
    with fresh_scheduler(smollm2, 8, 128) as (scheduler, _):
        scheduler.step([("submit", i, request(900 + i, limits[i])) for i in range(4)])
        while 1 not in scheduler.finished:
            scheduler.step()
        scheduler.step()
        where = {a.rid: a.slot.seq_id for a in scheduler._active.values()}
        assert where == {0: 1, 2: 2, 3: 3}, where
        run_until_done(scheduler, {0, 2, 3})
        assert scheduler.stats().kv_cells_untracked == 0


def test_cells_the_engine_does_not_track_show_once_nothing_runs(smollm2: Path) -> None:
    """The check of the engine's cell accounting against llama.cpp's runs every CHECK_CELLS_EVERY steps while
    requests run, and at every step that leaves nothing running: a cell llama.cpp holds that no request put
    there (a leak) shows in the stats of the first step after the batch empties."""
    with fresh_scheduler(smollm2, SEQUENCES, 64) as (scheduler, _):
        lc = scheduler._lc
        batch = lc.llama_batch_init(1, 0, 1)  # one cell of the last sequence, behind the engine's back
        try:
            batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.logits[0] = 1, 0, 1, False
            batch.seq_id[0][0] = SEQUENCES - 1
            batch.n_tokens = 1
            assert lc.llama_decode(scheduler._ctx, batch) == 0
        finally:
            lc.llama_batch_free(batch)
        scheduler.step([("submit", 0, request(950, 3))])
        assert scheduler._active[(0, 0)].slot.seq_id != SEQUENCES - 1
        assert scheduler.stats_snapshot().kv_cells_untracked == 0, "a step with a request running skips the check"
        run_until_done(scheduler, {0})
        assert scheduler.stats_snapshot().kv_cells_untracked == 1
