"""The event loop reads the engine process's messages itself (server.engine.client._FrameReader): the bytes
that multiprocessing's Connection.send writes, cut wherever the socket cuts them, give back every message, in
order, once; and a process read by a loop serves a real stream and reports the worker's death after the
events it sent."""

from __future__ import annotations

import asyncio
import pickle
import random
import socket
import threading
from multiprocessing.connection import Connection
from typing import Any

import pytest

from server.engine.client import WorkerProcess, _FrameReader
from server.engine.errors import EngineDeadError


class _Recorder:
    name = "frames"

    def __init__(self) -> None:
        self.messages: list[Any] = []

    def _dispatch(self, message: Any) -> None:
        self.messages.append(message)


def sent_bytes(messages: list[Any]) -> bytes:
    """What Connection.send puts on the wire for ``messages``."""
    ours, theirs = socket.socketpair()
    received = bytearray()

    def drain() -> None:
        while chunk := theirs.recv(1 << 16):
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    conn = Connection(ours.detach())
    for message in messages:
        conn.send(message)
    conn.close()
    reader.join()
    theirs.close()
    return bytes(received)


def test_messages_come_back_whole_and_in_order_however_the_bytes_are_cut() -> None:
    messages = [("step", "m", [(i, "x" * (i * 37 % 500))], None, None) for i in range(200)]
    messages.append(("reply", 7, True, b"\0" * 300_000))  # larger than a socket buffer
    wire = sent_bytes(messages)
    rng = random.Random(3)
    for _ in range(5):
        recorder = _Recorder()
        reader = _FrameReader(recorder)  # type: ignore[arg-type]
        start = 0
        while start < len(wire):
            end = min(len(wire), start + rng.choice([1, 3, 4, 5, 11, 4096, 70_000]))
            reader.data_received(wire[start:end])
            start = end
        assert recorder.messages == messages


def test_the_long_header_form_is_read() -> None:
    # Connection.send writes -1 and an 8-byte length for messages over 2 GiB; the reader takes that form.
    payload = pickle.dumps(("reply", 1, True, "long form"))
    recorder = _Recorder()
    reader = _FrameReader(recorder)  # type: ignore[arg-type]
    frame = (-1).to_bytes(4, "big", signed=True) + len(payload).to_bytes(8, "big") + payload
    reader.data_received(frame[:6])
    reader.data_received(frame[6:])
    assert recorder.messages == [("reply", 1, True, "long form")]


def test_a_message_that_cannot_be_read_is_skipped_and_the_next_one_arrives(caplog: pytest.LogCaptureFixture) -> None:
    recorder = _Recorder()
    reader = _FrameReader(recorder)  # type: ignore[arg-type]
    garbage = b"not a pickle"
    good = pickle.dumps(("reply", 2, True, None))
    reader.data_received(len(garbage).to_bytes(4, "big") + garbage + len(good).to_bytes(4, "big") + good)
    assert recorder.messages == [("reply", 2, True, None)]
    assert "could not be read" in caplog.text


def test_a_process_read_by_the_loop_answers_calls_and_reports_its_death() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with pytest.raises(RuntimeError, match="off that loop"):
            WorkerProcess("on-loop", log_level="WARNING", loop=loop)
        process = await asyncio.to_thread(WorkerProcess, "loop-read", log_level="WARNING", loop=loop)
        died = asyncio.Event()
        process.on_death(lambda _reason: loop.call_soon_threadsafe(died.set))
        assert await asyncio.to_thread(process.call, "ping", timeout_s=60) == process.pid
        # A request for a model the worker does not hold is answered by an error event through the loop.
        rid, stream = process.submit("absent", _request())
        event = await asyncio.wait_for(stream.queue.get(), 30)
        assert "not loaded" in event.message and not event.dead
        process.forget(rid)
        _, waiting = process.submit("absent-too", _request())
        await asyncio.to_thread(process.call, "ping", timeout_s=60)  # answered after the submit: it was read
        process.kill()
        await asyncio.wait_for(died.wait(), 30)
        first = await asyncio.wait_for(waiting.queue.get(), 30)
        then = await asyncio.wait_for(waiting.queue.get(), 30)
        assert "not loaded" in first.message and not first.dead
        assert then.dead and "gone" in then.message
        with pytest.raises(EngineDeadError):
            await asyncio.to_thread(process.call, "ping", timeout_s=5)

    asyncio.run(main())


def _request() -> Any:
    from server.engine.protocol import GenerationRequest

    return GenerationRequest(prompt_tokens=(1, 2, 3), max_tokens=1)
