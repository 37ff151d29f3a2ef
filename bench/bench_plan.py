"""Benchmark: CPU time of a whole tune-split plan against gguf-py's GGUFReader on the same files, same run.

    .venv/bin/python bench/bench_plan.py [--repeat 5]

Plans Gemma-3-270M (262k-token vocabulary) and a 70B-shape GGUF (sparse file) for a simulated RTX 4090 +
RTX 4080 at 8192 context, and times GGUFReader opening the same files. Each plan runs in a fresh process
(no warm caches); interpreter start and imports are excluded, everything from opening the GGUF to the
finished plan is counted as process CPU time (time.process_time); the best of --repeat runs is reported.
Target: under 0.2 s per plan.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gguf import GGUFReader

from tests.kit import synth
from tests.kit.models import gemma3_path

TARGET_S = 0.2
ROOT = Path(__file__).resolve().parents[1]
COLD_PLAN = """
import sys, time
from tuner import PlanRequest, plan_model
from tuner.inventory import discover_devices
devices = discover_devices(gpus="RTX 4090,RTX 4080")
started = time.process_time()
plan_model(sys.argv[1], PlanRequest(n_ctx=8192), devices)
print(time.process_time() - started)
"""


def cold_plan_seconds(path: Path, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        result = subprocess.run(
            [sys.executable, "-c", COLD_PLAN, str(path)], capture_output=True, text=True, check=True, cwd=ROOT
        )
        runs.append(float(result.stdout.strip()))
    return min(runs)


def best_cpu_seconds(action, repeat: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        action()
        best = min(best, time.process_time() - started)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        big = synth.write_gguf(Path(scratch) / "llama-70b-q4_k_m.gguf", synth.LLAMA_70B, "Q4_K_M", sparse=True)
        models = {"Gemma-3-270M Q4_K_M": gemma3_path(), "70B-shape Q4_K_M (sparse)": big}
        print("| model | tune-split plan (CPU s) | GGUFReader open (CPU s) | ratio | target |")
        print("|---|---|---|---|---|")
        worst = 0.0
        for name, path in models.items():
            plan_s = cold_plan_seconds(path, args.repeat)
            reader_s = best_cpu_seconds(lambda p=path: GGUFReader(p), max(1, args.repeat // 2))
            worst = max(worst, plan_s)
            verdict = "ok" if plan_s < TARGET_S else "MISSED"
            print(f"| {name} | {plan_s:.3f} | {reader_s:.3f} | {reader_s / plan_s:.0f}x faster | {verdict} |")
    return 0 if worst < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
