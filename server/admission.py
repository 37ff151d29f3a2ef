"""The bounded queue in front of each model: ``slots`` requests run, at most ``max_waiting`` wait, the rest 429.

A request reserves its place before the response starts (so a full queue is a clean 429/503 with
Retry-After), then waits for a slot inside the response. Slots are handed out first come, first served.
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
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._reserved = 0  # admitted but not yet running (waiting, or about to ask for a slot)

    @property
    def waiting(self) -> int:
        return self._reserved

    def reserve(self) -> Admission:
        """Take a place in the queue or raise QueueFullError; the place is released by the Admission."""
        if self.running + self._reserved >= self.slots + self.max_waiting:
            raise QueueFullError(
                f"the model is busy: {self.running} request(s) running and {self._reserved} waiting, "
                f"the queue holds {self.max_waiting}; retry after {self.retry_after_s} s",
                retry_after_s=self.retry_after_s,
                status_code=self.full_status,
            )
        self._reserved += 1
        return Admission(self)

    async def _acquire(self) -> None:
        if self.running < self.slots and not self._waiters:
            self.running += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()  # we were handed the slot just as we were cancelled: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    def _release_slot(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter; running stays the same
                return
        self.running -= 1


class Admission:
    """One request's place: ``async with admission:`` waits for a slot and frees it on exit."""

    def __init__(self, queue: AdmissionQueue) -> None:
        self._queue = queue
        self._state = "reserved"  # -> "running" -> "done"

    async def __aenter__(self) -> Admission:
        try:
            await self._queue._acquire()
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
            self._queue._release_slot()
        self._state = "done"
