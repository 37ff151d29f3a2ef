"""The bounded queue in front of each model: ``slots`` sequences run, at most ``max_waiting`` requests wait,
the rest 429.

A request reserves its place before the response starts (so a full queue is a clean 429/503 with
Retry-After), then waits for its slots inside the response: one per choice (a request for n choices runs on
n sequences at once). Slots are handed out first come, first served; a request for more slots than are
free waits, and the requests behind it wait too, so that it is not starved by smaller ones.
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType

from server.errors import QueueFullError


class AdmissionQueue:
    def __init__(self, slots: int, max_waiting: int, *, retry_after_s: int = 1, full_status: int = 429) -> None:
        if slots < 1:
            raise ValueError(f"a model needs at least one slot, got {slots}")
        self.slots = slots
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self.full_status = full_status
        self.running = 0  # slots in use
        self._waiters: deque[tuple[asyncio.Future[None], int]] = deque()
        self._reserved = 0  # admitted but not yet running (waiting, or about to ask for a slot)

    @property
    def waiting(self) -> int:
        return self._reserved

    def reserve(self, weight: int = 1) -> Admission:
        """Take a place in the queue for a request needing ``weight`` slots, or raise QueueFullError; the
        place is released by the Admission."""
        if weight > self.slots:
            raise ValueError(f"a request for {weight} slots can never run on {self.slots}")
        if self.running + self._reserved >= self.slots + self.max_waiting:
            raise QueueFullError(
                f"the model is busy: {self.running} request(s) running and {self._reserved} waiting, "
                f"the queue holds {self.max_waiting}; retry after {self.retry_after_s} s",
                retry_after_s=self.retry_after_s,
                status_code=self.full_status,
            )
        self._reserved += 1
        return Admission(self, weight)

    async def _acquire(self, weight: int) -> None:
        if self.running + weight <= self.slots and not self._waiters:
            self.running += weight
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (waiter, weight)
        self._waiters.append(entry)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release_slots(weight)  # we were handed the slots just as we were cancelled: pass them on
            else:
                self._waiters.remove(entry)
                self._hand_out()  # a smaller request behind this one may fit now
            raise

    def _release_slots(self, weight: int) -> None:
        self.running -= weight
        self._hand_out()

    def _hand_out(self) -> None:
        """Give free slots to the waiters at the head of the line, in order, while they fit."""
        while self._waiters:
            waiter, weight = self._waiters[0]
            if waiter.done():
                self._waiters.popleft()
                continue
            if self.running + weight > self.slots:
                return
            self._waiters.popleft()
            self.running += weight
            waiter.set_result(None)


class Admission:
    """One request's place: ``async with admission:`` waits for a slot and frees it on exit."""

    def __init__(self, queue: AdmissionQueue, weight: int = 1) -> None:
        self._queue = queue
        self._weight = weight
        self._state = "reserved"  # -> "running" -> "done"

    async def __aenter__(self) -> Admission:
        try:
            await self._queue._acquire(self._weight)
        except BaseException:
            self.release()
            raise
        self._queue._reserved -= 1
        self._state = "running"
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def release(self) -> None:
        """Give the place back; safe to call in any state and more than once."""
        if self._state == "reserved":
            self._queue._reserved -= 1
        elif self._state == "running":
            self._queue._release_slots(self._weight)
        self._state = "done"
