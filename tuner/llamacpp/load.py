"""Load a model with llama.cpp in a child process and report what it allocated on every device.

``load_and_report`` uses the low-level C API with an explicit device list (the RPC endpoints' devices), so
the placement is exactly llama.cpp's. ``dry_run=True`` is llama.cpp's own memory-fit pass (common/fit.cpp):
``no_alloc`` with load mode NONE, nothing is allocated and the sizes come from llama_get_memory_breakdown.
The child process keeps an abort (GGML_ASSERT) or a leak away from the caller.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from tuner.errors import DoesNotFitError, GGUFError, InventoryError, PlanRequestError, TunerError
from tuner.llamacpp.buffer_log import (
    GGML_LOG_LEVEL_INFO,
    BufferReport,
    BufferSizes,
    capture_llama_log,
)
from tuner.plan import CACHE_TYPES, FlashAttn, SplitMode

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
# enum llama_split_mode
SPLIT_MODES: dict[str, int] = {"none": 0, "layer": 1, "row": 2}
# enum llama_load_mode
LLAMA_LOAD_MODE_NONE = 0
LLAMA_LOAD_MODE_MMAP = 1
_UNQUANTISED = ("f32", "f16", "bf16")
DEFAULT_TIMEOUT_S = 300.0
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


class LoadRequest(BaseModel):
    """Everything the child process needs; travels as JSON."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_path: str
    rpc_endpoints: tuple[str, ...] = ()
    n_gpu_layers: int = -1
    tensor_split: tuple[float, ...] | None = None
    main_gpu: int = 0
    split_mode: SplitMode = "layer"
    n_ctx: int = Field(default=4096, ge=0)
    n_seq_max: int = Field(default=1, ge=1)
    n_batch: int = Field(default=512, ge=1)
    n_ubatch: int = Field(default=512, ge=1)
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: FlashAttn = "auto"
    kv_unified: bool = False
    swa_full: bool = True
    use_mmap: bool = True
    dry_run: bool = False


def load_and_report(
    model_path: str | os.PathLike[str],
    *,
    rpc_endpoints: Sequence[str] = (),
    n_gpu_layers: int = -1,
    tensor_split: Sequence[float] | None = None,
    main_gpu: int = 0,
    split_mode: SplitMode = "layer",
    n_ctx: int = 4096,
    n_seq_max: int = 1,
    n_batch: int = 512,
    n_ubatch: int = 512,
    type_k: str = "f16",
    type_v: str = "f16",
    flash_attn: FlashAttn = "auto",
    kv_unified: bool = False,
    swa_full: bool = True,
    use_mmap: bool = True,
    dry_run: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> BufferReport:
    """Load ``model_path`` with these settings in a child process; return what llama.cpp allocated.

    With ``rpc_endpoints`` the model uses exactly those endpoints' devices, in that order (tensor_split
    indexes them); without, llama.cpp's default devices (the GPUs it was built for, if any). Byte figures
    are exact where llama_get_memory_breakdown is callable (x86-64; ``report.exact``), else parsed from the
    log. Raises GGUFError, InventoryError, PlanRequestError, DoesNotFitError (a buffer could not be
    allocated) or LoadError (anything else, with llama.cpp's last log lines).
    """
    request = LoadRequest(
        model_path=str(model_path),
        rpc_endpoints=tuple(rpc_endpoints),
        n_gpu_layers=n_gpu_layers,
        tensor_split=tuple(tensor_split) if tensor_split is not None else None,
        main_gpu=main_gpu,
        split_mode=split_mode,
        n_ctx=n_ctx,
        n_seq_max=n_seq_max,
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        type_k=type_k,
        type_v=type_v,
        flash_attn=flash_attn,
        kv_unified=kv_unified,
        swa_full=swa_full,
        use_mmap=use_mmap,
        dry_run=dry_run,
    )
    _check_request(request)
    return _run_child(request, timeout_s)


def _check_request(request: LoadRequest) -> None:
    """Refuse, before spawning anything, what llama.cpp would refuse or silently bend."""
    path = Path(request.model_path)
    if not path.is_file():
        raise GGUFError(f"model file {path} does not exist")
    ggml_type_id(request.type_k)
    ggml_type_id(request.type_v)
    if request.type_v not in _UNQUANTISED and request.flash_attn == "off":
        raise PlanRequestError(
            f"a quantised V cache ({request.type_v}) needs flash attention, but flash_attn is 'off'; "
            "use flash_attn 'on' or 'auto', or an f16 V cache"
        )
    if request.tensor_split is not None:
        from tuner.llamacpp.libs import llama_cpp_module

        max_devices = llama_cpp_module().LLAMA_MAX_DEVICES
        if len(request.tensor_split) > max_devices or any(v < 0 for v in request.tensor_split):
            raise PlanRequestError(
                f"tensor_split {list(request.tensor_split)} must have at most {max_devices} non-negative entries"
            )
    if request.rpc_endpoints:
        from tuner.llamacpp.rpc import probe_rpc_endpoint

        n_devices = sum(probe_rpc_endpoint(endpoint) for endpoint in request.rpc_endpoints)
        if request.tensor_split is not None and len(request.tensor_split) > n_devices:
            raise PlanRequestError(
                f"tensor_split has {len(request.tensor_split)} entries but the RPC endpoints offer "
                f"{n_devices} devices; give one entry per device"
            )


def _run_child(request: LoadRequest, timeout_s: float) -> BufferReport:
    env = dict(os.environ)
    # The child must import this very tuner package, installed or not.
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    # On GGML_ABORT ggml attaches gdb for a backtrace: slow, and it buries the abort message.
    env.setdefault("GGML_NO_BACKTRACE", "1")
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # the inventory's numbering (tuner/inventory/nvidia.py)
    with tempfile.TemporaryDirectory(prefix="llamasplit-load-") as tmp:
        result_path = Path(tmp) / "result.json"
        started = time.monotonic()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "tuner.llamacpp.load", str(result_path)],
                input=request.model_dump_json(),
                capture_output=True,
                text=True,
                timeout=timeout_s,
                env=env,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            tail = _log_tail(exc.stderr if isinstance(exc.stderr, str) else (exc.stderr or b"").decode())
            raise LoadError(
                f"loading {request.model_path} took longer than {timeout_s:g} s; the child was killed", tail
            ) from exc
        elapsed_s = time.monotonic() - started
        tail = _log_tail(proc.stderr)
        if not result_path.exists():
            raise LoadError(
                f"the llama.cpp child process died ({_describe_exit(proc.returncode)}) while loading "
                f"{request.model_path}",
                tail,
            )
        result = json.loads(result_path.read_text())
    if not result["ok"]:
        raise _error_from_child(result["error_type"], result["message"], tail)
    report = BufferReport.model_validate(result["report"])
    report.timings_s["child_process"] = round(elapsed_s, 3)
    return report


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        import signal

        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def _log_tail(stderr: str, n_lines: int = 15) -> list[str]:
    """The last INFO/WARN/ERROR log lines of the child, plus anything ggml wrote to stderr directly."""
    keep: list[str] = []
    for raw in stderr.splitlines():
        level, tab, text = raw.partition("\t")
        if tab and level.isdigit():
            if int(level) >= GGML_LOG_LEVEL_INFO:
                keep.append(text)
        elif raw.strip():
            keep.append(raw)  # GGML_ASSERT / abort messages and Python tracebacks
    return keep[-n_lines:]


_ERRORS: dict[str, type[TunerError]] = {
    cls.__name__: cls for cls in (GGUFError, InventoryError, PlanRequestError, LoadError, TunerError)
}


def _error_from_child(error_type: str, message: str, tail: list[str]) -> TunerError:
    if error_type == "DoesNotFitError":
        return DoesNotFitError(f"{message}\nllama.cpp's last log lines:\n" + "\n".join(tail))
    if error_type == "LoadError":
        return LoadError(message, tail)
    return _ERRORS.get(error_type, TunerError)(message)


# ---------------------------------------------------------------------------------------------------
# Child side: runs in ``python -m tuner.llamacpp.load RESULT_PATH`` with the request on stdin.


def _allocation_failed(lines: list[str]) -> str | None:
    """The line saying a buffer could not be allocated, if that is why llama.cpp gave up."""
    for line in reversed(lines):
        if "unable to allocate" in line or "failed to allocate" in line or "out of memory" in line:
            return line
    return None


def load_in_process(request: LoadRequest) -> BufferReport:
    """Load, create the context, read the sizes, free everything. Call only in a disposable process."""
    from tuner.llamacpp import libs
    from tuner.llamacpp.rpc import rpc_device_pointers

    llama_cpp = libs.llama_cpp_module()
    base = libs.ggml_base()
    llama_cpp.llama_backend_init()
    timings: dict[str, float] = {}
    exact_rows: list[BreakdownRow] = []
    device_buffer_names: dict[str, str] = {}
    with capture_llama_log(sink=sys.stderr) as capture:
        devices = rpc_device_pointers(request.rpc_endpoints) if request.rpc_endpoints else []
        params = llama_cpp.llama_model_default_params()
        # Keep every ctypes array referenced until the model is freed: llama.cpp keeps the pointers.
        device_array = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
        if devices:
            params.devices = ctypes.cast(device_array, ctypes.c_void_p)
        params.n_gpu_layers = request.n_gpu_layers
        params.split_mode = SPLIT_MODES[request.split_mode]
        params.main_gpu = request.main_gpu
        split_array = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*(request.tensor_split or ()))
        if request.tensor_split is not None:
            params.tensor_split = split_array
        if request.dry_run:
            # common/fit.cpp: simulate allocations; mmap must be off or llama.cpp asserts (!ml.no_alloc).
            params.no_alloc = True
            params.load_mode = LLAMA_LOAD_MODE_NONE
        else:
            params.load_mode = LLAMA_LOAD_MODE_MMAP if request.use_mmap else LLAMA_LOAD_MODE_NONE

        started = time.monotonic()
        model = llama_cpp.llama_model_load_from_file(request.model_path.encode(), params)
        timings["model"] = round(time.monotonic() - started, 3)
        if not model:
            _raise_load_failure(capture.tail(), f"llama.cpp could not load {request.model_path}")

        for dev in libs.model_devices(model):
            device_buffer_names[base.ggml_backend_dev_name(dev).decode()] = base.ggml_backend_buft_name(
                base.ggml_backend_dev_buffer_type(dev)
            ).decode()

        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = request.n_ctx
        ctx_params.n_seq_max = request.n_seq_max
        ctx_params.n_batch = request.n_batch
        ctx_params.n_ubatch = request.n_ubatch
        ctx_params.type_k = GGML_TYPE_IDS[request.type_k]
        ctx_params.type_v = GGML_TYPE_IDS[request.type_v]
        ctx_params.flash_attn_type = FLASH_ATTN_TYPES[request.flash_attn]
        ctx_params.kv_unified = request.kv_unified
        ctx_params.swa_full = request.swa_full
        started = time.monotonic()
        ctx = llama_cpp.llama_init_from_model(model, ctx_params)
        timings["context"] = round(time.monotonic() - started, 3)
        if not ctx:
            llama_cpp.llama_model_free(model)
            _raise_load_failure(capture.tail(), "llama.cpp could not create the context")

        if libs.memory_breakdown_supported():
            exact_rows = memory_breakdown_rows(ctx)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)

    report = capture.report()
    report.device_buffer_names = device_buffer_names
    report.timings_s = timings
    if exact_rows:
        apply_memory_breakdown(report, rows=exact_rows)
    elif request.dry_run:
        raise LoadError(
            "a dry run needs llama_get_memory_breakdown (the log prints 0 MiB for simulated buffers), "
            "which ctypes can call only on x86-64 Linux; load for real instead"
        )
    return report


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


def apply_memory_breakdown(
    report: BufferReport, ctx: int | None = None, rows: list[BreakdownRow] | None = None
) -> None:
    """Replace the log's rounded model/KV/compute bytes by llama_get_memory_breakdown's exact ones.

    In-process use (the server, after ``Llama(...)`` inside ``capture_llama_log``):
    ``apply_memory_breakdown(report, llm._ctx.ctx)``. Does nothing where the breakdown cannot be called.
    """
    from tuner.llamacpp import libs

    if rows is None:
        if ctx is None or not libs.memory_breakdown_supported():
            return
        rows = memory_breakdown_rows(ctx)
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


def _raise_load_failure(tail: list[str], message: str) -> None:
    line = _allocation_failed(tail)
    if line is not None:
        raise DoesNotFitError(f"{message}: {line.strip()}")
    raise LoadError(message)


def _child_main(result_path: str) -> None:
    request = LoadRequest.model_validate_json(sys.stdin.read())
    try:
        report = load_in_process(request)
        result = {"ok": True, "report": report.model_dump(mode="json")}
    except TunerError as exc:
        message = str(exc).split("\nllama.cpp's last log lines:")[0]
        result = {"ok": False, "error_type": type(exc).__name__, "message": message}
    tmp_path = result_path + ".tmp"
    Path(tmp_path).write_text(json.dumps(result))
    os.replace(tmp_path, result_path)  # the parent sees a whole file or none
    sys.stderr.flush()
    # Skip interpreter and C++ static teardown: ggml's RPC client threads can stall or crash there, and
    # the process's memory goes back to the system anyway.
    os._exit(0)


if __name__ == "__main__":
    _child_main(sys.argv[1])
