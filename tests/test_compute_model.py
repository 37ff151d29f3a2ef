"""The compute-buffer model against llama.cpp: recorded CPU/RPC loads, seven H100 runs and live loads.

tests/data/compute_measurements.json holds exact bytes (llama_get_memory_breakdown) of loads on this
kind of machine, written by bench/measure_compute.py, and the H100 runs as llama.cpp logged them (MiB,
rounded to 0.01). The model replays llama.cpp's allocator, so CPU/RPC buffers must match to the byte.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import pytest

from tests.kit import synth
from tuner import LoadSettings
from tuner.devices import Device
from tuner.gguf import read_model
from tuner.layout import Layout, RuntimeSettings
from tuner.memory.compute import DEFAULT_CUDA, CudaCalibration, _estimate, estimate_compute, pipeline_parallel
from tuner.memory.overhead import CUDA_OVERHEAD_BYTES, device_overhead_bytes
from tuner.model import ModelInfo
from tuner.split import layer_ranges

MiB = 1024 * 1024
DATA = json.loads((Path(__file__).parent / "data" / "compute_measurements.json").read_text())
RECORDED = DATA["cases"]
H100_RUNS = DATA["cuda"]["runs"]
# llama.cpp logs sizes in MiB with two decimals: a logged value is within half a hundredth of a MiB.
LOG_ROUNDING_BYTES = MiB // 200 + 1
# The 8B shape of the H100 runs: Llama-3.1-8B's blocks with a 49152-token vocabulary, Q4_0 everywhere.
H100_SHAPE = synth.ModelShape(
    arch="llama", n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=49152, name="h100-8b"
)


@functools.cache
def _read(path: str) -> ModelInfo:
    return read_model(path)


@pytest.fixture
def model_by_key(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """key of a recorded case -> ModelInfo (real PyPI models or the session's generated GGUFs)."""

    def get(key: str) -> ModelInfo:
        if key == "smollm2":
            return _read(str(request.getfixturevalue("smollm2")))
        if key == "gemma3-270m":
            return _read(str(request.getfixturevalue("gemma3")))
        return _read(str(request.getfixturevalue("synth_model")(key)))

    return get


@pytest.fixture(scope="session")
def h100_model(tmp_path_factory: pytest.TempPathFactory) -> ModelInfo:
    directory = tmp_path_factory.mktemp("h100")
    return read_model(synth.write_gguf(directory / "h100-8b.gguf", H100_SHAPE, "Q4_0", sparse=True, pure=True))


def _layout(model: ModelInfo, backend: str, n_devices: int, n_gpu_layers: int,
            tensor_split: list[float] | None) -> Layout:
    ranges = layer_ranges(tensor_split or [1.0] * n_devices, model.n_layer, n_gpu_layers) if n_devices else []
    return Layout(model.n_layer, "layer", n_gpu_layers, 0, (backend,) * n_devices, tuple(ranges))


def _settings(settings: dict[str, object], flash_attn: bool) -> RuntimeSettings:
    """RuntimeSettings from load_and_report's arguments, with flash attention as llama.cpp resolved it."""
    names = ("n_ctx", "n_seq_max", "n_batch", "n_ubatch", "type_k", "type_v", "kv_unified", "swa_full")
    return RuntimeSettings(**{k: settings[k] for k in names if k in settings}, flash_attn=flash_attn)  # type: ignore[arg-type]


@pytest.mark.parametrize("case", RECORDED, ids=[c["id"] for c in RECORDED])
def test_compute_buffers_equal_llama_cpp_on_cpu_and_rpc_devices(case: dict, model_by_key) -> None:  # type: ignore[no-untyped-def,type-arg]
    model = model_by_key(case["model"])
    measured = case["measured"]
    layout = _layout(model, "cpu", case["n_rpc"], case["n_gpu_layers"], case["tensor_split"])
    assert [list(r) if r else None for r in layout.device_layers] == measured["device_layers"]
    predicted = estimate_compute(model, _settings(case["settings"], measured["flash_attn"]), layout)

    assert list(predicted.device_bytes) == measured["device_compute_bytes"]
    assert predicted.host_bytes == measured["host_compute_bytes"]
    assert abs(predicted.output_bytes - measured["output_bytes"]) <= LOG_ROUNDING_BYTES
    assert pipeline_parallel(layout) == measured["pipeline_parallel"]


def _h100_id(run: dict) -> str:  # type: ignore[type-arg]
    fa = "fa-on" if run["flash_attn"] else "fa-off"
    return f"h100-ngl{run['n_gpu_layers']}-ctx{run['n_ctx']}-seq{run['n_seq_max']}-{fa}-k-{run['type_k']}"


@pytest.mark.parametrize("run", H100_RUNS, ids=[_h100_id(r) for r in H100_RUNS])
def test_compute_buffers_match_the_h100_runs(run: dict, h100_model: ModelInfo) -> None:  # type: ignore[type-arg]
    n_gpu_layers = min(run["n_gpu_layers"], h100_model.n_layer + 1)
    layout = _layout(h100_model, "cuda", 1, n_gpu_layers, None)
    settings = _settings(run, run["flash_attn"])
    predicted = estimate_compute(h100_model, settings, layout)

    buffers = run["buffers_mib"]
    output_mib = buffers["CUDA_Host"].get("output") or buffers["CPU"]["output"]
    assert predicted.device_bytes[0] / MiB == pytest.approx(buffers["CUDA0"]["compute"], abs=0.005)
    assert predicted.host_bytes / MiB == pytest.approx(buffers["CUDA_Host"]["compute"], abs=0.005)
    assert predicted.output_bytes / MiB == pytest.approx(output_mib, abs=0.005)


def test_h100_shape_has_the_logged_weight_bytes(h100_model: ModelInfo) -> None:
    # CPU_Mapped (token_embd) + CUDA0 model buffer of the fully offloaded runs
    assert h100_model.file_bytes / MiB == pytest.approx(108.0 + 3853.02, abs=0.01)


def test_local_gpu_zero_runs_large_matmuls_of_cpu_weights_when_nothing_is_offloaded(h100_model: ModelInfo) -> None:
    settings = RuntimeSettings(n_ctx=4096)
    cpu_only = _layout(h100_model, "cuda", 1, 0, None)
    assert estimate_compute(h100_model, settings, cpu_only).device_bytes[0] > 250 * MiB
    no_offload = RuntimeSettings(n_ctx=4096, op_offload=False)
    assert estimate_compute(h100_model, no_offload, cpu_only).device_bytes == (0,)
    # a GPU behind an RPC server has no offload_op: it gets nothing either
    assert estimate_compute(h100_model, settings, cpu_only, remote=(True,)).device_bytes == (0,)


def test_cuda_calibration_pads_gpu_buffers_only(h100_model: ModelInfo) -> None:
    settings = RuntimeSettings(n_ctx=4096, flash_attn=True)
    layout = Layout(h100_model.n_layer, "layer", 33, 0, ("cuda", "cpu"), ((0, 15), (16, 32)))
    base = estimate_compute(h100_model, settings, layout)
    padded = estimate_compute(h100_model, settings, layout, CudaCalibration(extra_bytes=64 * MiB))
    assert padded.device_bytes[0] == base.device_bytes[0] + 64 * MiB
    assert padded.device_bytes[1] == base.device_bytes[1]
    assert padded.host_bytes == base.host_bytes


def _random_layouts(model: ModelInfo, seed: int, n: int) -> list[tuple[Layout, RuntimeSettings]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        n_devices = rng.randint(1, 3)
        backends = tuple(rng.choice(("cpu", "cuda")) for _ in range(n_devices))
        n_gpu_layers = rng.choice((model.n_layer + 1, rng.randint(0, model.n_layer + 1)))
        split = [rng.randint(1, 4) for _ in range(n_devices)]
        layout = Layout(model.n_layer, "layer", n_gpu_layers, 0, backends,
                        tuple(layer_ranges(split, model.n_layer, n_gpu_layers)))
        flash_attn = rng.random() < 0.5
        settings = RuntimeSettings(
            n_ctx=rng.choice((1024, 4096)), n_seq_max=rng.choice((1, 2)), flash_attn=flash_attn,
            type_k=rng.choice(("f16", "q8_0")), type_v=rng.choice(("f16", "q8_0")) if flash_attn else "f16",
            swa_full=rng.random() < 0.5,
        )
        out.append((layout, settings))
    return out


@pytest.mark.parametrize("shape,weight_type", [
    (synth.LLAMA_70B, "Q4_K_M"),
    (synth.GEMMA3_270M.replace(n_layer=62, name="gemma3-62"), "Q4_K_M"),
], ids=["llama-70b", "gemma3-62-layers"])
def test_shortened_replay_equals_the_full_graph(shape: synth.ModelShape, weight_type: str, tmp_path: Path) -> None:
    model = read_model(synth.write_gguf(tmp_path / "m.gguf", shape, weight_type, sparse=True))
    for layout, settings in _random_layouts(model, seed=7, n=6):
        shortened = _estimate(model, settings, layout, DEFAULT_CUDA, compress=True)
        assert shortened == _estimate(model, settings, layout, DEFAULT_CUDA, compress=False), (layout, settings)


def test_pipeline_parallelism_needs_several_devices_and_every_layer_offloaded() -> None:
    def layout(backends: tuple[str, ...], n_gpu_layers: int) -> Layout:
        return Layout(30, "layer", n_gpu_layers, 0, backends, ((0, 30),) + (None,) * (len(backends) - 1))

    assert pipeline_parallel(layout(("cpu", "cpu"), 31))
    assert pipeline_parallel(layout(("cuda", "rocm"), 99))
    assert not pipeline_parallel(layout(("cuda",), 31))
    assert not pipeline_parallel(layout(("cpu", "cpu"), 30))


def test_overhead_is_the_measured_cuda_context_for_local_gpus_and_none_for_cpu_and_rpc() -> None:
    def device(kind: str, backend: str, overhead: int | None = None) -> Device:
        return Device(name="d", kind=kind, backend=backend, total_bytes=1, free_bytes=1,  # type: ignore[arg-type]
                      overhead_bytes=overhead)

    assert device_overhead_bytes(device("cuda", "cuda")) == CUDA_OVERHEAD_BYTES
    assert device_overhead_bytes(device("simulated", "rocm")) == CUDA_OVERHEAD_BYTES
    assert device_overhead_bytes(device("rpc", "cuda")) == 0
    assert device_overhead_bytes(device("rpc", "cpu")) == 0
    assert device_overhead_bytes(device("cuda", "cuda", overhead=300 * MiB)) == 300 * MiB


LIVE = [
    dict(model="smollm2", n_rpc=3, n_gpu_layers=99, tensor_split=[2.0, 1.0, 1.0],
         settings=dict(n_ctx=3072, n_seq_max=2, n_ubatch=384, flash_attn="auto", type_k="q8_0")),
    dict(model="gemma3-270m", n_rpc=2, n_gpu_layers=12, tensor_split=[1.0, 3.0],
         settings=dict(n_ctx=1536, n_batch=256, flash_attn="off", swa_full=False)),
]


@pytest.mark.llama
@pytest.mark.parametrize("case", LIVE, ids=["smollm2-rpc3-pipeline-fa-auto-q8_0", "gemma3-rpc2-partial-swa-small"])
def test_live_load_allocates_the_predicted_compute_buffers(case: dict, model_by_key, rpc_endpoints: list[str]) -> None:  # type: ignore[no-untyped-def,type-arg]
    from tuner.llamacpp import load_and_report

    model = model_by_key(case["model"])
    settings = LoadSettings(n_gpu_layers=case["n_gpu_layers"], tensor_split=case["tensor_split"], **case["settings"])
    report = load_and_report(model.path, settings, rpc_endpoints=rpc_endpoints[: case["n_rpc"]])
    assert report.exact, "needs llama_get_memory_breakdown (x86-64 build)"
    layout = _layout(model, "cpu", case["n_rpc"], case["n_gpu_layers"], case["tensor_split"])
    predicted = estimate_compute(model, _settings(case["settings"], report.flash_attn), layout)

    names = [report.device_buffer_names.get(d.name, d.name) for d in report.devices]
    measured = [report.buffers[n].compute_bytes if n in report.buffers else 0 for n in names]
    host = sum(b.compute_bytes for b in report.buffers.values() if b.host)
    assert list(predicted.device_bytes) == measured
    assert predicted.host_bytes == host


def test_models_without_tensors_or_with_attention_free_blocks_still_get_an_estimate() -> None:
    n_layer = 6
    model = ModelInfo(
        paths=("none.gguf",), architecture="jamba", name="hybrid", file_type=None, n_layer=n_layer, n_embd=512,
        n_vocab=32000, n_ctx_train=4096, n_head=(8,) * n_layer, n_head_kv=(0, 0, 2, 0, 0, 2),
        n_ff=(1024,) * n_layer, n_embd_head_k=64, n_embd_head_v=64, n_swa=0, swa_layers=(False,) * n_layer,
        n_expert=0, n_expert_used=0, n_ff_exp=0, tensors=(),
    )
    layout = Layout(n_layer, "layer", n_layer + 1, 0, ("cpu", "cpu"), ((0, 2), (3, 6)))
    buffers = estimate_compute(model, RuntimeSettings(n_ctx=2048), layout)
    logits_bytes = 512 * model.n_vocab * 4
    assert buffers.device_bytes[0] > 0
    assert buffers.device_bytes[1] >= logits_bytes  # the output device holds one ubatch of logits


@pytest.mark.parametrize("key", ["smollm2", "gemma3-270m", "tiny-moe-q5_k_m"])
def test_the_output_device_always_holds_a_ubatch_of_logits(key: str, model_by_key) -> None:  # type: ignore[no-untyped-def]
    model = model_by_key(key)
    for layout, settings in _random_layouts(model, seed=3, n=8):
        buffers = estimate_compute(model, settings, layout)
        out = layout.output_device
        held = buffers.host_bytes if out is None else buffers.device_bytes[out]
        n_tokens = min(settings.n_ubatch, settings.n_batch, settings.n_ctx)
        assert held >= n_tokens * model.n_vocab * 4, (layout, settings)
