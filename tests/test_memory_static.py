"""Weights and KV bytes against llama.cpp's logged figures (shared notes and the H100 data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuner.devices import Device
from tuner.gguf import read_model
from tuner.layout import RuntimeSettings
from tuner.memory.kv import layer_kv_bytes
from tuner.memory.predict import MemoryModel, MemoryPrediction

MiB = 1024 * 1024
H100_DATA = Path(__file__).parent / "data" / "h100-llama-cpp-buffers.json"  # a copy of shared/data/


def device(backend: str) -> Device:
    return Device(name=backend, kind="simulated", backend=backend, total_bytes=80 << 30, free_bytes=80 << 30)  # type: ignore[arg-type]


def smollm2_two_devices(path: Path) -> MemoryPrediction:
    """-ts 0.6,0.4 on two CPU-backed devices: 19 and 12 entries, as llama.cpp placed them (shared notes)."""
    memory = MemoryModel(read_model(path), [device("cpu"), device("cpu")], RuntimeSettings(n_ctx=2048))
    layout = memory.layout([19, 12])
    assert layout.device_layers == ((0, 18), (19, 30))
    return memory.predict(layout)


def test_smollm2_weights_match_llama_cpp_log(smollm2: Path) -> None:
    prediction = smollm2_two_devices(smollm2)
    # RPC0 model buffer 40.16 MiB, RPC1 51.94 MiB (tied output copy), CPU_Mapped 28.69 MiB (token_embd).
    assert [round(d.weights_bytes / MiB, 2) for d in prediction.devices] == [40.16, 51.94]
    assert round(prediction.host_weights_bytes / MiB, 2) == 28.69


def test_smollm2_kv_matches_llama_cpp_log(smollm2: Path) -> None:
    prediction = smollm2_two_devices(smollm2)
    assert [d.kv_bytes / MiB for d in prediction.devices] == [28.5, 16.5] and prediction.host_kv_bytes == 0


@pytest.mark.parametrize(
    ("n_ctx", "n_seq", "cells"), [(2048, 3, 2304), (512, 4, 1024), (4096, 1, 4096), (1000, 1, 1024)]
)
def test_context_padding(n_ctx: int, n_seq: int, cells: int) -> None:
    assert RuntimeSettings(n_ctx=n_ctx, n_seq_max=n_seq).n_ctx_padded == cells


def test_gemma3_reduced_swa_cache(gemma3: Path) -> None:
    model = read_model(gemma3)
    full = layer_kv_bytes(model, RuntimeSettings(n_ctx=8192, swa_full=True))
    reduced = layer_kv_bytes(model, RuntimeSettings(n_ctx=8192, swa_full=False, n_ubatch=512))
    row = 256 * 2  # one KV head of 256 f16 values
    assert full[0] == 2 * row * 8192
    assert reduced[0] == 2 * row * 1024  # pad256(512 window + 512 ubatch)
    assert reduced[5] == full[5]  # the global layer keeps the whole context


def h100_runs() -> list[dict]:
    return json.loads(H100_DATA.read_text())["runs"]


@pytest.mark.parametrize("run", h100_runs(), ids=lambda r: f"ngl{r['n_gpu_layers']}-ctx{r['n_ctx']}-np{r['n_seq_max']}")
def test_h100_weights_and_kv(run: dict, synth_dir: Path) -> None:
    from tests.kit import synth

    path = synth_dir / "h100-8b-q4_0.gguf"
    if not path.exists():
        shape = synth.LLAMA_8B.replace(n_vocab=49152, name="h100-8b")
        synth.write_gguf(path, shape, "Q4_0", sparse=True, pure=True)
    model = read_model(path)
    settings = RuntimeSettings(
        n_ctx=run["n_ctx"], n_seq_max=run["n_seq_max"], type_k=run["type_k"], type_v=run["type_v"],
        flash_attn=run["flash_attn"],
    )
    memory = MemoryModel(model, [device("cuda")], settings)
    prediction = memory.predict(memory.layout([min(run["n_gpu_layers"], model.n_layer + 1)]))
    cuda = run["buffers_mib"].get("CUDA0", {})
    assert abs(prediction.devices[0].weights_bytes / MiB - cuda.get("model", 0.0)) < 0.01
    assert prediction.devices[0].kv_bytes / MiB == pytest.approx(cuda.get("kv", 0.0), abs=0.01)
    host_kv_mib = run["buffers_mib"].get("CPU", {}).get("kv", 0.0)
    assert prediction.host_kv_bytes / MiB == pytest.approx(host_kv_mib, abs=0.01)
    assert round(prediction.host_weights_bytes / MiB, 2) == run["buffers_mib"]["CPU_Mapped"]["model"]
