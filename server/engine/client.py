"""The HTTP process's side of the engine: the worker process it talks to, and the Engine of one model in it.

``WorkerProcess`` starts ``python -m server.engine.worker``, sends it calls and requests, and routes what it
sends back: replies to the waiting caller, each step's events to the asyncio queue of each request, step
statistics to the observer. When the worker exits (a crash inside llama.cpp, a dead RPC server, a kill), every
call and request in flight ends with EngineDeadError and the death callbacks run.

What the worker sends is read by the server's event loop itself when the process is given one (``loop=``):
a token then costs one wake-up of the loop, where a reader thread costs a wake-up of that thread, a hand-over
of the GIL and a second wake-up of the loop; on a machine whose cores llama.cpp's threads fill, that CPU comes
out of the decode (docs/BENCHMARKS.md §4). Without a loop (tests, tools) a reader thread does the same work.

``WorkerEngine`` is one model in a worker: it tokenizes here (``Tokenizer``, the vocabulary alone) and
generates there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from server.engine.errors import EngineDeadError, EngineError, EngineRequestError
from server.engine.protocol import (
    EngineStats,
    ErrorEvent,
    FinishEvent,
    GenerationEvent,
    GenerationRequest,
    ModelFacts,
    StepStats,
    TemplateFacts,
    TemplateSource,
    TokenEvent,
)
from server.engine.vocab import Tokenizer
from tuner.llamacpp import describe_exit

log = logging.getLogger("llamasplit.engine")

StepObserver = Callable[[str, StepStats | None, EngineStats | None], None]
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_request_ids = itertools.count(1)


class _Stream:
    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[TokenEvent | FinishEvent | ErrorEvent] = asyncio.Queue()


class WorkerProcess:
    """One engine process; thread-safe. See the module docstring."""

    def __init__(
        self,
        name: str,
        *,
        log_level: str = "INFO",
        on_step: StepObserver | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """``loop``: the event loop that reads what the worker sends (see the module docstring); it must be
        running, and this constructor must not run on it (it waits for the loop to take the socket)."""
        if loop is not None and _running_loop() is loop:
            raise RuntimeError("a WorkerProcess that its event loop reads must be started off that loop")
        self.name = name
        self.on_step = on_step
        # One socket pair each way: we write requests from any thread with blocking sends, and what the
        # worker sends may be read by an event loop, which makes its socket non-blocking.
        to_worker, worker_in = socket.socketpair()
        from_worker, worker_out = socket.socketpair()
        env = dict(os.environ)
        # The worker must import this very server package, installed or not.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        env.setdefault("GGML_NO_BACKTRACE", "1")  # on an abort ggml would attach gdb: slow and noisy
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # the tuner's numbering (tuner/inventory/nvidia.py)
        fds = (worker_in.fileno(), worker_out.fileno())
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "server.engine.worker", str(fds[0]), str(fds[1]), log_level],
            pass_fds=fds,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        worker_in.close()
        worker_out.close()
        self._conn = Connection(to_worker.detach())
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._calls: dict[int, concurrent.futures.Future[Any]] = {}
        self._call_ids = itertools.count(1)
        self._streams: dict[int, _Stream] = {}
        self._on_death: list[Callable[[str], None]] = []
        self.dead_reason: str | None = None
        self._closing = False
        self._gone = threading.Event()  # set once the death of the process has been handled
        self._loop = loop
        if loop is None:
            inbound = Connection(from_worker.detach())
            threading.Thread(target=self._read, args=(inbound,), name=f"engine-{name}", daemon=True).start()
        else:
            connected = asyncio.run_coroutine_threadsafe(
                loop.create_connection(lambda: _FrameReader(self), sock=from_worker), loop
            )
            try:
                connected.result(timeout=30)
            except BaseException:
                self._proc.kill()
                self._proc.wait()
                from_worker.close()
                raise

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self.dead_reason is None

    def on_death(self, callback: Callable[[str], None]) -> None:
        with self._lock:
            if self.dead_reason is None:
                self._on_death.append(callback)
                return
        callback(self.dead_reason)

    # -- calls (blocking; for load threads, never the event loop) --

    def call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self.dead_reason is not None:
                raise EngineDeadError(f"the engine process is gone: {self.dead_reason}")
            call_id = next(self._call_ids)
            self._calls[call_id] = future
        self._send(("call", call_id, method, args))
        try:
            return future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError as exc:
            raise EngineError(f"the engine process did not answer {method!r} within {timeout_s:g} s") from exc

    # -- requests --

    def submit(self, key: str, request: GenerationRequest) -> tuple[int, _Stream]:
        stream = _Stream(asyncio.get_running_loop())
        rid = next(_request_ids)
        with self._lock:
            if self.dead_reason is not None:
                raise EngineDeadError(f"the engine process is gone: {self.dead_reason}")
            self._streams[rid] = stream
        self._send(("submit", key, rid, request))
        return rid, stream

    def cancel(self, key: str, rid: int) -> None:
        with self._lock:
            self._streams.pop(rid, None)
            if self.dead_reason is not None:
                return
        self._send(("cancel", key, rid))

    def forget(self, rid: int) -> None:
        with self._lock:
            self._streams.pop(rid, None)

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError as exc:
            # The reader notices the same and fails everything in flight; say so to this caller now.
            raise EngineDeadError(f"the engine process is gone ({exc})") from exc

    # -- what the worker sends --

    def _read(self, inbound: Connection) -> None:
        """The reader thread of a process without an event loop."""
        while True:
            try:
                message = inbound.recv()
            except (EOFError, OSError):
                break
            except Exception:  # an unpicklable message is a bug, not a reason to stop serving
                log.exception("engine %s sent a message that could not be read", self.name)
                continue
            self._dispatch(message)
        with contextlib.suppress(OSError):
            inbound.close()
        self._died()

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "step":
            _, key, events, step, stats = message
            if events:
                self._deliver(events)
            if self.on_step is not None:
                try:
                    self.on_step(key, step, stats)
                except Exception:
                    log.exception("step observer failed")
        elif kind == "reply":
            _, call_id, ok, value = message
            with self._lock:
                future = self._calls.pop(call_id, None)
            if future is None:
                return
            if ok:
                future.set_result(value)
            else:
                error_type, text = value
                future.set_exception(_remote_error(error_type, text))

    def _deliver(self, events: Sequence[tuple[int, Any]]) -> None:
        # Streams of the loop that reads the worker get their events at once; any other loop gets one hop
        # per step, not one per token: the loop is the scarce resource.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, Any]]] = {}
        with self._lock:
            for rid, event in events:
                stream = self._streams.get(rid)
                if stream is None:
                    continue
                if stream.loop is self._loop:
                    stream.queue.put_nowait(event)
                else:
                    by_loop.setdefault(stream.loop, []).append((stream, event))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop closed (server shutting down)
                loop.call_soon_threadsafe(_put_all, items)

    def _died(self) -> None:
        try:
            returncode = self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            returncode = self._proc.wait()
        reason = "it was shut down" if self._closing else f"the engine process ended ({describe_exit(returncode)})"
        with self._lock:
            self.dead_reason = reason
            calls, self._calls = self._calls, {}
            streams, self._streams = self._streams, {}
            callbacks, self._on_death = self._on_death, []
        if not self._closing:
            log.error("engine %s (pid %d): %s", self.name, self._proc.pid, reason)
        for future in calls.values():
            future.set_exception(EngineDeadError(f"the engine process is gone: {reason}"))
        self._deliver_direct(streams, ErrorEvent(f"the engine process is gone: {reason}", dead=True))
        for callback in callbacks:
            try:
                callback(reason)
            except Exception:
                log.exception("engine death callback failed")
        self._gone.set()

    @staticmethod
    def _deliver_direct(streams: Mapping[int, _Stream], event: ErrorEvent) -> None:
        for stream in streams.values():
            with contextlib.suppress(RuntimeError):
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, event)

    # -- shutdown --

    def close(self, timeout_s: float = 30.0) -> None:
        """Unload everything and end the process (killed if it does not end in time)."""
        if self.dead_reason is not None:
            return
        self._closing = True
        with contextlib.suppress(EngineError):
            self.call("shutdown", timeout_s=timeout_s)
        try:
            self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        with contextlib.suppress(OSError):
            self._conn.close()
        self._gone.wait(timeout=timeout_s)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the worker (tests use it to crash an engine)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._proc.pid, sig)


class _FrameReader(asyncio.Protocol):
    """Reads the worker's messages on the event loop: multiprocessing's framing (a 4-byte big-endian length,
    or -1 and an 8-byte one) around a pickle, as ``Connection.send`` writes them."""

    def __init__(self, process: WorkerProcess) -> None:
        self._process = process
        self._buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while True:
            if len(buffer) - start < 4:
                break
            (size,) = struct.unpack_from("!i", buffer, start)
            header = 4
            if size == -1:
                if len(buffer) - start < 12:
                    break
                (size,) = struct.unpack_from("!Q", buffer, start + 4)
                header = 12
            end = start + header + size
            if len(buffer) < end:
                break
            try:
                message = pickle.loads(buffer[start + header : end])
            except Exception:  # an unpicklable message is a bug, not a reason to stop serving
                log.exception("engine %s sent a message that could not be read", self._process.name)
            else:
                self._process._dispatch(message)
            start = end
        del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        # Every message the worker sent has been dispatched: now fail what is left. Waiting for the process's
        # exit status takes a moment, so not on the loop.
        threading.Thread(target=self._process._died, name=f"engine-{self._process.name}-exit", daemon=True).start()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _put_all(items: list[tuple[_Stream, Any]]) -> None:
    for stream, event in items:
        stream.queue.put_nowait(event)


def _remote_error(error_type: str, text: str) -> Exception:
    from tuner import DoesNotFitError, GGUFError, PlanRequestError, TunerError

    known: dict[str, type[Exception]] = {
        "DoesNotFitError": DoesNotFitError,
        "GGUFError": GGUFError,
        "PlanRequestError": PlanRequestError,
        "InventoryError": TunerError,
        "EngineRequestError": EngineRequestError,
    }
    cls = known.get(error_type)
    return cls(text) if cls is not None else EngineError(text)


class WorkerEngine:
    """One model loaded in a WorkerProcess: the Engine protocol for the HTTP layer."""

    def __init__(self, worker: WorkerProcess, key: str, tokenizer: Tokenizer, facts: ModelFacts) -> None:
        self.worker = worker
        self.key = key
        self.tokenizer = tokenizer
        self._facts = facts
        self._stats: EngineStats | None = None
        self._closed = False

    @classmethod
    def load(
        cls,
        worker: WorkerProcess,
        key: str,
        path: str | Path,
        settings: Any,
        *,
        rpc: Sequence[str] = (),
        chat_template: str | None = None,
        step_tokens: int | None = None,
        seq_limit: int | None = None,
    ) -> tuple[WorkerEngine, dict[str, Any]]:
        """Load ``path`` with ``settings`` (a tuner.LoadSettings) in ``worker``; returns the engine and the
        worker's memory report (BufferReport as JSON). Raises EngineError (or the tuner's DoesNotFitError)."""
        tokenizer = Tokenizer(path, chat_template=chat_template)
        try:
            result = worker.call("load", key, str(path), settings.model_dump_json(), list(rpc), step_tokens, seq_limit)
        except BaseException:
            tokenizer.close()
            raise
        return cls(worker, key, tokenizer, result["facts"]), result["report"]

    # -- Engine protocol --

    @property
    def facts(self) -> ModelFacts:
        return self._facts

    @property
    def n_ctx_per_seq(self) -> int:
        return self._facts.n_ctx_seq

    @property
    def n_vocab(self) -> int:
        return self._facts.n_vocab

    @property
    def max_concurrency(self) -> int:
        return self._facts.n_seq_max

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        return self.tokenizer.encode_chat(messages, tools)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode_text(text)

    def decode_tokens(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode_tokens(tokens)

    def stop_strings(self) -> tuple[str, ...]:
        return self.tokenizer.template.stop_strings

    def chat_template_source(self) -> TemplateSource:
        return self.tokenizer.template.source

    def chat_template_facts(self) -> TemplateFacts:
        return self.tokenizer.template.facts

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        if request.n > self._facts.n_seq_max:
            raise EngineRequestError(
                f"n={request.n} choices run on {request.n} sequences at once, and this model has "
                f"{self._facts.n_seq_max} (--parallel); ask for at most {self._facts.n_seq_max} or start the "
                "model with more",
                param="n",
            )
        return self.tokenizer.prepare(request)

    async def embed(self, inputs: Sequence[Sequence[int]]) -> list[bytes]:
        """One pooled vector per input (float32 little-endian bytes) from an embedding model's engine; the
        engine encodes them together with other requests' inputs (server.engine.embedding)."""
        if self._closed:
            raise EngineError(f"model {self.key} is unloaded")
        vectors: list[bytes] = await asyncio.to_thread(self.worker.call, "embed", self.key, [list(t) for t in inputs])
        return vectors

    def observe(self, stats: EngineStats | None) -> None:
        if stats is not None:
            self._stats = stats

    def stats(self) -> EngineStats | None:
        return self._stats

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Stream the request's events; closing the iterator cancels it in the engine at its next step."""
        if self._closed:
            raise EngineError(f"model {self.key} is unloaded")
        rid, stream = self.worker.submit(self.key, request)
        finished = False
        choices_left = request.n
        try:
            while True:
                event = await stream.queue.get()
                if isinstance(event, ErrorEvent):
                    # One choice failed: with n > 1 the others are still running and are cancelled below.
                    finished = request.n == 1
                    raise EngineDeadError(event.message) if event.dead else EngineError(event.message)
                if isinstance(event, FinishEvent):
                    choices_left -= 1
                    finished = choices_left == 0
                    if event.note:
                        log.warning("%s: %s", self.key, event.note)
                    yield event
                    if finished:
                        return
                    continue
                yield event
        finally:
            if finished:
                self.worker.forget(rid)
            else:
                with contextlib.suppress(EngineError):
                    self.worker.cancel(self.key, rid)

    def close(self) -> None:
        """Unload the model from its worker (the worker itself stays for its other models)."""
        if self._closed:
            return
        self._closed = True
        if self.worker.alive:
            with contextlib.suppress(EngineError):
                self.worker.call("unload", self.key, timeout_s=60)
        self.tokenizer.close()
