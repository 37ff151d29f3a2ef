"""Measure llama.cpp's compute buffers on this machine and record them for tests/test_compute_model.py.

Loads each case of ``CASES`` in a child process (plain CPU, or 1-3 local RPC devices backed by this CPU),
takes the exact per-buffer bytes from llama_get_memory_breakdown and writes tests/data/compute_measurements.json.
Run from the repository root: ``python bench/measure_compute.py`` (about two minutes on two cores).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import SYNTH_MODELS  # noqa: E402
from tests.kit import synth  # noqa: E402
from tests.kit.models import gemma3_path, smollm2_path  # noqa: E402
from tests.kit.rpcbed import rpc_servers  # noqa: E402
from tuner import LoadSettings  # noqa: E402
from tuner.llamacpp import load_and_report  # noqa: E402

OUT = REPO / "tests" / "data" / "compute_measurements.json"
# Real CUDA numbers (one H100) that the CUDA side of the model is checked against; copied into OUT.
H100_RUNS = Path("/work/shared/data/h100-llama-cpp-buffers.json")


def case(model: str, n_rpc: int = 0, n_gpu_layers: int = 99, tensor_split: list[float] | None = None,
         dry_run: bool = False, **settings: object) -> dict[str, object]:
    """One load: the model key, the devices, and the context settings (load_and_report's names)."""
    settings.setdefault("n_ctx", 2048)
    settings.setdefault("flash_attn", "off")
    if n_rpc and tensor_split is None:
        tensor_split = [1.0] * n_rpc
    parts = [model, f"rpc{n_rpc}-ngl{n_gpu_layers}" if n_rpc else "cpu"]
    if n_rpc and len(set(tensor_split or [])) > 1:
        parts.append("ts" + ":".join(f"{v:g}" for v in tensor_split or []))
    short = {"n_ctx": "ctx", "n_seq_max": "seq", "n_batch": "b", "n_ubatch": "ub", "flash_attn": "fa-",
             "type_k": "k-", "type_v": "v-"}
    parts += [f"{label}{settings[key]}" for key, label in short.items() if key in settings]
    parts += ["unified"] if settings.get("kv_unified") else []
    parts += ["swa-small"] if settings.get("swa_full") is False else []
    if dry_run:
        parts.append("dry")
    return {"id": "-".join(parts), "model": model, "n_rpc": n_rpc, "n_gpu_layers": n_gpu_layers if n_rpc else 0,
            "tensor_split": tensor_split, "dry_run": dry_run, "settings": settings}


CASES = [
    # SmolLM2-135M (llama, 30 layers, tied output) on the plain CPU backend
    case("smollm2"),
    case("smollm2", flash_attn="on"),
    case("smollm2", flash_attn="auto"),
    case("smollm2", n_ctx=512, n_ubatch=128),
    case("smollm2", n_ctx=8192),
    case("smollm2", n_ctx=8192, flash_attn="on", type_k="q8_0", type_v="q8_0"),
    case("smollm2", n_ctx=4096, n_seq_max=4),
    case("smollm2", n_ctx=4096, n_seq_max=4, kv_unified=True),
    case("smollm2", n_ctx=4096, n_seq_max=4, flash_attn="on"),
    case("smollm2", n_ctx=2048, n_batch=256),
    case("smollm2", n_ctx=300),
    case("smollm2", n_ctx=3000, n_seq_max=3, n_ubatch=256, type_k="q8_0", flash_attn="on"),
    # SmolLM2 on local RPC devices: full offload turns on pipeline parallelism
    case("smollm2", n_rpc=1),
    case("smollm2", n_rpc=2, tensor_split=[0.6, 0.4]),
    case("smollm2", n_rpc=2, tensor_split=[0.6, 0.4], flash_attn="auto"),
    case("smollm2", n_rpc=2, n_ctx=4096, flash_attn="on"),
    case("smollm2", n_rpc=2, n_gpu_layers=20, tensor_split=[0.6, 0.4]),
    case("smollm2", n_rpc=2, n_gpu_layers=30),
    case("smollm2", n_rpc=2, tensor_split=[1.0, 0.0]),
    case("smollm2", n_rpc=2, n_ctx=4096, n_seq_max=4, kv_unified=True),
    case("smollm2", n_rpc=3),
    case("smollm2", n_rpc=3, n_ctx=4096, n_seq_max=2, flash_attn="on", type_k="q8_0", type_v="q8_0"),
    case("smollm2", n_rpc=3, n_gpu_layers=10, n_ubatch=256),
    # Gemma-3-270M (gemma3, sliding window 512, 262k vocabulary)
    case("gemma3-270m"),
    case("gemma3-270m", n_ctx=4096, flash_attn="on", swa_full=False),
    case("gemma3-270m", n_ctx=4096, n_seq_max=2, swa_full=False),
    case("gemma3-270m", n_rpc=2, n_ubatch=256),
    case("gemma3-270m", n_rpc=2, n_gpu_layers=10, flash_attn="on", swa_full=False),
    # generated models: qwen2 (biases, tied), gemma3, qwen3 MoE, llama
    case("tiny-qwen2-q8_0", n_ctx=1024),
    case("tiny-qwen2-q8_0", n_rpc=2, n_ctx=1024, flash_attn="on"),
    case("tiny-gemma3-q4_k_m", n_ctx=1024, swa_full=False),
    case("tiny-moe-q5_k_m", n_ctx=1024),
    case("tiny-moe-q5_k_m", n_rpc=2, n_ctx=2048, flash_attn="on"),
    case("tiny-llama-q4_0", n_rpc=3, n_gpu_layers=3, n_ctx=1024),
    # 3 sequences round the 512-token ubatch up to 513 rows while 512 outputs reach the last block
    case("tiny-moe-q5_k_m", n_rpc=3, n_gpu_layers=4, tensor_split=[3.0, 2.0, 2.0], n_ctx=700, n_seq_max=3,
         n_batch=1024, flash_attn="auto", kv_unified=True),
    # a Llama-3.1-8B shape (sparse file): llama.cpp's dry run, nothing is allocated
    case("llama-8b-q4_0", n_ctx=4096, dry_run=True),
    case("llama-8b-q4_0", n_ctx=16384, flash_attn="on", type_k="q8_0", type_v="q8_0", dry_run=True),
    case("llama-8b-q4_0", n_rpc=2, n_gpu_layers=20, n_ctx=8192, n_seq_max=4, dry_run=True),
]


def model_path(key: str, workdir: Path) -> Path:
    if key == "smollm2":
        return smollm2_path()
    if key == "gemma3-270m":
        return gemma3_path()
    shape, weight_type, sparse = SYNTH_MODELS[key]
    path = workdir / f"{key}.gguf"
    if not path.exists():
        synth.write_gguf(path, shape, weight_type, sparse=sparse)
    return path


def measure(entry: dict[str, object], endpoints: list[str], workdir: Path) -> dict[str, object]:
    n_rpc = int(entry["n_rpc"])  # type: ignore[call-overload]
    settings = LoadSettings(
        n_gpu_layers=int(entry["n_gpu_layers"]),  # type: ignore[call-overload]
        tensor_split=entry["tensor_split"], **entry["settings"],  # type: ignore[arg-type]
    )
    report = load_and_report(
        model_path(str(entry["model"]), workdir), settings, rpc_endpoints=endpoints[:n_rpc],
        dry_run=bool(entry["dry_run"]),
    )
    assert report.exact, "llama_get_memory_breakdown is needed for exact bytes"
    names = [report.device_buffer_names.get(d.name, d.name) for d in report.devices]
    host = [b for name, b in report.buffers.items() if b.host and b.compute_bytes]
    ranges: dict[str, list[int]] = {}
    for il, device in sorted(report.layer_devices.items()):
        ranges.setdefault(device, [int(il), int(il)])[1] = int(il)
    return {
        "flash_attn": report.flash_attn,
        "pipeline_parallel": report.pipeline_parallel,
        "device_compute_bytes": [report.buffers[n].compute_bytes if n in report.buffers else 0 for n in names],
        "host_compute_bytes": sum(b.compute_bytes for b in host),
        "output_bytes": sum(b.output_bytes for b in report.buffers.values()),
        "device_layers": [ranges.get(d.name) for d in report.devices],
    }


def main() -> None:
    results = []
    with tempfile.TemporaryDirectory() as tmp, rpc_servers(3) as endpoints:
        for entry in CASES:
            measured = measure(entry, endpoints, Path(tmp))
            results.append({**entry, "measured": measured})
            print(entry["model"], entry["n_rpc"], entry["settings"], measured["device_compute_bytes"],
                  measured["host_compute_bytes"], flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    cuda = json.loads(OUT.read_text()).get("cuda") if OUT.exists() else None
    if H100_RUNS.exists():
        cuda = json.loads(H100_RUNS.read_text())
    note = ("Compute buffers llama.cpp (llama-cpp-python 0.3.36, CPU and CPU-backed RPC devices) allocated; "
            "written by bench/measure_compute.py. Bytes are exact (llama_get_memory_breakdown) except "
            "output_bytes, which is parsed from the log (0.01 MiB rounding). 'cuda' holds seven loads of an "
            "8B Q4_0 shape on one H100 (MiB as llama.cpp logged them).")
    OUT.write_text(json.dumps({"note": note, "cases": results, "cuda": cuda}, indent=1) + "\n")


if __name__ == "__main__":
    main()
