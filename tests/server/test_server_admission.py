"""AdmissionQueue: slots run first come first served, a bounded number wait, the rest get QueueFullError."""

from __future__ import annotations

import asyncio

import pytest

from server.admission import AdmissionQueue
from server.errors import QueueFullError


def test_queue_admits_slots_plus_waiting_then_refuses_with_retry_after() -> None:
    queue = AdmissionQueue(slots=1, max_waiting=2, retry_after_s=7)
    held = [queue.reserve() for _ in range(3)]
    with pytest.raises(QueueFullError) as info:
        queue.reserve()
    assert info.value.status_code == 429
    assert info.value.headers == {"Retry-After": "7"}
    assert "1 request(s) running" not in info.value.message  # nothing runs yet: all three only wait
    for admission in held:
        admission.release()
    assert queue.waiting == 0 and queue.running == 0


def test_queue_full_status_can_be_503() -> None:
    queue = AdmissionQueue(slots=1, max_waiting=0, full_status=503)
    queue.reserve()
    with pytest.raises(QueueFullError) as info:
        queue.reserve()
    assert info.value.status_code == 503


def test_slots_are_handed_out_in_arrival_order() -> None:
    async def run() -> list[int]:
        queue = AdmissionQueue(slots=1, max_waiting=10)
        order: list[int] = []

        async def worker(i: int) -> None:
            async with queue.reserve():
                order.append(i)
                await asyncio.sleep(0.01)

        await asyncio.gather(*(worker(i) for i in range(5)))
        assert queue.running == 0 and queue.waiting == 0
        return order

    assert asyncio.run(run()) == [0, 1, 2, 3, 4]


def test_cancelled_waiter_gives_up_its_place_and_the_slot_moves_on() -> None:
    async def run() -> None:
        queue = AdmissionQueue(slots=1, max_waiting=2)
        first = queue.reserve()
        await first.__aenter__()
        second = queue.reserve()
        waiting = asyncio.ensure_future(second.__aenter__())
        await asyncio.sleep(0)
        assert queue.waiting == 1
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert queue.waiting == 0
        third = queue.reserve()
        entered = asyncio.ensure_future(third.__aenter__())
        await asyncio.sleep(0)
        assert not entered.done()
        first.release()
        await asyncio.wait_for(entered, 1)
        assert queue.running == 1
        third.release()
        assert queue.running == 0

    asyncio.run(run())


def test_release_is_idempotent_in_every_state() -> None:
    queue = AdmissionQueue(slots=2, max_waiting=0)
    a = queue.reserve()
    a.release()
    a.release()
    assert queue.waiting == 0

    async def run() -> None:
        b = queue.reserve()
        async with b:
            assert queue.running == 1
            b.release()
            assert queue.running == 0
        assert queue.running == 0

    asyncio.run(run())
