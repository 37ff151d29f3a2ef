"""The llama.cpp RPC workers a server depends on: who answers at start-up, and bringing models back after one died.

At start-up an RPC worker that does not answer stops the server (the tuner's inventory names it), unless
``rpc_optional`` is set: then ``without_unreachable_rpc`` plans without it. When a worker dies while serving,
ggml-rpc aborts the engine process that uses it, and the models in that process turn "failed" (models in other
processes, on other workers or on this machine alone, keep serving: server/engine_groups.py). ``RpcRecovery``
then probes, every few seconds, the workers those models were placed on (a plain handshake, which the dead
engine no longer blocks; workers that live engine processes use are up and are not probed) and reloads each
model once its own workers answer again. A reload that fails is retried with a longer pause, until it works or
someone unloads the model. A model that used no worker did not die of one: it waits for POST /models/load.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from server.config import Settings

if TYPE_CHECKING:
    from server.registry import ModelRegistry, ServedModel

log = logging.getLogger("llamasplit.rpc")

PROBE_INTERVAL_S = 2.0  # how soon a worker that is back is noticed
PROBE_TIMEOUT_S = 2.0  # a LAN handshake takes milliseconds; a busy or dead host answers nothing
MAX_RETRY_INTERVAL_S = 60.0  # cap of the back-off after failed reloads
# ServedModel.engine_died's message: the failures that a worker coming back can cure.
ENGINE_DIED_MARK = "its engine process died"


def unreachable_endpoints(endpoints: Sequence[str], timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, str]:
    """endpoint -> why it does not answer, for every endpoint that fails the RPC handshake."""
    from tuner import TunerError
    from tuner.llamacpp import probe_rpc_endpoint

    down: dict[str, str] = {}
    for endpoint in endpoints:
        try:
            probe_rpc_endpoint(endpoint, timeout_s)
        except TunerError as exc:
            down[endpoint] = str(exc)
    return down


def without_unreachable_rpc(settings: Settings) -> Settings:
    """The settings minus the RPC endpoints that do not answer now, each named in a warning (--rpc-optional)."""
    down = unreachable_endpoints(settings.rpc)
    for reason in down.values():
        log.warning("--rpc-optional: planning without it: %s", reason)
    if not down:
        return settings
    kept = tuple(e for e in settings.rpc if e not in down)
    log.warning("planning over %s", f"RPC workers {', '.join(kept)}" if kept else "this machine's devices only")
    return settings.model_copy(update={"rpc": kept})


class RpcRecovery:
    """A thread that reloads models whose engine died, once the RPC workers each was placed on answer again."""

    def __init__(
        self,
        registry: ModelRegistry,
        endpoints: Sequence[str],
        *,
        interval_s: float = PROBE_INTERVAL_S,
        timeout_s: float = PROBE_TIMEOUT_S,
    ) -> None:
        self.registry = registry
        self.endpoints = tuple(endpoints)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.reloads = 0  # automatic reloads that succeeded
        self._retrying: dict[str, float] = {}  # alias -> monotonic time of the next attempt after a failed reload
        self._failures: dict[str, int] = {}
        self._waiting_for: dict[str, str] = {}  # endpoint -> reason, as last logged
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llamasplit-rpc-recovery", daemon=True)

    def start(self) -> RpcRecovery:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.timeout_s * len(self.endpoints) + 5)

    def _recoverable(self, model: ServedModel) -> bool:
        if model.state != "failed":
            self._retrying.pop(model.alias, None)
            self._failures.pop(model.alias, None)
            return False
        died = model.alias in self._retrying or ENGINE_DIED_MARK in (model.error or "")
        return died and bool(model.rpc_endpoints)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # the watcher must outlive any surprise; say so and keep watching
                log.exception("RPC recovery check failed")

    def check(self) -> list[str]:
        """One round: probe the workers if a model needs them, reload what can be. Returns the aliases reloaded."""
        failed = [m for m in list(self.registry.models.values()) if self._recoverable(m)]
        if not failed:
            self._waiting_for.clear()
            return []
        needs = {m.alias: m.rpc_endpoints for m in failed}
        # A worker that a live engine process uses is up (its death would have ended that process), and its one
        # connection is taken: a handshake from here would wait, so it is not probed.
        held = self.registry.held_rpc_endpoints()
        wanted = {e for endpoints in needs.values() for e in endpoints}
        to_probe = [e for e in self.endpoints if e in wanted and e not in held]
        down = unreachable_endpoints(to_probe, self.timeout_s)
        for endpoint, reason in down.items():
            if self._waiting_for.get(endpoint) != reason:
                waiting = ", ".join(m.alias for m in failed if endpoint in needs[m.alias])
                log.warning("%s wait(s) for RPC worker %s: %s", waiting, endpoint, reason)
        for endpoint in set(self._waiting_for) - set(down):
            if endpoint in to_probe or endpoint in held:
                log.info("RPC worker %s answers again", endpoint)
        self._waiting_for = down
        for model in failed:
            _note_waiting(model, {e: r for e, r in down.items() if e in needs[model.alias]})
        reloaded = []
        now = time.monotonic()
        for model in failed:
            workers = needs[model.alias]
            if any(e in down for e in workers) or self._retrying.get(model.alias, 0.0) > now or self._stop.is_set():
                continue
            log.info("%s: reloading automatically, its RPC workers answer again (%s)", model.alias, ", ".join(workers))
            started = time.monotonic()
            try:
                self.registry.load_model(model.alias)
            except Exception as exc:
                failures = self._failures.get(model.alias, 0) + 1
                self._failures[model.alias] = failures
                pause = min(MAX_RETRY_INTERVAL_S, self.interval_s * 2**failures)
                self._retrying[model.alias] = time.monotonic() + pause
                log.warning("%s: automatic reload failed (%s); next try in %.0f s", model.alias, exc, pause)
                continue
            self._retrying.pop(model.alias, None)
            self._failures.pop(model.alias, None)
            self.reloads += 1
            reloaded.append(model.alias)
            log.info("%s: reloaded automatically in %.1f s", model.alias, time.monotonic() - started)
        return reloaded


WAITING_MARK = "; waiting for RPC worker"


def _note_waiting(model: ServedModel, down: dict[str, str]) -> None:
    """Say in the model's error (what /health shows) which workers it waits for, or nothing once none."""
    error = model.error or ""
    base = error.split(WAITING_MARK)[0]
    note = ""
    if down:
        note = f"{WAITING_MARK} {', '.join(down)}, which does not answer; the model reloads by itself once it does"
    if model.state == "failed" and error != base + note:
        model.error = base + note


def start_rpc_recovery(registry: ModelRegistry, settings: Settings) -> RpcRecovery | None:
    """Start the watcher when the server uses RPC workers; None otherwise."""
    if not settings.rpc:
        return None
    return RpcRecovery(registry, settings.rpc).start()
