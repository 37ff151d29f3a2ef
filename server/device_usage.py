"""Per-device actual bytes in split mode "tensor", where llama.cpp's own report shows only the Meta() device.

The engine measures each device from outside llama.cpp while it loads (tuner.llamacpp.device_usage: ggml's free
memory before and after, or a local RPC server's process growth); this fills /v1/plan's actual bytes per device
from those figures and says which source each one came from. A device without a source keeps no figure: the
Meta() aggregate is never divided by the prediction.
"""

from __future__ import annotations

from server.allocation import MemoryReport
from tuner import Plan
from tuner.llamacpp import BufferReport, DeviceUsage


def fill_tensor_actuals(plan: Plan, memory: MemoryReport, report: BufferReport) -> tuple[Plan, MemoryReport]:
    """The plan and memory report with each tensor-split device's measured bytes (unchanged in other modes)."""
    if plan.split_mode != "tensor" or not report.device_usage:
        return plan, memory
    used_names = [device.name for device in report.devices]
    rows = []
    measured: dict[int, int | None] = {}
    for position, row in enumerate(memory.devices):
        if row.buffer_name is not None and row.buffer_name.startswith("Meta("):
            # Paired by position with the Meta() aggregate (the largest slice of each kind): not this device's.
            row = row.model_copy(update={"buffer_name": None, "actual": None, "actual_bytes": None})
        usage = _usage_of(row.name, used_names[position] if position < len(used_names) else None, report)
        figure = usage.used() if usage is not None else None
        measured[row.index] = figure[0] if figure is not None else None
        if figure is not None:
            row = row.model_copy(update={"actual_bytes": figure[0], "actual_source": figure[1]})
        rows.append(row)
    devices = []
    for dp in plan.devices:
        # Only what was measured for this device: NVML's figure, and the total from its source.
        actual = {k: v for k, v in (dp.actual_bytes or {}).items() if k == "nvml_used_bytes"}
        total = measured.get(dp.index)
        if total is not None:
            actual["total_bytes"] = total
        devices.append(dp.model_copy(update={"actual_bytes": actual or None}))
    return plan.model_copy(update={"devices": devices}), memory.model_copy(update={"devices": rows})


def _usage_of(plan_name: str, ggml_name: str | None, report: BufferReport) -> DeviceUsage | None:
    # RPC devices in a plan are named like their buffers (RPC0[host:port]); GPUs by llama.cpp's device order.
    if plan_name in report.device_usage:
        return report.device_usage[plan_name]
    if ggml_name is None:
        return None
    return report.device_usage.get(report.device_buffer_names.get(ggml_name, ggml_name))
