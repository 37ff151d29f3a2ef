"""Side by side: llama.cpp's default split against tune-split's plan, on simulated mismatched cards.

    .venv/bin/python bench/bench_vs_default_split.py

llama.cpp's default (no --tensor-split) puts every layer on the GPUs in proportion to each card's free
memory. That ignores what does not scale with layers — the output layer and its logits buffer on the last
card, each card's CUDA context — so the smaller card overflows first. Both placements are evaluated with the
same memory model (the one the acceptance tests hold to llama.cpp's real allocations).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.kit import synth
from tuner import PlanRequest, plan_model
from tuner.inventory import discover_devices
from tuner.plan import Plan

GiB = 1024**3


def describe(plan: Plan) -> str:
    parts = [f"{d.name.replace('NVIDIA GeForce ', '')}: {d.n_layers} layers, {d.free_after_bytes / GiB:+.2f} GiB left"
             for d in plan.devices]
    return "; ".join(parts)


def main() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        path = synth.write_gguf(Path(scratch) / "llama-70b-q4_k_m.gguf", synth.LLAMA_70B, "Q4_K_M", sparse=True)
        print("| cards | context | placement | -ngl / -ts | fits | per card | decode tok/s (model) |")
        print("|---|---|---|---|---|---|---|")
        for spec in ("RTX 4090,RTX 4080", "24GiB,16GiB"):
            devices = discover_devices(gpus=spec)
            for n_ctx in (8192,):
                free = tuple(round(d.free_bytes / GiB, 2) for d in devices)
                default = plan_model(
                    path, PlanRequest(n_ctx=n_ctx, n_gpu_layers=999, tensor_split=free), devices, strict=False
                )
                ours = plan_model(path, PlanRequest(n_ctx=n_ctx), devices, strict=False)
                q8 = plan_model(path, PlanRequest(n_ctx=n_ctx, type_k="q8_0", type_v="q8_0"), devices, strict=False)
                same_layers = PlanRequest(max_ctx=True, n_gpu_layers=ours.n_gpu_layers)
                most = plan_model(path, same_layers, devices, strict=False)
                rows = [
                    ("llama.cpp default", default),
                    ("tune-split (speed)", ours),
                    ("tune-split, q8_0 KV", q8),
                    ("tune-split --max-ctx, same -ngl", most),
                ]
                for label, plan in rows:
                    ts = ",".join(f"{v:g}" for v in plan.tensor_split)
                    rate = f"{plan.predicted_tokens_per_s:.1f}" if plan.fits and plan.predicted_tokens_per_s else "OOM"
                    print(f"| {spec} | {plan.n_ctx} | {label} | {plan.n_gpu_layers} / {ts} | "
                          f"{'yes' if plan.fits else 'NO'} | {describe(plan)} | {rate} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
