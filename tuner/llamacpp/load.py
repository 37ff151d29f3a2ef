"""Load a model with llama.cpp in a child process and report what it allocated on every device.

``load_and_report`` uses the low-level C API with an explicit device list (the RPC endpoints' devices), so
the placement is exactly llama.cpp's. ``dry_run=True`` is llama.cpp's own memory-fit pass (common/fit.cpp):
``no_alloc`` with load mode NONE, nothing is allocated and the sizes come from llama_get_memory_breakdown.
The child process keeps an abort (GGML_ASSERT) or a leak away from the caller.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from tuner.errors import DoesNotFitError, GGUFError, InventoryError, PlanRequestError, TunerError
from tuner.llamacpp.buffer_log import GGML_LOG_LEVEL_INFO, BufferReport
from tuner.llamacpp.open import LoadError, check_settings
from tuner.plan import LoadSettings

DEFAULT_TIMEOUT_S = 300.0


class LoadRequest(BaseModel):
    """Everything the child process needs; travels as JSON."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_path: str
    settings: LoadSettings = LoadSettings()
    rpc_endpoints: tuple[str, ...] = ()
    dry_run: bool = False
    # Decode this many tokens after the load: buffers a backend allocates only while computing (the all-reduce
    # scratch of split mode "tensor") then exist too.
    warmup_tokens: int = 0


def load_and_report(
    model_path: str | os.PathLike[str],
    settings: LoadSettings | None = None,
    *,
    rpc_endpoints: Sequence[str] = (),
    dry_run: bool = False,
    warmup_tokens: int = 0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> BufferReport:
    """Load ``model_path`` with ``settings`` in a child process; return what llama.cpp allocated.

    With ``rpc_endpoints`` the model uses exactly those endpoints' devices, in that order (tensor_split
    indexes them); without, llama.cpp's default devices (the GPUs it was built for, if any). Byte figures
    are exact where llama_get_memory_breakdown is callable (x86-64; ``report.exact``), else parsed from the
    log. Raises GGUFError, InventoryError, PlanRequestError, DoesNotFitError (a buffer could not be
    allocated) or LoadError (anything else, with llama.cpp's last log lines).
    """
    request = LoadRequest(
        model_path=str(model_path),
        settings=settings or LoadSettings(),
        rpc_endpoints=tuple(rpc_endpoints),
        dry_run=dry_run,
        warmup_tokens=warmup_tokens,
    )
    _check_request(request)
    return _run_child(request, timeout_s)


def _check_request(request: LoadRequest) -> None:
    """Refuse, before spawning anything, what llama.cpp would refuse or silently bend."""
    check_settings(request.model_path, request.settings)
    split = request.settings.tensor_split
    if request.rpc_endpoints:
        from tuner.llamacpp.rpc import probe_rpc_endpoint

        n_devices = sum(probe_rpc_endpoint(endpoint) for endpoint in request.rpc_endpoints)
        if split is not None and len(split) > n_devices:
            raise PlanRequestError(
                f"tensor_split has {len(split)} entries but the RPC endpoints offer "
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
                f"the llama.cpp child process died ({describe_exit(proc.returncode)}) while loading "
                f"{request.model_path}",
                tail,
            )
        result = json.loads(result_path.read_text())
    if not result["ok"]:
        raise _error_from_child(result["error_type"], result["message"], tail)
    report = BufferReport.model_validate(result["report"])
    report.timings_s["child_process"] = round(elapsed_s, 3)
    return report


def describe_exit(returncode: int) -> str:
    """How a child process ended, in words: "killed by SIGABRT" or "exit status 1"."""
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


def load_in_process(request: LoadRequest) -> BufferReport:
    """Open, read the sizes, free everything. Call only in a disposable process."""
    from tuner.llamacpp.open import open_model
    from tuner.llamacpp.rpc import rpc_device_pointers

    devices = rpc_device_pointers(request.rpc_endpoints) if request.rpc_endpoints else []
    opened = open_model(
        request.model_path, request.settings, devices=devices, dry_run=request.dry_run, log_sink=sys.stderr
    )
    if request.warmup_tokens and not request.dry_run:
        _decode_warmup(opened.ctx, min(request.warmup_tokens, request.settings.n_batch, request.settings.n_ctx))
    opened.close()
    return opened.report


def _decode_warmup(ctx: int, n_tokens: int) -> None:
    """Decode ``n_tokens`` copies of token 1 from position 0, as a prompt of that length would."""
    import ctypes

    from tuner.llamacpp.libs import llama_cpp_module

    llama_cpp = llama_cpp_module()
    tokens = (ctypes.c_int32 * n_tokens)(*([1] * n_tokens))
    status = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, n_tokens))
    if status != 0:
        raise LoadError(f"the warm-up decode of {n_tokens} tokens failed (llama_decode returned {status})")


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
