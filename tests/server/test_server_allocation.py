"""Actual memory per device: llama.cpp's buffers matched to the plan's devices, and NVML's used-memory
increase, from answers recorded on an H100 (/work/shared/data/h100-llama-cpp-buffers.json, run 1: an 8B
llama, Q4_0, n_ctx 4096, all layers offloaded, flash attention off). NVML is the one faked library: this
machine has no NVIDIA driver, so pynvml answers with the recorded figures."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from server.allocation import build_memory_report, fill_plan_actuals
from tests.kit import synth
from tuner import PlanRequest, nvml_used_bytes, plan_model
from tuner.devices import Device
from tuner.llamacpp.buffer_log import parse_log

MiB = 1024 * 1024
UUID = "GPU-5b1f6c2e-8f2a-4c55-9a0e-2d4f3e1b7c90"
BUS_ID = "00000000:18:00.0"  # NVML's form; llama.cpp and the tuner write 0000:18:00.0
NVML_USED_BEFORE_MIB = 480.0  # the H100's reserved memory, before any CUDA context
NVML_DELTA_MIB = 5193.6  # NVML "used" rose this much over the load (CUDA context included)
H100 = Device(
    name="NVIDIA H100 80GB HBM3", kind="cuda", backend="cuda", total_bytes=int((81559 - 480) * MiB),
    free_bytes=int((81559 - 480) * MiB), bandwidth_bytes_per_s=3.35e12, uuid=UUID, pci_bus_id="0000:18:00.0",
)  # fmt: skip
# llama.cpp's log lines of that load (INFO = 2 in this ggml), as llama.cpp prints them.
LOG = [
    "llama_prepare_model_devices: using device CUDA0 (NVIDIA H100 80GB HBM3) (0000:18:00.0) - 80561 MiB free",
    "load_tensors:   CPU_Mapped model buffer size =   108.00 MiB",
    "load_tensors:        CUDA0 model buffer size =  3853.02 MiB",
    "llama_context:  CUDA_Host  output buffer size =     0.19 MiB",
    "llama_kv_cache:      CUDA0 KV buffer size =   512.00 MiB",
    "sched_reserve:      CUDA0 compute buffer size =   300.01 MiB",
    "sched_reserve:  CUDA_Host compute buffer size =    28.01 MiB",
]
LLAMA_8B_V49K = synth.ModelShape(
    arch="llama", n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=49152,
    n_ctx_train=131072, rope_freq_base=500_000.0, name="h100-run-model",
)  # fmt: skip


class FakeNvml:
    """pynvml's calls that allocation.py makes, answering like nvidia-ml-py 12 on the recorded H100."""

    class NVMLError(Exception):
        pass

    def __init__(self, used_mib: list[float], fail_init: bool = False) -> None:
        self._used = list(used_mib)  # one value per snapshot
        self._fail_init = fail_init
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self._fail_init:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> object:
        return ("handle", index)

    def nvmlDeviceGetUUID(self, handle: object) -> str:
        return UUID

    def nvmlDeviceGetPciInfo(self, handle: object) -> Any:
        return SimpleNamespace(busId=BUS_ID.encode())  # a bytes field, as in the real struct

    def nvmlDeviceGetMemoryInfo(self, handle: object) -> Any:
        used = int(self._used.pop(0) * MiB)
        total = 81559 * MiB
        return SimpleNamespace(total=total, used=used, free=total - used)


@pytest.fixture(scope="module")
def h100_plan(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = synth.write_gguf(
        tmp_path_factory.mktemp("h100") / "llama8b.gguf", LLAMA_8B_V49K, "Q4_0", sparse=True, pure=True
    )
    return plan_model(path, PlanRequest(n_ctx=4096, n_gpu_layers=33, flash_attn="off"), [H100])


def test_nvml_snapshot_is_keyed_by_uuid_and_normalised_bus_id(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml([NVML_USED_BEFORE_MIB])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    used = nvml_used_bytes()
    assert used == {UUID: int(480 * MiB), "0000:18:00.0": int(480 * MiB)}
    assert fake.shutdowns == 1


def test_no_nvml_means_no_nvml_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([], fail_init=True))
    assert nvml_used_bytes() is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: the import fails
    assert nvml_used_bytes() is None


def test_memory_report_pairs_the_plans_gpu_with_its_buffers_and_nvml_delta(
    h100_plan: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([NVML_USED_BEFORE_MIB, NVML_USED_BEFORE_MIB + NVML_DELTA_MIB]))
    before, after = nvml_used_bytes(), nvml_used_bytes()
    report = parse_log([(2, line) for line in LOG])
    memory = build_memory_report(h100_plan, report, nvml_before=before, nvml_after=after, devices=[H100])

    (gpu,) = memory.devices
    assert gpu.name == H100.name and gpu.buffer_name == "CUDA0"
    assert gpu.predicted_bytes == h100_plan.devices[0].total_bytes
    assert gpu.actual is not None
    assert gpu.actual.model_bytes == round(3853.02 * MiB)
    assert gpu.actual.kv_bytes == 512 * MiB
    assert gpu.actual_bytes == round(3853.02 * MiB) + 512 * MiB + round(300.01 * MiB)
    assert gpu.nvml_used_bytes == int((NVML_USED_BEFORE_MIB + NVML_DELTA_MIB) * MiB) - int(480 * MiB)
    assert memory.host.actual_bytes == round(108 * MiB) + round(28.01 * MiB) + round(0.19 * MiB)
    assert memory.host.predicted_bytes == h100_plan.host.total_bytes
    assert not memory.exact

    planned = fill_plan_actuals(h100_plan, memory)
    actual = planned.devices[0].actual_bytes
    assert actual is not None
    assert actual["total_bytes"] == gpu.actual_bytes
    assert actual["weights_bytes"] == gpu.actual.model_bytes
    assert actual["nvml_used_bytes"] == gpu.nvml_used_bytes
    # The tuner's own prediction for this load, against the recorded truth (weights and KV are exact sums).
    assert abs(h100_plan.devices[0].kv_bytes - 512 * MiB) <= 1 * MiB
    assert abs(h100_plan.devices[0].weights_bytes - round(3853.02 * MiB)) <= 1 * MiB


def test_rpc_devices_are_matched_by_their_buffer_names(tmp_path: Path) -> None:
    path = synth.write_gguf(tmp_path / "small.gguf", synth.SMOLLM2_135M, "Q4_0", sparse=True)
    devices = [
        Device(name=f"RPC0[127.0.0.1:{port}]", kind="rpc", backend="cpu", total_bytes=8 << 30, free_bytes=8 << 30,
               endpoint=f"127.0.0.1:{port}")
        for port in (50052, 50053)
    ]  # fmt: skip
    plan = plan_model(path, PlanRequest(n_ctx=2048, n_gpu_layers=31, tensor_split=(0.6, 0.4)), devices)
    log = [
        "llama_prepare_model_devices: using device RPC0 (127.0.0.1:50052) (unknown id) - 8192 MiB free",
        "llama_prepare_model_devices: using device RPC1 (127.0.0.1:50053) (unknown id) - 8192 MiB free",
        "load_tensors: RPC0[127.0.0.1:50052] model buffer size =    40.16 MiB",
        "load_tensors: RPC0[127.0.0.1:50053] model buffer size =    51.94 MiB",
        "llama_kv_cache: RPC0[127.0.0.1:50052] KV buffer size =    28.50 MiB",
        "llama_kv_cache: RPC0[127.0.0.1:50053] KV buffer size =    16.50 MiB",
    ]
    memory = build_memory_report(plan, parse_log([(2, line) for line in log]), devices=devices)
    assert [row.buffer_name for row in memory.devices] == ["RPC0[127.0.0.1:50052]", "RPC0[127.0.0.1:50053]"]
    assert [row.actual_bytes for row in memory.devices] == [
        round(40.16 * MiB) + round(28.5 * MiB),
        round(51.94 * MiB) + round(16.5 * MiB),
    ]
    assert all(row.nvml_used_bytes is None for row in memory.devices)
