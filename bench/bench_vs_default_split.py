"""Side by side: llama.cpp's default split and its --fit against tune-split's plan, on simulated mismatched cards.

    .venv/bin/python bench/bench_vs_default_split.py

llama.cpp's default (no --tensor-split) puts every layer on the GPUs in proportion to each card's free
memory. That ignores what does not scale with layers — the output layer and its logits buffer on the last
card, each card's CUDA context — so the smaller card overflows first. Every placement is evaluated with the
same memory model (the one the acceptance tests hold to llama.cpp's real allocations).

llama-server's `--fit` (common/fit.cpp, on by default) changes only what the user left unset, and only when
some card would keep less than 1 GiB free (--fit-target). With `-c` unset it first shrinks the context from
the training length (131072 here) by linear interpolation, never below 4096 (--fit-ctx); then, if that is not
enough, it fills the cards back to front, the last card first, each with as many whole layers as keep its
1 GiB margin (a false-position search over dry-run loads), and leaves the rest on the CPU. bench/llama_fit.py
emulates it with our memory model answering its dry runs; its rows are its choice evaluated like the others.
All rows use llama-cpp-python's runtime defaults (one sequence, batch 512); llama-server's own `-np auto`
(4 sequences, unified KV) and `-b 2048` change only host buffers for this model, not the cards' bytes.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.llama_fit import FitRequest, FitResult, fit_params
from tests.kit import synth
from tuner import PlanRequest, plan_model
from tuner.devices import Device
from tuner.gguf import read_model
from tuner.inventory import discover_devices
from tuner.plan import Plan

GiB = 1024**3


def describe(plan: Plan) -> str:
    if plan.split_mode == "tensor":  # every card holds a slice of every offloaded layer
        return "; ".join(
            f"{d.name.replace('NVIDIA GeForce ', '')}: {d.n_layers} cut, {d.free_after_bytes / GiB:+.2f} GiB left"
            for d in plan.devices
        )
    parts = [f"{d.name.replace('NVIDIA GeForce ', '')}: {d.n_layers} layers, {d.free_after_bytes / GiB:+.2f} GiB left"
             for d in plan.devices]
    return "; ".join(parts)


def with_fit(path: Path, devices: list[Device], request: FitRequest) -> tuple[FitResult, Plan]:
    """What --fit chooses, evaluated as a user placement (its -c, -ngl and -ts) like the other rows."""
    fit = fit_params(read_model(path), devices, request)
    # An untouched tensor_split means llama.cpp splits by free memory, the free memory fit.cpp saw.
    split = fit.tensor_split or tuple(f / GiB for f in fit.free_bytes)
    plan = plan_model(
        path, PlanRequest(n_ctx=fit.n_ctx, n_gpu_layers=fit.n_gpu_layers, tensor_split=split), devices, strict=False
    )
    placed = tuple(d.n_layers for d in plan.devices)
    if placed != fit.counts:
        raise RuntimeError(f"--fit placed {fit.counts} but the plan evaluated {placed}")
    return fit, plan


def main() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        path = synth.write_gguf(Path(scratch) / "llama-70b-q4_k_m.gguf", synth.LLAMA_70B, "Q4_K_M", sparse=True)
        side_by_side: list[tuple[str, Plan, Plan]] = []
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
                _, fit_auto = with_fit(path, devices, FitRequest())
                _, fit_ctx = with_fit(path, devices, FitRequest(n_ctx=n_ctx))
                # Planned with --fit's 1 GiB margin (like for like), shown against the same 512 MiB as the rest.
                planned_1g = plan_model(path, PlanRequest(n_ctx=n_ctx, reserve_bytes=GiB), devices, strict=False)
                as_planned = PlanRequest(
                    n_ctx=n_ctx, n_gpu_layers=planned_1g.n_gpu_layers, tensor_split=planned_1g.tensor_split
                )
                ours_1g = plan_model(path, as_planned, devices, strict=False)
                tensor = plan_model(path, PlanRequest(n_ctx=n_ctx, split_mode="tensor"), devices, strict=False)
                side_by_side.append((spec, ours, tensor))
                rows = [
                    ("llama.cpp default", default),
                    ("llama.cpp --fit (default, -c unset)", fit_auto),
                    (f"llama.cpp --fit with -c {n_ctx}", fit_ctx),
                    ("tune-split (speed)", ours),
                    ("tune-split, 1 GiB reserve (as --fit)", ours_1g),
                    ("tune-split, q8_0 KV", q8),
                    ("tune-split --max-ctx, same -ngl", most),
                    ("tune-split -sm tensor (speed)", tensor),
                ]
                for label, plan in rows:
                    ts = ",".join(f"{v:g}" for v in plan.tensor_split)
                    rate = f"{plan.predicted_tokens_per_s:.1f}" if plan.fits and plan.predicted_tokens_per_s else "OOM"
                    print(f"| {spec} | {plan.n_ctx} | {label} | {plan.n_gpu_layers} / {ts} | "
                          f"{'yes' if plan.fits else 'NO'} | {describe(plan)} | {rate} |")
        print()
        print("| cards | split | -ngl / -ts | 1 stream tok/s (model) | batched prompt tok/s (model) |")
        print("|---|---|---|---|---|")
        for spec, layer, tensor in side_by_side:
            for plan in (layer, tensor):
                rates = {a.split_mode: a for a in plan.alternatives}[plan.split_mode]
                ts = ",".join(f"{v:g}" for v in plan.tensor_split)
                print(f"| {spec} | {plan.split_mode} | {plan.n_gpu_layers} / {ts} | "
                      f"{rates.predicted_tokens_per_s or 0:.1f} | {rates.batch_tokens_per_s or 0:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
