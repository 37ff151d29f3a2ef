"""The engine process: hosts loaded models, each with its batch scheduler, and talks to the HTTP process.

Started by ``server.engine.client.WorkerProcess`` as ``python -m server.engine.worker IN_FD OUT_FD LOG_LEVEL``:
its ends of two socket pairs, one each way, carrying pickled messages (multiprocessing's framing):

    HTTP process -> worker                         worker -> HTTP process
    ("call", call_id, method, args)                ("reply", call_id, ok, value | (error type, message))
    ("submit", model_key, request_id, request)     ("step", model_key, events, step stats, engine stats)
    ("cancel", model_key, request_id)

An embedding model (LoadSettings.embeddings) gets an EmbeddingRunner instead of a batch scheduler; its
requests are calls: ("call", call_id, "embed", (model_key, inputs)) answers with one vector per input.

llama.cpp runs only here, so an abort inside it (a dead RPC server, a GGML_ASSERT) ends this process and
not the server; the HTTP process sees the socket close and fails the requests in flight.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from server.engine.batching import BatchScheduler, Emit
from server.engine.embedding import EmbeddingRunner
from server.engine.errors import EngineError
from server.engine.protocol import ErrorEvent

log = logging.getLogger("llamasplit.worker")


class Worker:
    def __init__(self, inbound: Connection, outbound: Connection) -> None:
        self._conn = inbound
        self._out = outbound
        self._send_lock = threading.Lock()
        self._models: dict[str, tuple[Any, BatchScheduler]] = {}
        self._embedders: dict[str, tuple[Any, EmbeddingRunner]] = {}
        self._models_lock = threading.Lock()
        self._load_lock = threading.Lock()  # one load at a time: llama.cpp's log capture is process-wide

    def send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._out.send(message)

    def serve(self) -> None:
        """Read messages until the HTTP process closes its end (or asks to shut down)."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "submit":
                _, key, rid, request = message
                scheduler = self._scheduler(key)
                if scheduler is None:
                    self.send(("step", key, [(rid, ErrorEvent(f"model {key} is not loaded"))], None, None))
                else:
                    scheduler.submit(rid, request)
            elif kind == "cancel":
                _, key, rid = message
                scheduler = self._scheduler(key)
                if scheduler is not None:
                    scheduler.cancel(rid)
            elif kind == "call":
                _, call_id, method, args = message
                if method == "shutdown":
                    self._reply(call_id, True, None)
                    break
                # Calls (a load takes seconds) run beside the loop, so other models' requests keep flowing.
                threading.Thread(target=self._call, args=(call_id, method, args), daemon=True).start()
        self.shutdown()

    def _scheduler(self, key: str) -> BatchScheduler | None:
        with self._models_lock:
            entry = self._models.get(key)
        return entry[1] if entry is not None else None

    def _call(self, call_id: int, method: str, args: tuple[Any, ...]) -> None:
        try:
            value = getattr(self, f"do_{method}")(*args)
        except Exception as exc:
            self._reply(call_id, False, (type(exc).__name__, str(exc)))
            return
        self._reply(call_id, True, value)

    def _reply(self, call_id: int, ok: bool, value: Any) -> None:
        with contextlib.suppress(OSError):  # the HTTP process is gone; serve() ends on its own
            self.send(("reply", call_id, ok, value))

    # -- calls --

    def do_ping(self) -> int:
        return os.getpid()

    def do_load(
        self, key: str, path: str, settings_json: str, rpc: list[str], step_tokens: int | None, seq_limit: int | None
    ) -> dict[str, Any]:
        """Open the model with its LoadSettings and start its scheduler; returns its facts and memory report."""
        from tuner import LoadSettings
        from tuner.llamacpp import device_list, open_model

        settings = LoadSettings.model_validate_json(settings_json)
        with self._load_lock:
            if self._scheduler(key) is not None or key in self._embedders:
                raise EngineError(f"model {key} is already loaded in this engine process")
            devices = device_list(rpc)
            opened = open_model(path, settings, devices=devices, echo_log=True)
        if settings.embeddings:
            return self._start_embedder(key, opened)

        def emit(events: list[Any], step: Any, stats: Any) -> None:
            with contextlib.suppress(OSError):
                self.send(("step", key, events, step, stats))

        emit_fn: Emit = emit
        try:
            scheduler = BatchScheduler(opened, emit_fn, step_tokens=step_tokens, seq_limit=seq_limit, name=key)
        except Exception:
            opened.close()
            raise
        with self._models_lock:
            self._models[key] = (opened, scheduler)
        scheduler.start()
        return {"facts": scheduler.facts, "report": opened.report.model_dump(mode="json")}

    def _start_embedder(self, key: str, opened: Any) -> dict[str, Any]:
        try:
            runner = EmbeddingRunner(opened, name=key)
        except Exception:
            opened.close()
            raise
        runner.start()
        with self._models_lock:
            self._embedders[key] = (opened, runner)
        return {"facts": runner.facts, "report": opened.report.model_dump(mode="json")}

    def do_embed(self, key: str, inputs: list[list[int]]) -> list[bytes]:
        """One pooled vector per input (float32 little-endian bytes), encoded with other requests' inputs."""
        with self._models_lock:
            entry = self._embedders.get(key)
        if entry is None:
            raise EngineError(f"model {key} is not loaded as an embedding model")
        return entry[1].embed(inputs)

    def do_unload(self, key: str) -> None:
        with self._models_lock:
            embedder = self._embedders.pop(key, None)
        if embedder is not None:
            embedder[1].stop()
            embedder[0].close()
            return
        with self._models_lock:
            entry = self._models.pop(key, None)
        if entry is None:
            return
        opened, scheduler = entry
        scheduler.stop()
        opened.close()

    def do_stats(self, key: str) -> Any:
        scheduler = self._scheduler(key)
        if scheduler is None:
            raise EngineError(f"model {key} is not loaded")
        return scheduler.stats_snapshot()

    def shutdown(self) -> None:
        with self._models_lock:
            keys = [*self._models, *self._embedders]
        for key in keys:
            try:
                self.do_unload(key)
            except Exception:
                log.exception("unloading %s failed", key)


def _route_llama_log() -> Any:
    """llama.cpp's log into Python logging: INFO chatter at DEBUG, warnings and errors as such."""
    from tuner.llamacpp import llama_cpp_module

    lc = llama_cpp_module()
    levels = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
    llama_log = logging.getLogger("llamasplit.llama_cpp")
    state: dict[str, Any] = {"level": logging.DEBUG, "partial": ""}

    def on_log(level: int, text: bytes | None, _user_data: Any) -> None:
        try:  # never raise into C
            if level != 5:  # GGML_LOG_LEVEL_CONT continues the previous line
                state["level"] = levels.get(level, logging.DEBUG)
            data = str(state["partial"]) + (text or b"").decode("utf-8", errors="replace")
            *lines, state["partial"] = data.split("\n")
            for line in lines:
                if line.strip():
                    llama_log.log(int(state["level"]), "%s", line)
        except Exception:
            pass

    callback = lc.llama_log_callback(on_log)
    lc.llama_log_set(callback, None)
    return callback  # the ctypes thunk must live as long as the process


def main(argv: list[str]) -> int:
    fd_in, fd_out, level = int(argv[0]), int(argv[1]), argv[2] if len(argv) > 2 else "INFO"
    # Ctrl-C reaches the whole process group; the server decides when its engines stop (it unloads them).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # No PR_SET_PDEATHSIG: it fires when the *thread* that started us ends (the server's loader thread), not
    # the server. When the server dies its end of the socket closes, recv() sees EOF and serve() returns.
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)-7s %(name)s[engine]: %(message)s", stream=sys.stderr
    )
    keep = _route_llama_log()
    inbound = Connection(socket.socket(fileno=fd_in).detach())
    outbound = Connection(socket.socket(fileno=fd_out).detach())
    Worker(inbound, outbound).serve()
    del keep
    sys.stderr.flush()
    # Skip interpreter and C++ static teardown: ggml's RPC client threads can stall or crash there.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
