"""Acceptance: the tuner's own plan, loaded by llama.cpp on 2 and 3 local RPC devices, allocates what the
tuner predicted — weights and KV within 1 MiB per device, the total within 3% or 16 MiB.

Each case asks the tuner for a plan (free memory per device is given to it: an RPC CPU device reports all of
the machine's RAM), loads the model with exactly that plan in a child process, and reads llama.cpp's own
per-device report (exact bytes from llama_get_memory_breakdown where available, else the log).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tuner import PlanRequest, plan_model
from tuner.llamacpp import load_and_report, query_rpc_devices

MiB = 1024 * 1024
pytestmark = pytest.mark.llama


@dataclass(frozen=True)
class Case:
    model: str  # fixture name or synth key
    n_devices: int
    n_ctx: int
    type_kv: str = "f16"
    flash_attn: str = "on"
    n_seq_max: int = 1
    # Free memory per device as a fraction of what the whole model needs: < 1/n forces a spill to the CPU.
    free_share: float = 1.0
    objective: str = "balanced"

    @property
    def id(self) -> str:
        return (
            f"{self.model}-{self.n_devices}dev-ctx{self.n_ctx}-{self.type_kv}-fa{self.flash_attn}"
            f"-np{self.n_seq_max}" + (f"-free{self.free_share}" if self.free_share != 1.0 else "")
        )


CASES = [
    Case("smollm2", 2, 2048, flash_attn="off"),
    Case("smollm2", 3, 8192, "q8_0", "on", n_seq_max=4),
    Case("smollm2", 2, 512, flash_attn="on", n_seq_max=4),
    Case("smollm2", 2, 4096, flash_attn="off", free_share=0.3),
    Case("gemma3", 2, 4096, flash_attn="on"),
    Case("gemma3", 3, 1024, "q8_0", "on", n_seq_max=4),
    Case("gemma3", 2, 8192, flash_attn="off"),
    Case("tiny-llama-q4_0", 3, 8192, flash_attn="off", n_seq_max=4),
    Case("tiny-qwen2-q8_0", 2, 2048, "q8_0", "on"),
    Case("tiny-gemma3-q4_k_m", 2, 4096, flash_attn="off"),
    Case("tiny-moe-q5_k_m", 3, 1024, flash_attn="on", n_seq_max=4),
    Case("tiny-moe-q5_k_m", 2, 8192, "q8_0", "on", objective="speed"),
]


def model_path(case: Case, request: pytest.FixtureRequest, synth_model) -> Path:  # type: ignore[no-untyped-def]
    if case.model in ("smollm2", "gemma3"):
        return request.getfixturevalue(case.model)
    return synth_model(case.model)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_plan_matches_llama_cpp_allocation(
    case: Case, rpc_endpoints: list[str], request: pytest.FixtureRequest, synth_model
) -> None:  # type: ignore[no-untyped-def]
    path = model_path(case, request, synth_model)
    endpoints = rpc_endpoints[: case.n_devices]
    settings = PlanRequest(
        n_ctx=case.n_ctx, n_seq_max=case.n_seq_max, type_k=case.type_kv, type_v=case.type_kv,
        flash_attn=case.flash_attn, objective=case.objective, reserve_bytes=0,  # type: ignore[arg-type]
    )
    # First plan with unlimited memory to learn the size, then give each device the chosen share of it.
    devices = query_rpc_devices(endpoints)
    sizing = plan_model(path, settings, devices)
    need = sum(d.total_bytes for d in sizing.devices)
    free = int(need * (case.free_share if case.free_share != 1.0 else 1.0 / case.n_devices * 1.6))
    devices = [d.model_copy(update={"free_bytes": free}) for d in devices]
    plan = plan_model(path, settings, devices)
    assert plan.fits

    # The load settings come from the plan alone: what the server loads with.
    report = load_and_report(path, plan.load_settings(), rpc_endpoints=endpoints)
    tolerance = report.tolerance_bytes
    logged_layers = report.layers_per_device()
    if logged_layers:  # "layer N assigned to device X" lines (debug level)
        by_buffer = {report.device_buffer_names.get(name, name): n for name, n in logged_layers.items()}
        assert {d.name: d.n_layers for d in plan.devices if d.n_layers} == {
            name: n for name, n in by_buffer.items() if name != "CPU"
        }
    for device in plan.devices:
        actual = report.buffers.get(device.name)
        if actual is None:
            assert device.weights_bytes == device.kv_bytes == 0, device.name
            continue
        where = f"{device.name}: predicted {device.model_dump(include={'weights_bytes', 'kv_bytes', 'compute_bytes'})}"
        assert abs(actual.model_bytes - device.weights_bytes) <= MiB + tolerance, where
        assert abs(actual.kv_bytes - device.kv_bytes) <= MiB + tolerance, where
        predicted_total = device.weights_bytes + device.kv_bytes + device.compute_bytes
        allowed = max(0.03 * actual.total_bytes, 16 * MiB)

        assert abs(actual.total_bytes - predicted_total) <= allowed, (
            f"{where}; llama.cpp: model {actual.model_bytes}, kv {actual.kv_bytes}, compute {actual.compute_bytes}"
        )
