"""`tune-split --measure`: llama.cpp's own dry run on the real devices, beside the prediction.

llama.cpp can size every buffer without allocating (no_alloc with load mode NONE, as common/fit.cpp does);
``tuner.llamacpp.load_and_report(dry_run=True)`` runs it in a child process. The measured bytes go into each
DevicePlan's ``actual_bytes``; a device where prediction and measurement disagree by more than the
acceptance tolerance (3% or 16 MiB) gets a warning, and the measurement is what counts for fitting.
"""

from __future__ import annotations

from collections.abc import Sequence

from tuner.errors import InventoryError
from tuner.plan import DevicePlan, Plan

MiB = 1024 * 1024


def buffer_name(device: DevicePlan, plan: Plan) -> str:
    """The name llama.cpp gives this device's buffers: RPC devices by endpoint, GPUs as CUDA0 / ROCm0 ..."""
    if device.kind == "rpc":
        return device.name
    same_kind = [d for d in plan.devices if d.kind == device.kind]
    prefix = "CUDA" if device.kind == "cuda" else "ROCm"
    return f"{prefix}{same_kind.index(device)}"


def attach_measurement(plan: Plan, rpc_endpoints: Sequence[str]) -> Plan:
    """Measure ``plan`` with llama.cpp's dry run and return a copy with ``actual_bytes`` per device."""
    from tuner.llamacpp import load_and_report

    if any(d.kind == "simulated" for d in plan.devices):
        raise InventoryError("--measure needs real devices: --gpus only simulates them")
    report = load_and_report(plan.model_path, plan.load_settings(), rpc_endpoints=rpc_endpoints, dry_run=True)
    devices = []
    warnings = list(plan.warnings)
    fits = plan.fits
    for device in plan.devices:
        sizes = report.buffers.get(buffer_name(device, plan))
        if sizes is None:
            devices.append(device)
            continue
        actual = {
            "weights_bytes": sizes.model_bytes,
            "kv_bytes": sizes.kv_bytes,
            "compute_bytes": sizes.compute_bytes,
            "total_bytes": sizes.model_bytes + sizes.kv_bytes + sizes.compute_bytes + device.overhead_bytes,
        }
        predicted = device.total_bytes
        if abs(actual["total_bytes"] - predicted) > max(0.03 * predicted, 16 * MiB):
            warnings.append(
                f"device {device.index}: llama.cpp's dry run needs {actual['total_bytes'] / MiB:.1f} MiB, "
                f"the prediction said {predicted / MiB:.1f} MiB; the measurement counts"
            )
        if actual["total_bytes"] > device.free_bytes - device.reserve_bytes:
            fits = False
        devices.append(device.model_copy(update={"actual_bytes": actual}))
    return plan.model_copy(update={"devices": devices, "warnings": warnings, "fits": fits})
