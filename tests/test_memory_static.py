"""Weights and KV bytes against llama.cpp's logged figures (shared notes and the H100 data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuner.gguf import read_model
from tuner.layout import Layout, RuntimeSettings
from tuner.memory.kv import layer_kv_bytes, place_kv
from tuner.memory.weights import place_weights

MiB = 1024 * 1024
H100_DATA = Path(__file__).parent / "data" / "h100-llama-cpp-buffers.json"  # a copy of shared/data/


def two_device_layout(backends: tuple[str, ...] = ("cpu", "cpu")) -> Layout:
    return Layout(30, "layer", 99, 0, backends, ((0, 18), (19, 30)))  # type: ignore[arg-type]


def test_smollm2_weights_match_llama_cpp_log(smollm2: Path) -> None:
    placement = place_weights(read_model(smollm2), two_device_layout())
    # RPC0 model buffer 40.16 MiB, RPC1 51.94 MiB (tied output copy), CPU_Mapped 28.69 MiB (token_embd).
    assert [round(b / MiB, 2) for b in placement.device_bytes] == [40.16, 51.94]
    assert round(placement.host_bytes / MiB, 2) == 28.69


def test_smollm2_kv_matches_llama_cpp_log(smollm2: Path) -> None:
    devices, host = place_kv(read_model(smollm2), RuntimeSettings(n_ctx=2048), two_device_layout())
    assert [b / MiB for b in devices] == [28.5, 16.5] and host == 0


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
    n_gpu = run["n_gpu_layers"]
    start = max(model.n_layer + 1 - n_gpu, 0)
    layers = ((start, model.n_layer),) if n_gpu else (None,)
    layout = Layout(model.n_layer, "layer", n_gpu, 0, ("cuda",), layers)
    settings = RuntimeSettings(
        n_ctx=run["n_ctx"], n_seq_max=run["n_seq_max"], type_k=run["type_k"], type_v=run["type_v"],
        flash_attn=run["flash_attn"],
    )
    cuda = run["buffers_mib"].get("CUDA0", {})
    weights = place_weights(model, layout)
    assert abs(weights.device_bytes[0] / MiB - cuda.get("model", 0.0)) < 0.01
    kv_devices, kv_host = place_kv(model, settings, layout)
    assert kv_devices[0] / MiB == pytest.approx(cuda.get("kv", 0.0), abs=0.01)
    assert kv_host / MiB == pytest.approx(run["buffers_mib"].get("CPU", {}).get("kv", 0.0), abs=0.01)
