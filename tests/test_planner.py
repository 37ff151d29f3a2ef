"""The planner on simulated cards: fits every budget, spills when short, prefers fast cards, explains refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuner import DoesNotFitError, PlanRequest, PlanRequestError, plan_model
from tuner.devices import Device
from tuner.gguf import read_model
from tuner.inventory import discover_devices
from tuner.layout import RuntimeSettings
from tuner.memory.predict import MemoryModel
from tuner.speed import layer_split_token_time_s
from tuner.split import layer_counts

GiB = 1024**3


def card(name: str, gib: float, bandwidth_gbs: float) -> Device:
    size = int(gib * GiB)
    return Device(
        name=name, kind="simulated", backend="cuda", total_bytes=size, free_bytes=size,
        bandwidth_bytes_per_s=bandwidth_gbs * 1e9,
    )


@pytest.fixture(scope="module")
def big(synth_model) -> Path:  # type: ignore[no-untyped-def]
    return synth_model("llama-70b-q4_k_m")


@pytest.fixture(scope="module")
def mid(synth_model) -> Path:  # type: ignore[no-untyped-def]
    return synth_model("llama-8b-q4_0")


def test_plan_fits_every_device_budget(big: Path) -> None:
    devices = discover_devices(gpus="RTX 4090,RTX 4080")
    plan = plan_model(big, PlanRequest(n_ctx=8192), devices)
    assert plan.fits
    for device in plan.devices:
        assert device.free_after_bytes >= 0
        parts = device.weights_bytes + device.kv_bytes + device.compute_bytes + device.overhead_bytes
        assert device.total_bytes == parts
        assert device.free_after_bytes == device.free_bytes - device.reserve_bytes - device.total_bytes


def test_plan_spills_to_cpu_when_vram_short(big: Path) -> None:
    plan = plan_model(big, PlanRequest(n_ctx=8192), discover_devices(gpus="24GiB,16GiB"))
    assert plan.fits and plan.n_gpu_layers < plan.n_layer + 1
    assert plan.host.layers == (0, plan.n_layer - plan.n_gpu_layers)
    assert plan.host.kv_bytes > 0 and any("stay on the CPU" in w for w in plan.warnings)


def test_llama_cpp_default_split_overflows_where_our_plan_fits(big: Path) -> None:
    devices = discover_devices(gpus="RTX 4090,RTX 4080")
    # llama.cpp's default: every layer on the GPUs, proportional to free memory.
    default = PlanRequest(n_ctx=8192, n_gpu_layers=99, tensor_split=tuple(d.free_bytes / GiB for d in devices))
    theirs = plan_model(big, default, devices, strict=False)
    ours = plan_model(big, PlanRequest(n_ctx=8192), devices)
    assert not theirs.fits and ours.fits
    assert "GiB short" in theirs.verdict


def test_speed_objective_puts_more_layers_on_the_faster_card(big: Path) -> None:
    fast, slow = card("fast", 32, 1000), card("slow", 32, 400)
    speed = plan_model(big, PlanRequest(n_ctx=4096), [slow, fast])
    balanced = plan_model(big, PlanRequest(n_ctx=4096, objective="balanced"), [slow, fast])
    assert speed.devices[1].n_layers > speed.devices[0].n_layers
    assert speed.predicted_tokens_per_s > balanced.predicted_tokens_per_s  # type: ignore[operator]
    headroom = [d.free_after_bytes for d in balanced.devices]
    assert abs(headroom[0] - headroom[1]) < 1.5 * GiB  # within about one 70B layer


def test_tensor_split_reproduces_planned_counts(big: Path) -> None:
    plan = plan_model(big, PlanRequest(n_ctx=8192), discover_devices(gpus="RTX 4090,RTX 4080"))
    counts = layer_counts(plan.tensor_split, plan.n_layer, plan.n_gpu_layers)
    assert counts == [d.n_layers for d in plan.devices]


def test_given_placement_is_evaluated_not_changed(mid: Path) -> None:
    devices = discover_devices(gpus="RTX 4090,RTX 4080")
    plan = plan_model(mid, PlanRequest(n_ctx=8192, tensor_split=(1.0, 3.0)), devices)
    assert plan.tensor_split == (1.0, 3.0)
    assert [d.n_layers for d in plan.devices] == layer_counts((1, 3), plan.n_layer, plan.n_layer + 1)
    assert plan.verdict.startswith("the given placement fits")


def test_given_placement_that_overflows_is_refused_with_numbers(big: Path) -> None:
    devices = discover_devices(gpus="RTX 4090,RTX 4080")
    with pytest.raises(DoesNotFitError) as caught:
        plan_model(big, PlanRequest(n_ctx=8192, n_gpu_layers=99, tensor_split=(1.0, 1.0)), devices)
    message = str(caught.value)
    assert "RTX 4080 (device 1) is" in message and "GiB short" in message
    assert "What would help" in message and "q8_0" in message
    assert caught.value.closest is not None and not caught.value.closest.fits


def test_max_ctx_is_the_largest_context_that_fits(mid: Path) -> None:
    devices = [card("a", 12, 900), card("b", 8, 700)]
    plan = plan_model(mid, PlanRequest(max_ctx=True), devices)
    assert plan.fits and plan.n_gpu_layers == plan.n_layer + 1 and plan.n_ctx % 256 == 0
    bigger = plan_model(mid, PlanRequest(n_ctx=plan.n_ctx + 256, n_gpu_layers=99), devices, strict=False)
    assert not bigger.fits or bigger.n_gpu_layers < plan.n_layer + 1


def test_quantised_v_cache_needs_flash_attention(mid: Path) -> None:
    with pytest.raises(PlanRequestError, match="needs flash attention"):
        plan_model(mid, PlanRequest(type_v="q8_0", flash_attn="off"), [card("a", 24, 1000)])


def test_q8_0_cache_halves_kv(mid: Path) -> None:
    devices = [card("a", 24, 1000)]
    f16 = plan_model(mid, PlanRequest(n_ctx=8192), devices)
    q8 = plan_model(mid, PlanRequest(n_ctx=8192, type_k="q8_0", type_v="q8_0"), devices)
    assert q8.devices[0].kv_bytes * 32 == f16.devices[0].kv_bytes * 17  # q8_0: 34 bytes per 32 values


@pytest.mark.parametrize(
    ("request_args", "match"),
    [
        ({"tensor_split": (1.0, 1.0, 1.0)}, "3 entries for 2 devices"),
        ({"main_gpu": 5}, "out of range"),
        ({"type_k": "q9_9"}, "unknown KV cache type"),
        ({"n_ubatch": 1024, "n_batch": 512}, "larger than the batch"),
    ],
    ids=["split-length", "main-gpu", "cache-type", "ubatch"],
)
def test_inconsistent_requests_are_refused(mid: Path, request_args: dict, match: str) -> None:
    with pytest.raises(PlanRequestError, match=match):
        plan_model(mid, PlanRequest(**request_args), [card("a", 24, 1000), card("b", 16, 700)])


def test_split_modes_are_all_evaluated(big: Path) -> None:
    devices = discover_devices(gpus="RTX 4090,RTX 4090")
    plan = plan_model(big, PlanRequest(n_ctx=4096), devices, strict=False)
    modes = {a.split_mode: a for a in plan.alternatives}
    assert set(modes) == {"layer", "tensor", "row", "none"}
    assert not modes["none"].fits  # 40 GiB of weights do not fit one card
    assert modes["tensor"].fits and not modes["row"].fits  # row split no longer exists in this llama.cpp


def test_row_split_rated_unavailable_on_rpc_devices(mid: Path) -> None:
    rpc = Device(name="CPU", kind="rpc", backend="cpu", total_bytes=16 * GiB, free_bytes=16 * GiB)
    plan = plan_model(mid, PlanRequest(n_ctx=2048), [rpc, rpc])
    row = next(a for a in plan.alternatives if a.split_mode == "row")
    assert not row.fits and "RPC" in row.note


def test_no_devices_plans_cpu_only(mid: Path) -> None:
    plan = plan_model(mid, PlanRequest(n_ctx=2048), [])
    assert plan.n_gpu_layers == 0 and plan.devices == [] and plan.host.layers == (0, plan.n_layer - 1)


def test_planning_a_70b_shape_is_instant(big: Path) -> None:
    import time

    devices = discover_devices(gpus="RTX 4090,RTX 4080")
    started = time.process_time()
    plan_model(big, PlanRequest(n_ctx=8192), devices)
    # Generous bound for a loaded CI box; bench/bench_plan.py measures the real figure against GGUFReader.
    assert time.process_time() - started < 2.0


@pytest.mark.parametrize(
    ("shape_key", "n_embd_vocab", "measured_tok_s"),
    [("8b", 49152, 283.9), ("70b", 49152, 52.6)],
)
def test_speed_model_reproduces_h100_decode(
    synth_dir: Path, shape_key: str, n_embd_vocab: int, measured_tok_s: float
) -> None:
    from tests.kit import synth

    base = synth.LLAMA_8B if shape_key == "8b" else synth.LLAMA_70B
    path = synth_dir / f"h100-{shape_key}-q4_0-pure.gguf"
    if not path.exists():
        synth.write_gguf(path, base.replace(n_vocab=n_embd_vocab), "Q4_0", sparse=True, pure=True)
    model = read_model(path)
    h100 = card("H100 SXM", 80, 3350)
    memory = MemoryModel(model, [h100], RuntimeSettings(n_ctx=512))
    layout = memory.layout([model.n_layer + 1])
    device_bytes, host_bytes = memory.read_bytes_per_token(layout)
    seconds = layer_split_token_time_s(device_bytes, [h100.bandwidth_bytes_per_s], [model.n_layer + 1], host_bytes, 0)
    assert 1 / seconds == pytest.approx(measured_tok_s, rel=0.05)


def test_host_ram_shortage_names_the_host_and_host_remedies(mid: Path) -> None:
    plan = plan_model(mid, PlanRequest(n_ctx=8192, host_free_bytes=GiB), [], strict=False)
    assert not plan.fits
    assert "host RAM needs" in plan.verdict and "saves 0.00" not in plan.verdict
    assert "q8_0" in plan.verdict


def test_gpu_layers_without_devices_is_not_silently_dropped(mid: Path) -> None:
    plan = plan_model(mid, PlanRequest(n_ctx=2048, n_gpu_layers=10), [])
    assert any("--n-gpu-layers 10 has no effect" in w for w in plan.warnings)
