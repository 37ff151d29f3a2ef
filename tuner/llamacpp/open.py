"""Open a model and its context with llama.cpp: the one place that fills llama.cpp's parameters.

``open_model(path, settings)`` loads a GGUF with a LoadSettings on the given devices, creates the context and
reports what llama.cpp allocated per buffer (its log, made exact by llama_get_memory_breakdown where that can
be called). The server's engine generates with what it returns; ``load_and_report`` (the test bed and
``tune-split --measure``'s dry run) only keeps the report. ``open_vocab`` loads the tokenizer alone.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tuner.errors import DoesNotFitError, GGUFError, PlanRequestError, TunerError
from tuner.llamacpp.buffer_log import BufferReport, BufferSizes, capture_llama_log
from tuner.plan import CACHE_TYPES, LoadSettings

# enum ggml_type (ggml.h). Ids are stable: ggml only appends.
GGML_TYPE_IDS: dict[str, int] = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q8_1": 9,
    "q2_K": 10, "q3_K": 11, "q4_K": 12, "q5_K": 13, "q6_K": 14, "q8_K": 15,
    "iq2_xxs": 16, "iq2_xs": 17, "iq3_xxs": 18, "iq1_s": 19, "iq4_nl": 20, "iq3_s": 21, "iq2_s": 22,
    "iq4_xs": 23, "i8": 24, "i16": 25, "i32": 26, "i64": 27, "f64": 28, "iq1_m": 29, "bf16": 30,
    "tq1_0": 34, "tq2_0": 35, "mxfp4": 39, "nvfp4": 40, "q1_0": 41, "q2_0": 42,
}  # fmt: skip
# enum llama_flash_attn_type
FLASH_ATTN_TYPES: dict[str, int] = {"auto": -1, "off": 0, "on": 1}
# enum llama_split_mode; "tensor" (3) is llama.cpp's tensor parallelism over a "Meta" device.
SPLIT_MODES: dict[str, int] = {"none": 0, "layer": 1, "row": 2, "tensor": 3}
# enum llama_pooling_type
POOLING_TYPES: dict[str, int] = {"unspecified": -1, "none": 0, "mean": 1, "cls": 2, "last": 3, "rank": 4}
# enum llama_load_mode
LLAMA_LOAD_MODE_NONE = 0
LLAMA_LOAD_MODE_MMAP = 1
UNQUANTISED_CACHE_TYPES = ("f32", "f16", "bf16")
BreakdownRow = tuple[str, bool, int, int, int]  # buffer name, host, model, context, compute bytes


class LoadError(TunerError):
    """llama.cpp could not load the model or create its context; ``log_tail`` holds its last lines."""

    def __init__(self, message: str, log_tail: Sequence[str] = ()) -> None:
        tail = "\n".join(log_tail)
        super().__init__(f"{message}\nllama.cpp's last log lines:\n{tail}" if tail else message)
        self.log_tail = list(log_tail)


def ggml_type_id(name: str) -> int:
    """The ggml_type id of a KV cache type name as llama.cpp spells it (f16, q8_0, ...)."""
    if name not in CACHE_TYPES:
        raise PlanRequestError(
            f"KV cache type {name!r} is not one llama.cpp accepts; use one of {', '.join(CACHE_TYPES)}"
        )
    return GGML_TYPE_IDS[name]


def check_settings(path: str | Path, settings: LoadSettings) -> None:
    """Refuse, before llama.cpp sees them, the settings it would refuse, bend silently or crash on."""
    if not Path(path).is_file():
        raise GGUFError(f"model file {path} does not exist")
    ggml_type_id(settings.type_k)
    ggml_type_id(settings.type_v)
    if settings.type_v not in UNQUANTISED_CACHE_TYPES and settings.flash_attn == "off":
        raise PlanRequestError(
            f"a quantised V cache ({settings.type_v}) needs flash attention, but flash_attn is 'off'; "
            "use flash_attn 'on' or 'auto', or an f16 V cache"
        )
    if settings.tensor_split is not None:
        from tuner.llamacpp.libs import llama_cpp_module

        max_devices = llama_cpp_module().LLAMA_MAX_DEVICES
        if len(settings.tensor_split) > max_devices or any(v < 0 for v in settings.tensor_split):
            raise PlanRequestError(
                f"tensor_split {list(settings.tensor_split)} must have at most {max_devices} non-negative entries"
            )


@dataclass
class OpenedModel:
    """A loaded llama_model with its llama_context (None after a dry run's close) and what they allocated."""

    model: int  # llama_model *
    ctx: int  # llama_context *
    settings: LoadSettings
    report: BufferReport
    # ctypes arrays whose pointers llama.cpp keeps (devices, tensor_split): they must outlive the model.
    _keep: list[Any] = field(default_factory=list, repr=False)

    def close(self) -> None:
        """Free the context and the model (idempotent)."""
        from tuner.llamacpp.libs import llama_cpp_module

        llama_cpp = llama_cpp_module()
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = 0
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = 0


def default_threads() -> int:
    """The CPUs this process may run on (a container's or taskset's limit, not the machine's count)."""
    import os

    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def open_model(
    path: str | Path,
    settings: LoadSettings,
    *,
    devices: Sequence[int] = (),
    dry_run: bool = False,
    echo_log: bool = False,
    log_sink: TextIO | None = None,
) -> OpenedModel:
    """Load ``path`` with ``settings`` and create its context; raise DoesNotFitError or LoadError on failure.

    ``devices`` are ggml_backend_dev_t pointers (llama.cpp's default device list when empty); RPC devices
    must be given this way. ``dry_run`` is llama.cpp's own memory-fit pass (common/fit.cpp): nothing is
    allocated and only the report is meaningful. ``echo_log`` passes llama.cpp's log on to the logger that
    was installed before; ``log_sink`` receives every line as it is logged.
    """
    from tuner.llamacpp import libs

    check_settings(path, settings)
    llama_cpp = libs.llama_cpp_module()
    llama_cpp.llama_backend_init()
    timings: dict[str, float] = {}
    keep: list[Any] = []
    with capture_llama_log(echo=echo_log, sink=log_sink) as capture:
        params = llama_cpp.llama_model_default_params()
        if devices:
            device_array = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
            keep.append(device_array)
            params.devices = ctypes.cast(device_array, ctypes.c_void_p)
        params.n_gpu_layers = settings.n_gpu_layers
        params.split_mode = SPLIT_MODES[settings.split_mode]
        params.main_gpu = settings.main_gpu
        if settings.tensor_split is not None:
            split_array = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*settings.tensor_split)
            keep.append(split_array)
            params.tensor_split = split_array
        params.use_extra_bufts = settings.repack
        if dry_run:
            # common/fit.cpp: simulate allocations; mmap must be off or llama.cpp asserts (!ml.no_alloc).
            params.no_alloc = True
            params.load_mode = LLAMA_LOAD_MODE_NONE
        else:
            params.load_mode = LLAMA_LOAD_MODE_MMAP if settings.use_mmap else LLAMA_LOAD_MODE_NONE

        # Split mode tensor: llama.cpp reports only the Meta() device, so each device is also measured from
        # outside (tuner.llamacpp.device_usage), before the load and once the context exists.
        probed: list[int] = []
        if settings.split_mode == "tensor" and not dry_run:
            from tuner.llamacpp.device_usage import local_gpu_devices, sample_devices

            probed = list(devices) or local_gpu_devices()
            samples_before = sample_devices(probed)
        started = time.monotonic()
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        timings["model"] = round(time.monotonic() - started, 3)
        if not model:
            raise _load_failure(capture.tail(), f"llama.cpp could not load {path}")

        device_buffer_names: dict[str, str] = {}
        base = libs.ggml_base()
        for dev in libs.model_devices(model):
            device_buffer_names[base.ggml_backend_dev_name(dev).decode()] = base.ggml_backend_buft_name(
                base.ggml_backend_dev_buffer_type(dev)
            ).decode()

        threads = settings.n_threads or default_threads()
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = settings.n_ctx
        cparams.n_seq_max = settings.n_seq_max
        cparams.n_batch = settings.n_batch
        cparams.n_ubatch = min(settings.n_ubatch, settings.n_batch)
        cparams.n_threads = threads
        cparams.n_threads_batch = settings.n_threads_batch or threads
        cparams.type_k = GGML_TYPE_IDS[settings.type_k]
        cparams.type_v = GGML_TYPE_IDS[settings.type_v]
        cparams.flash_attn_type = FLASH_ATTN_TYPES[settings.flash_attn]
        cparams.kv_unified = settings.kv_unified
        cparams.swa_full = settings.swa_full
        cparams.embeddings = settings.embeddings
        cparams.pooling_type = POOLING_TYPES[settings.pooling]
        cparams.no_perf = True
        started = time.monotonic()
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        timings["context"] = round(time.monotonic() - started, 3)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise _load_failure(
                capture.tail(),
                f"llama.cpp could not create the context for {path} (n_ctx={settings.n_ctx}, "
                f"n_seq_max={settings.n_seq_max})",
            )
        exact_rows = memory_breakdown_rows(ctx) if libs.memory_breakdown_supported() else []
        if probed:
            from tuner.llamacpp.device_usage import sample_devices, usage_between

            device_usage = usage_between(samples_before, sample_devices(probed))

    report = capture.report()
    if probed:
        report.device_usage = device_usage
    report.device_buffer_names = device_buffer_names
    report.timings_s = timings
    if exact_rows:
        apply_memory_breakdown(report, exact_rows)
    opened = OpenedModel(model=model, ctx=ctx, settings=settings, report=report)
    opened._keep = keep
    if dry_run and not exact_rows:
        opened.close()
        raise LoadError(
            "a dry run needs llama_get_memory_breakdown (the log prints 0 MiB for simulated buffers), "
            "which ctypes can call only on x86-64 Linux; load for real instead"
        )
    return opened


def open_vocab(path: str | Path) -> int:
    """A llama_model holding only the tokenizer and metadata (no weights, no devices): cheap, and safe anywhere.

    Free it with ``llama_model_free``.
    """
    from tuner.llamacpp import libs

    if not Path(path).is_file():
        raise GGUFError(f"model file {path} does not exist")
    llama_cpp = libs.llama_cpp_module()
    llama_cpp.llama_backend_init()
    with capture_llama_log() as capture:
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        params.n_gpu_layers = 0
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise LoadError(f"llama.cpp could not load {path} (reading its vocabulary)", capture.tail())
    return int(model)


def memory_breakdown_rows(ctx: int) -> list[BreakdownRow]:
    """llama_get_memory_breakdown of a live llama_context, with the buffer types' names.

    Each call leaks the returned std::map (a few hundred bytes): fine for a load or two per process.
    """
    from tuner.llamacpp import libs

    base = libs.ggml_base()
    rows: list[BreakdownRow] = []
    for buft, model, context, compute in libs.memory_breakdown(ctx):
        # "Host" means "in host RAM": repacked CPU weights (AMX, CPU_REPACK) are not host-accessible
        # buffers (ggml_backend_buft_is_host is false) but their device is the CPU.
        device = base.ggml_backend_buft_get_device(buft)
        in_ram = bool(base.ggml_backend_buft_is_host(buft)) or (
            bool(device) and base.ggml_backend_dev_type(device) == libs.GGML_BACKEND_DEVICE_TYPE_CPU
        )
        rows.append((base.ggml_backend_buft_name(buft).decode(), in_ram, model, context, compute))
    return rows


def apply_memory_breakdown(report: BufferReport, rows: Sequence[BreakdownRow]) -> None:
    """Replace the log's rounded model/KV/compute bytes by llama_get_memory_breakdown's exact ones."""
    report.logged_buffers = dict(report.buffers)
    buffers = dict(report.buffers)
    for name, host, model_bytes, context_bytes, compute_bytes in rows:
        if not (model_bytes or context_bytes or compute_bytes) and name not in buffers:
            continue
        old = buffers.get(name, BufferSizes())
        buffers[name] = BufferSizes(
            model_bytes=model_bytes,
            kv_bytes=context_bytes,
            compute_bytes=compute_bytes,
            output_bytes=old.output_bytes,  # not part of the breakdown; stays log-rounded
            host=host,
        )
    report.buffers = buffers
    report.exact = True


def _allocation_failed(lines: Sequence[str]) -> str | None:
    """The line saying a buffer could not be allocated, if that is why llama.cpp gave up."""
    for line in reversed(lines):
        if "unable to allocate" in line or "failed to allocate" in line or "out of memory" in line:
            return line
    return None


def _load_failure(tail: list[str], message: str) -> TunerError:
    line = _allocation_failed(tail)
    if line is not None:
        return DoesNotFitError(f"{message}: {line.strip()}")
    return LoadError(message, tail)
