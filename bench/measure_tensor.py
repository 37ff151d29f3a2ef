"""Measure what each device allocates in split mode "tensor" and record it for tests/test_tensor_split.py.

llama.cpp reports only the aggregate Meta() device in this mode, so the per-device truth comes from the RPC
servers themselves: started with GGML_RPC_DEBUG=1 (tests/kit/rpcbed.py, ``logged_rpc_servers``) each logs every
buffer it allocates, clears and frees. Each case loads a model on 2 or 3 local RPC devices with the given
tensor_split, decodes one full batch (the all-reduce scratch is allocated on the first decode) and classifies
each server's live buffers into weights, KV cache and compute (``tests.kit.rpcbed.classify``).
Run from the repository root: ``python bench/measure_tensor.py`` (about three minutes on two cores); it writes
tests/data/tensor_measurements.json.
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
from tests.kit.rpcbed import classify, logged_rpc_servers  # noqa: E402
from tuner import LoadSettings  # noqa: E402
from tuner.llamacpp import load_and_report  # noqa: E402
from tuner.llamacpp.open import LoadError  # noqa: E402

OUT = REPO / "tests" / "data" / "tensor_measurements.json"
WARMUP_TOKENS = 512  # one full n_ubatch: the largest all-reduce a prompt makes


def case(
    model: str, n_rpc: int, tensor_split: list[float] | None, n_gpu_layers: int = 99, **settings: object
) -> dict[str, object]:
    """One load: the model key, the devices and proportions, and the context settings (LoadSettings names)."""
    settings.setdefault("n_ctx", 2048)
    settings.setdefault("flash_attn", "on")
    parts = [model, f"rpc{n_rpc}", "ts" + ":".join(f"{v:g}" for v in tensor_split or []), f"ngl{n_gpu_layers}"]
    short = {"n_ctx": "ctx", "n_seq_max": "seq", "n_ubatch": "ub", "type_k": "k-", "type_v": "v-"}
    parts += [f"{label}{settings[key]}" for key, label in short.items() if key in settings]
    parts += ["swa-small"] if settings.get("swa_full") is False else []
    return {
        "id": "-".join(parts),
        "model": model,
        "n_rpc": n_rpc,
        "n_gpu_layers": n_gpu_layers,
        "tensor_split": tensor_split,
        "settings": settings,
    }


CASES = [
    # SmolLM2-135M (llama, 30 layers, 9 heads / 3 KV heads, tied output)
    case("smollm2", 2, [0.6, 0.4]),
    case("smollm2", 2, [0.6, 0.4], type_k="q8_0", type_v="q8_0"),
    case("smollm2", 2, [3.0, 1.0], n_ctx=4096, n_seq_max=2),
    case("smollm2", 2, [0.6, 0.4], n_gpu_layers=20),
    case("smollm2", 2, [0.6, 0.4], n_gpu_layers=30),
    case("smollm2", 3, [0.5, 0.3, 0.2]),
    case("smollm2", 3, [0.5, 0.3, 0.2], n_ctx=4096, type_k="q8_0", type_v="q8_0"),
    case("smollm2", 3, [1.0, 1.0, 1.0], n_gpu_layers=12, n_ubatch=256),
    case("smollm2", 2, None),
    # Gemma-3-270M (gemma3, sliding window, 1 KV head, tied output, 262k vocabulary)
    case("gemma3-270m", 2, [0.7, 0.3]),
    case("gemma3-270m", 3, [0.4, 0.35, 0.25], n_ctx=4096, swa_full=False),
    # generated models: dense GQA, tied output, sliding window, mixture of experts, variable layers
    case("tiny-llama-q4_0", 2, [0.65, 0.35], n_ctx=4096),
    case("tiny-llama-q4_0", 3, [0.5, 0.3, 0.2], type_k="q8_0", type_v="q8_0", n_gpu_layers=3),
    case("tiny-qwen2-q8_0", 2, [0.6, 0.4], type_k="q8_0", type_v="q8_0"),
    case("tiny-qwen2-q8_0", 3, [0.2, 0.3, 0.5], n_seq_max=4),
    case("tiny-gemma3-q4_k_m", 2, [0.7, 0.3], n_ctx=4096),
    case("tiny-gemma3-q4_k_m", 3, [0.5, 0.25, 0.25], swa_full=False, n_gpu_layers=5),
    case("tiny-moe-q8_0", 2, [0.6, 0.4]),
    case("tiny-moe-q8_0", 3, [0.5, 0.3, 0.2], type_k="q8_0", type_v="q8_0", n_ctx=4096),
    case("tiny-moe-q8_0", 2, [0.3, 0.7], n_gpu_layers=3, n_seq_max=2),
    # variable layers: OpenELM with per-layer head counts (4/4/6/8, KV 1/2/2/4) and FFN widths (512-1280)
    case("tiny-openelm-q4_0", 2, [0.65, 0.35]),
    case("tiny-openelm-q4_0", 3, [0.45, 0.35, 0.2], n_ctx=4096),
    case("tiny-openelm-q4_0", 3, [0.2, 0.45, 0.35], n_gpu_layers=3, n_seq_max=2),
    # Expected to abort in llama.cpp: rows of exactly one Q5_K block (256) cut along the row with a device
    # getting nothing (GGML_ASSERT "tensor write out of bounds"); the tuner refuses this placement.
    case("tiny-moe-q5_k_m", 2, [0.6, 0.4]),
    # Expected to abort: a quantised cache makes llama.cpp rotate K/V (Hadamard) before caching them, and with
    # OpenELM's fused QKV the Meta backend has no split rule for that matmul ("unsupported mul_mat split
    # states"); the tuner refuses a quantised cache with tensor split on fused-QKV models.
    case("tiny-openelm-q4_0", 3, [0.5, 0.3, 0.2], type_k="q8_0", type_v="q8_0"),
]


def model_file(key: str, directory: Path) -> Path:
    if key == "smollm2":
        return smollm2_path()
    if key == "gemma3-270m":
        return gemma3_path()
    shape, weight_type, sparse = SYNTH_MODELS[key]
    path = directory / f"{key}.gguf"
    if not path.exists():
        synth.write_gguf(path, shape, weight_type, sparse=sparse)
    return path


def measure(cases: list[dict[str, object]]) -> list[dict[str, object]]:
    results = []
    with tempfile.TemporaryDirectory() as tmp, logged_rpc_servers(3) as servers:
        for spec in cases:
            n_rpc = int(spec["n_rpc"])  # type: ignore[call-overload]
            used = servers[:n_rpc]
            marks = [server.log_size() for server in used]
            split = spec["tensor_split"]
            settings = LoadSettings(
                split_mode="tensor",
                n_gpu_layers=spec["n_gpu_layers"],  # type: ignore[arg-type]
                tensor_split=tuple(split) if split else None,  # type: ignore[arg-type]
                **spec["settings"],  # type: ignore[arg-type]
            )
            try:
                report = load_and_report(
                    model_file(str(spec["model"]), Path(tmp)),
                    settings,
                    rpc_endpoints=[s.endpoint for s in used],
                    warmup_tokens=WARMUP_TOKENS,
                )
            except LoadError as exc:  # recorded: what llama.cpp cannot do is a constraint to enforce
                last = [line for line in exc.log_tail if line.strip()][-1:]
                results.append({**spec, "error": str(exc).splitlines()[0], "last_line": "".join(last)})
                print(spec["id"], "FAILED", last, file=sys.stderr)
                continue
            devices = []
            for server, mark in zip(used, marks, strict=True):
                allocation = classify(server.allocations(since=mark))
                devices.append(
                    {
                        "weights_bytes": allocation.weights_bytes,
                        "kv_bytes": allocation.kv_bytes,
                        "compute_bytes": allocation.compute_bytes,
                    }
                )
            host = {name: b.total_bytes for name, b in report.buffers.items() if b.host}
            results.append({**spec, "warmup_tokens": WARMUP_TOKENS, "measured": devices, "host": host})
            print(spec["id"], devices, file=sys.stderr)
    return results


def main() -> None:
    """``python bench/measure_tensor.py [ID_SUBSTRING]``: re-measure all cases, or those matching, into OUT."""
    selected = [c for c in CASES if len(sys.argv) < 2 or sys.argv[1] in str(c["id"])]
    results = measure(selected)
    if len(selected) < len(CASES) and OUT.exists():
        fresh = {r["id"]: r for r in results}
        old = {r["id"]: r for r in json.loads(OUT.read_text())["cases"]}
        results = [fresh.get(str(c["id"])) or old[str(c["id"])] for c in CASES if c["id"] in fresh or c["id"] in old]
    OUT.write_text(json.dumps({"about": __doc__.split("\n\n")[0], "cases": results}, indent=1) + "\n")
    print(f"wrote {len(results)} cases to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
