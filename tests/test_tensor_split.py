"""Split mode "tensor": the per-device prediction against what the RPC servers allocated, the refusals, and a
live load.

tests/data/tensor_measurements.json (bench/measure_tensor.py) holds, per case, the buffers each RPC server
logged with GGML_RPC_DEBUG=1 after loading the model with ``-sm tensor`` and decoding one full batch: that log
is the per-device truth, since llama.cpp reports only the aggregate Meta() device in this mode.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kit.rpcbed import classify, logged_rpc_servers, rpc_servers
from tuner import PlanRequest
from tuner.devices import Device
from tuner.errors import PlanRequestError
from tuner.gguf import read_model
from tuner.llamacpp import load_and_report
from tuner.model import ModelInfo
from tuner.planner import ROW_UNAVAILABLE, plan
from tuner.speed import SpeedModel, allreduce_steps_per_token, calibrate_allreduce

MiB = 1024 * 1024
GiB = 1024 * MiB
DATA = json.loads((Path(__file__).parent / "data" / "tensor_measurements.json").read_text())
MEASURED = [c for c in DATA["cases"] if "measured" in c]
CRASHED = [c for c in DATA["cases"] if "error" in c]


@functools.cache
def _read(path: str) -> ModelInfo:
    return read_model(path)


@pytest.fixture
def model_by_key(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    def get(key: str) -> ModelInfo:
        if key == "smollm2":
            return _read(str(request.getfixturevalue("smollm2")))
        if key == "gemma3-270m":
            return _read(str(request.getfixturevalue("gemma3")))
        return _read(str(request.getfixturevalue("synth_model")(key)))

    return get


def rpc_devices(n: int, free_bytes: int = 64 * GiB) -> list[Device]:
    """Devices as query_rpc_devices describes local CPU-backed RPC servers."""
    return [
        Device(name=f"RPC0[127.0.0.1:{50052 + i}]", kind="rpc", backend="cpu", total_bytes=free_bytes,
               free_bytes=free_bytes, endpoint=f"127.0.0.1:{50052 + i}")
        for i in range(n)
    ]  # fmt: skip


def request_for(case: dict) -> PlanRequest:  # type: ignore[type-arg]
    settings = case["settings"]
    return PlanRequest(
        split_mode="tensor", tensor_split=tuple(case["tensor_split"]) if case["tensor_split"] else None,
        n_gpu_layers=case["n_gpu_layers"], n_ctx=settings["n_ctx"], n_seq_max=settings.get("n_seq_max", 1),
        n_ubatch=settings.get("n_ubatch", 512), type_k=settings.get("type_k", "f16"),
        type_v=settings.get("type_v", "f16"), flash_attn=settings["flash_attn"],
        swa_full=settings.get("swa_full", True), reserve_bytes=0,
    )  # fmt: skip


@pytest.mark.parametrize("case", MEASURED, ids=[c["id"] for c in MEASURED])
def test_tensor_split_prediction_matches_rpc_allocation_logs(case: dict, model_by_key) -> None:  # type: ignore[no-untyped-def,type-arg]
    model = model_by_key(case["model"])
    result = plan(model, rpc_devices(case["n_rpc"]), request_for(case))
    assert result.split_mode == "tensor" and result.fits
    for device, measured in zip(result.devices, case["measured"], strict=True):
        where = f"device {device.index}: predicted {device.weights_bytes}/{device.kv_bytes}/{device.compute_bytes}"
        assert abs(device.weights_bytes - measured["weights_bytes"]) <= MiB, f"{where}, measured {measured}"
        assert abs(device.kv_bytes - measured["kv_bytes"]) <= MiB, f"{where}, measured {measured}"
        actual_total = measured["weights_bytes"] + measured["kv_bytes"] + measured["compute_bytes"]
        predicted_total = device.weights_bytes + device.kv_bytes + device.compute_bytes
        assert abs(actual_total - predicted_total) <= max(0.03 * actual_total, 16 * MiB), f"{where}, {measured}"


@pytest.mark.parametrize("case", MEASURED, ids=[c["id"] for c in MEASURED])
def test_tensor_split_prediction_is_exact_on_rpc_devices(case: dict, model_by_key) -> None:  # type: ignore[no-untyped-def,type-arg]
    """Stronger than the tolerance: weights, KV and compute (with the all-reduce scratch) to the byte."""
    model = model_by_key(case["model"])
    result = plan(model, rpc_devices(case["n_rpc"]), request_for(case))
    predicted = [
        {"weights_bytes": d.weights_bytes, "kv_bytes": d.kv_bytes, "compute_bytes": d.compute_bytes}
        for d in result.devices
    ]
    assert predicted == case["measured"]


# What llama.cpp printed as it aborted, as the tuner's refusal quotes it.
ABORTS = ("tensor write out of bounds", "unsupported mul_mat split states")


@pytest.mark.parametrize("case", CRASHED, ids=[c["id"] for c in CRASHED])
def test_tensor_split_refuses_the_cut_that_aborted_llama_cpp(case: dict, model_by_key) -> None:  # type: ignore[no-untyped-def,type-arg]
    model = model_by_key(case["model"])
    abort = next(phrase for phrase in ABORTS if phrase in case["last_line"])
    with pytest.raises(PlanRequestError, match=abort):
        plan(model, rpc_devices(case["n_rpc"]), request_for(case))


def test_tensor_split_refuses_flash_attention_off(smollm2: Path) -> None:
    request = PlanRequest(split_mode="tensor", flash_attn="off")
    with pytest.raises(PlanRequestError, match=r"requires flash_attn to be enabled.*--flash-attn on"):
        plan(_read(str(smollm2)), rpc_devices(2), request)


def test_tensor_split_refuses_an_excluded_architecture(smollm2: Path) -> None:
    model = dataclasses.replace(_read(str(smollm2)), architecture="olmoe")
    with pytest.raises(PlanRequestError, match=r"not implemented for architecture 'olmoe'.*--split-mode layer"):
        plan(model, rpc_devices(2), PlanRequest(split_mode="tensor"))


@pytest.mark.parametrize("gpus", ["cuda", "rocm", "rpc"])
def test_row_split_is_refused_on_every_device_kind(smollm2: Path, gpus: str) -> None:
    if gpus == "rpc":
        devices = rpc_devices(2)
    else:
        devices = [
            Device(name=f"GPU{i}", kind=gpus, backend=gpus, total_bytes=24 * GiB, free_bytes=24 * GiB)  # type: ignore[arg-type]
            for i in range(2)
        ]
    with pytest.raises(PlanRequestError, match="row is not available on CUDA, ROCm, RPC or CPU"):
        plan(_read(str(smollm2)), devices, PlanRequest(split_mode="row"))
    alternatives = {a.split_mode: a for a in plan(_read(str(smollm2)), devices, PlanRequest()).alternatives}
    assert not alternatives["row"].fits and ROW_UNAVAILABLE in alternatives["row"].note


def test_tensor_split_plans_proportions_for_mismatched_cards(synth_model) -> None:  # type: ignore[no-untyped-def]
    """The 4090 + 4080 example: every device within its budget, the larger card taking the larger share."""
    from tuner.inventory.simulated import simulated_devices

    model = read_model(str(synth_model("llama-70b-q4_k_m")))
    result = plan(model, simulated_devices("RTX 4090,RTX 4080"), PlanRequest(split_mode="tensor", n_ctx=8192))
    assert result.fits and result.split_mode == "tensor"
    assert result.tensor_split[0] > result.tensor_split[1]
    assert all(d.free_after_bytes >= 0 for d in result.devices)
    assert 60 <= result.n_gpu_layers <= 81
    assert {a.split_mode for a in result.alternatives} == {"layer", "none", "tensor", "row"}


def test_tensor_split_max_ctx_and_shortfall(smollm2: Path) -> None:
    model = _read(str(smollm2))
    small = rpc_devices(2, free_bytes=220 * MiB)
    best = plan(model, small, PlanRequest(split_mode="tensor", max_ctx=True, reserve_bytes=0))
    assert best.fits and best.n_gpu_layers == model.n_layer + 1 and 256 <= best.n_ctx < model.n_ctx_train
    larger = plan(model, small, PlanRequest(split_mode="tensor", n_ctx=best.n_ctx + 256, reserve_bytes=0))
    assert larger.n_gpu_layers < model.n_layer + 1  # one step more context no longer fits every layer
    over = plan(model, small, PlanRequest(split_mode="tensor", n_ctx=model.n_ctx_train, n_gpu_layers=31,
                                          tensor_split=(0.5, 0.5), reserve_bytes=0))  # fmt: skip
    assert not over.fits and "short" in over.verdict and "What would help" in over.verdict


def test_latency_objective_picks_tensor_split_when_predicted_faster(synth_model) -> None:  # type: ignore[no-untyped-def]
    from tuner.inventory.simulated import simulated_devices

    model = read_model(str(synth_model("llama-70b-q4_k_m")))
    devices = simulated_devices("2x RTX 4090")
    latency = plan(model, devices, PlanRequest(n_ctx=8192, objective="latency"))
    throughput = plan(model, devices, PlanRequest(n_ctx=8192, objective="throughput"))
    assert latency.split_mode == "tensor" and throughput.split_mode == "layer"
    by_mode = {a.split_mode: a for a in latency.alternatives}
    assert (by_mode["tensor"].predicted_tokens_per_s or 0) > (by_mode["layer"].predicted_tokens_per_s or 0)
    assert (by_mode["layer"].batch_tokens_per_s or 0) > (by_mode["tensor"].batch_tokens_per_s or 0)


def test_gguf_reader_takes_per_layer_head_counts_and_ffn_widths(synth_model) -> None:  # type: ignore[no-untyped-def]
    from tests.kit.synth import TINY_OPENELM

    model = read_model(str(synth_model("tiny-openelm-q4_0")))
    assert (model.n_head, model.n_head_kv, model.n_ff) == (
        TINY_OPENELM.layer_n_head, TINY_OPENELM.layer_n_head_kv, TINY_OPENELM.layer_n_ff,
    )  # fmt: skip
    assert model.n_embd_head_k == model.n_embd_head_v == 64
    # every layer's cache row is its own width: 64 x KV heads
    assert [model.n_embd_k_gqa(il) for il in range(model.n_layer)] == [64, 128, 128, 256]


@pytest.mark.llama
@pytest.mark.parametrize("flash_attn", ["on", "off"])
def test_variable_layer_model_in_layer_split_allocates_the_prediction(synth_model, flash_attn: str) -> None:  # type: ignore[no-untyped-def]
    """OpenELM's per-layer shapes in split mode layer on two RPC devices, against llama.cpp's own per-device
    report, to the byte (without flash attention the V cache is padded to the widest layer; the attention
    residual is added as (residual, attention), which decides what the in-place ADD reuses)."""
    path = synth_model("tiny-openelm-q4_0")
    with rpc_servers(2) as endpoints:
        result = plan(read_model(str(path)), rpc_devices(2), PlanRequest(
            split_mode="layer", tensor_split=(0.6, 0.4), n_ctx=2048, flash_attn=flash_attn, reserve_bytes=0,
        ))  # fmt: skip
        report = load_and_report(path, result.load_settings(), rpc_endpoints=endpoints)
    assert report.exact
    for device, endpoint in zip(result.devices, endpoints, strict=True):
        measured = report.buffer(f"RPC0[{endpoint}]")
        assert (device.weights_bytes, device.kv_bytes, device.compute_bytes) == (
            measured.model_bytes, measured.kv_bytes, measured.compute_bytes,
        ), device.name  # fmt: skip


def test_device_usage_finds_the_process_listening_on_a_loopback_endpoint() -> None:
    """The /proc walk that ties an RPC endpoint to its server process, tried on a socket this test listens on."""
    import os
    import socket

    from tuner.llamacpp.device_usage import listening_pid, process_data_bytes

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert listening_pid(f"127.0.0.1:{port}") == os.getpid()
    assert listening_pid(f"127.0.0.1:{port}") is None  # closed: nobody listens there any more
    assert listening_pid(f"192.0.2.1:{port}") is None  # another machine's process is out of reach
    data_bytes = process_data_bytes(os.getpid())
    assert data_bytes is not None and data_bytes > 0


def test_device_usage_prefers_ggml_free_memory_and_has_no_figure_without_a_source() -> None:
    from tuner.llamacpp.device_usage import DeviceSample, DeviceUsage

    gpu = DeviceUsage(before=DeviceSample(free_bytes=20 * GiB, total_bytes=24 * GiB, server_pid=7,
                                          server_data_bytes=GiB),
                      after=DeviceSample(free_bytes=15 * GiB, total_bytes=24 * GiB, server_pid=7,
                                         server_data_bytes=GiB + MiB))  # fmt: skip
    assert gpu.used() == (5 * GiB, "ggml_backend_dev_memory: free before minus free after")
    # a CPU device reports free == total whatever it holds: only its server process can tell
    cpu = DeviceSample(free_bytes=64 * GiB, total_bytes=64 * GiB)
    assert DeviceUsage(before=cpu, after=cpu).used() is None
    served = DeviceUsage(
        before=cpu.model_copy(update={"server_pid": 9, "server_data_bytes": GiB}),
        after=cpu.model_copy(update={"server_pid": 9, "server_data_bytes": GiB + 3 * MiB}),
    )
    used = served.used()
    assert used is not None and used[0] == 3 * MiB and "RPC server process 9" in used[1]
    restarted = served.model_copy(update={"after": served.after.model_copy(update={"server_pid": 10})})
    assert restarted.used() is None  # a different process: the two figures are not comparable


def tune_split(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tuner.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_tune_split_calibrates_the_allreduce_from_one_measured_run(synth_model) -> None:  # type: ignore[no-untyped-def]
    """A run measured slower than the assumed PCIe link predicts: the fitted step latency reproduces it, and the
    printed --allreduce-step-us gives the same plan later; a speed the model cannot reach is refused."""
    run = (synth_model("llama-70b-q4_k_m"), "--gpus", "2x RTX 4090", "--split-mode", "tensor", "--tensor-split",
           "1,1", "--ctx", "4096", "--format", "json")  # fmt: skip
    assumed = tune_split(*run)
    assumed_rate = json.loads(assumed.stdout)["predicted_tokens_per_s"]
    measured = round(0.8 * assumed_rate, 2)

    calibrated = tune_split(*run, "--calibrate-allreduce", str(measured))
    assert calibrated.returncode == 0, calibrated.stderr
    assert json.loads(calibrated.stdout)["predicted_tokens_per_s"] == pytest.approx(measured, rel=1e-3)
    found = re.search(r"calibrated to ([\d.]+) us .* --allreduce-step-us ([\d.]+)", calibrated.stderr)
    assert found is not None, calibrated.stderr
    step_us = float(found[2])
    assert step_us > SpeedModel().allreduce_step_s * 1e6  # slower than assumed: a slower link

    reused = tune_split(*run, "--allreduce-step-us", str(step_us))
    assert json.loads(reused.stdout)["predicted_tokens_per_s"] == pytest.approx(measured, rel=2e-3)
    by_mode = {a["split_mode"]: a for a in json.loads(reused.stdout)["alternatives"]}
    assert by_mode["tensor"]["predicted_tokens_per_s"] == pytest.approx(measured, rel=2e-3)

    too_fast = tune_split(*run, "--calibrate-allreduce", str(round(10 * assumed_rate, 1)))
    assert too_fast.returncode == 2 and "faster than the speed model allows" in too_fast.stderr
    assert len(too_fast.stderr.strip().splitlines()) == 1
    layer_mode = tune_split(*run[:3], "--calibrate-allreduce", "20")
    assert layer_mode.returncode == 2 and "--split-mode tensor" in layer_mode.stderr


def test_calibrated_step_reproduces_the_measured_time_per_token() -> None:
    """The arithmetic: the rest of the measured time per token over 2 x layers x ceil(log2 n) steps."""
    seconds_without = 1 / 40.0
    step_s = calibrate_allreduce(32.0, seconds_without, n_device_layers=80, n_devices=3)
    assert allreduce_steps_per_token(80, 3) == 2 * 80 * 2
    assert seconds_without + step_s * allreduce_steps_per_token(80, 3) == pytest.approx(1 / 32.0)
    assert calibrate_allreduce(50.0, seconds_without, 80, 2) < 0  # faster than free all-reduces allow
    with pytest.raises(ValueError, match="no all-reduce"):
        calibrate_allreduce(30.0, seconds_without, 80, 1)


@pytest.mark.llama
@pytest.mark.parametrize(
    ("model_key", "split", "n_gpu_layers", "cache"),
    [("smollm2", (0.7, 0.3), 31, "f16"), ("tiny-qwen2-q8_0", (0.45, 0.55), 3, "q8_0")],
    ids=["smollm2-full-f16", "qwen2-partial-q8_0"],
)
def test_tensor_plan_loads_and_each_rpc_server_allocates_the_prediction(
    model_key: str, split: tuple[float, ...], n_gpu_layers: int, cache: str, request: pytest.FixtureRequest
) -> None:
    if model_key == "smollm2":
        path = request.getfixturevalue("smollm2")
    else:
        path = request.getfixturevalue("synth_model")(model_key)
    with logged_rpc_servers(2) as servers:
        result = plan(read_model(str(path)), rpc_devices(2), PlanRequest(
            split_mode="tensor", tensor_split=split, n_gpu_layers=n_gpu_layers, n_ctx=1024,
            type_k=cache, type_v=cache, reserve_bytes=0,
        ))  # fmt: skip
        load_and_report(path, result.load_settings(), rpc_endpoints=[s.endpoint for s in servers], warmup_tokens=512)
        for device, server in zip(result.devices, servers, strict=True):
            measured = classify(server.allocations())
            assert (device.weights_bytes, device.kv_bytes, device.compute_bytes) == (
                measured.weights_bytes, measured.kv_bytes, measured.compute_bytes,
            )  # fmt: skip
