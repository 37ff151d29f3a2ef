"""What a loaded model really allocated, per device, beside what the tuner predicted.

Two measurements: llama.cpp's own per-buffer report (always; exact bytes through llama_get_memory_breakdown
where it can be called, else its log lines to 0.01 MiB), and NVML's used-memory increase over the load
(NVIDIA only; it includes the CUDA context and cuBLAS workspace that llama.cpp does not report).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pydantic import BaseModel

from tuner import Device, Plan, nvml_key
from tuner.llamacpp import BufferReport, BufferSizes

log = logging.getLogger("llamasplit.allocation")


class DeviceMemory(BaseModel):
    """One planned device: the tuner's prediction and what was measured after loading."""

    index: int
    name: str
    kind: str
    predicted_bytes: int
    predicted_weights_bytes: int
    predicted_kv_bytes: int
    predicted_compute_bytes: int
    predicted_overhead_bytes: int
    buffer_name: str | None = None  # llama.cpp's name for this device's buffers (CUDA0, RPC0[host:port])
    actual_bytes: int | None = None  # llama.cpp's buffers on this device
    # Where actual_bytes comes from when not llama.cpp's report (split mode tensor: server/device_usage.py)
    actual_source: str | None = None
    actual: BufferSizes | None = None
    nvml_used_bytes: int | None = None  # NVML "used" increase during the load (NVIDIA only)


class HostMemory(BaseModel):
    predicted_bytes: int
    actual_bytes: int | None = None  # llama.cpp's host buffers (CPU, CPU_Mapped, CPU_REPACK, *_Host)


class MemoryReport(BaseModel):
    exact: bool  # llama.cpp figures from llama_get_memory_breakdown (else log-rounded to 0.01 MiB)
    devices: list[DeviceMemory]
    host: HostMemory
    buffers: dict[str, BufferSizes]


def build_memory_report(
    plan: Plan,
    report: BufferReport | None,
    *,
    nvml_before: dict[str, int] | None = None,
    nvml_after: dict[str, int] | None = None,
    devices: Sequence[Device] = (),
    opened_with: Sequence[int] | None = None,
) -> MemoryReport:
    """Pair each planned device with its llama.cpp buffers (by llama.cpp's device order) and NVML delta.

    ``opened_with``: the plan's device indices the model was opened with, in llama.cpp's order, where that is
    not the whole inventory (an RPC worker without a share is left out); the others get no measurement.
    """
    used = report.devices if report is not None else []
    order = list(opened_with) if opened_with is not None else [dp.index for dp in plan.devices]
    rows: list[DeviceMemory] = []
    for dp in plan.devices:
        position = order.index(dp.index) if dp.index in order else None
        row = DeviceMemory(
            index=dp.index,
            name=dp.name,
            kind=dp.kind,
            predicted_bytes=dp.total_bytes,
            predicted_weights_bytes=dp.weights_bytes,
            predicted_kv_bytes=dp.kv_bytes,
            predicted_compute_bytes=dp.compute_bytes,
            predicted_overhead_bytes=dp.overhead_bytes,
        )
        if report is not None and position is not None:
            buffer_name = _buffer_name(report, used[position].name if position < len(used) else None, dp.name)
            if buffer_name is not None:
                sizes = report.buffer(buffer_name)
                row.buffer_name = buffer_name
                row.actual = sizes
                row.actual_bytes = sizes.total_bytes
        device = devices[dp.index] if dp.index < len(devices) else None
        key = nvml_key(device) if device is not None else None
        if key is not None and nvml_before is not None and nvml_after is not None and key in nvml_after:
            row.nvml_used_bytes = nvml_after[key] - nvml_before.get(key, 0)
        rows.append(row)
    host_actual = sum(s.total_bytes for s in report.host_buffers().values()) if report is not None else None
    return MemoryReport(
        exact=bool(report and report.exact),
        devices=rows,
        host=HostMemory(predicted_bytes=plan.host.total_bytes, actual_bytes=host_actual),
        buffers=dict(report.buffers) if report is not None else {},
    )


def _buffer_name(report: BufferReport, ggml_name: str | None, plan_name: str) -> str | None:
    # RPC device names in the plan already are llama.cpp's buffer names (RPC0[host:port]).
    if plan_name in report.buffers:
        return plan_name
    if ggml_name is None:
        return None
    return report.device_buffer_names.get(ggml_name, ggml_name)


def fill_plan_actuals(plan: Plan, memory: MemoryReport) -> Plan:
    """A copy of the plan whose DevicePlan.actual_bytes holds the measured figures."""
    by_index = {row.index: row for row in memory.devices}
    devices = []
    for dp in plan.devices:
        row = by_index.get(dp.index)
        actual: dict[str, int] | None = None
        if row is not None and (row.actual is not None or row.nvml_used_bytes is not None):
            actual = {}
            if row.actual is not None:
                actual.update(
                    weights_bytes=row.actual.model_bytes,
                    kv_bytes=row.actual.kv_bytes,
                    compute_bytes=row.actual.compute_bytes + row.actual.output_bytes,
                    total_bytes=row.actual.total_bytes,
                )
            if row.nvml_used_bytes is not None:
                actual["nvml_used_bytes"] = row.nvml_used_bytes
        devices.append(dp.model_copy(update={"actual_bytes": actual}))
    return plan.model_copy(update={"devices": devices})
