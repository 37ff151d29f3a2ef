"""The engine's Python per batching step, without a server: BatchScheduler.step driven in a loop.

A step is llama_decode plus everything the scheduler does around it in Python (building the batch, sampling
each stream, detokenizing, accounting, handing the events over). On a machine whose cores llama.cpp's threads
fill, that Python runs between two decodes and adds to every token's time; this bench measures it on its own:
per step, the wall time, the time inside llama_decode, and the rest.

    .venv/bin/python bench/bench_scheduler_step.py                       # 1 and 16 streams, SmolLM2
    .venv/bin/python bench/bench_scheduler_step.py --streams 1 --tokens 400 --repeats 5

Greedy streams of exactly --tokens tokens (end of generation forbidden by logit_bias), the benchmark's
settings of bench/bench_concurrency.py (16 sequences of 1,024 tokens, 2 threads, flash attention).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_concurrency import default_model, tokenizer  # noqa: E402

from server.engine.batching import BatchScheduler  # noqa: E402
from server.engine.protocol import FinishEvent, GenerationRequest, SamplingParams  # noqa: E402
from tuner import LoadSettings  # noqa: E402
from tuner.llamacpp import open_model  # noqa: E402


class TimedDecode:
    """llama_cpp with llama_decode timed; everything else passes through."""

    def __init__(self, lc: Any) -> None:
        self._lc = lc
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lc, name)

    def llama_decode(self, ctx: Any, batch: Any) -> int:
        started = time.perf_counter()
        try:
            return int(self._lc.llama_decode(ctx, batch))
        finally:
            self.seconds += time.perf_counter() - started


def measure(model: Path, streams: int, tokens: int, repeats: int, threads: int) -> list[dict[str, float]]:
    _, eog = tokenizer(model)
    settings = LoadSettings(
        n_gpu_layers=0, n_ctx=16 * 1024, n_seq_max=16, n_threads=threads, n_threads_batch=threads,
        flash_attn="on", n_batch=512, n_ubatch=512,
    )  # fmt: skip
    opened = open_model(model, settings)
    finished: list[int] = []

    def emit(events: list[Any], _step: Any, _stats: Any) -> None:
        finished.extend(rid for rid, event in events if isinstance(event, FinishEvent))

    scheduler = BatchScheduler(opened, emit)
    timed = TimedDecode(scheduler._lc)
    scheduler._lc = timed
    bias = dict.fromkeys(eog, -100.0)
    rows = []
    try:
        for repeat in range(repeats):
            requests = [
                GenerationRequest(
                    prompt_tokens=(1, 400 + repeat, 500 + i, 600, 700),  # distinct: nothing reused or copied
                    max_tokens=tokens,
                    sampling=SamplingParams(temperature=0.0, logit_bias=bias),
                )
                for i in range(streams)
            ]
            finished.clear()
            scheduler.step([("submit", repeat * 1000 + i, r) for i, r in enumerate(requests)])  # the prompts
            while any(a.prefilling for a in scheduler._active.values()):
                scheduler.step()
            timed.seconds, steps = 0.0, 0
            started = time.perf_counter()
            while len(finished) < streams:
                scheduler.step()
                steps += 1
            wall = time.perf_counter() - started
            rows.append({
                "step_ms": wall / steps * 1e3, "decode_ms": timed.seconds / steps * 1e3,
                "outside_ms": (wall - timed.seconds) / steps * 1e3,
            })  # fmt: skip
            print(f"  streams {streams:2d}  repeat {repeat + 1}: {steps} steps, step {rows[-1]['step_ms']:.3f} ms, "
                  f"llama_decode {rows[-1]['decode_ms']:.3f} ms, outside {rows[-1]['outside_ms']:.3f} ms")  # fmt: skip
    finally:
        opened.close()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="GGUF (default: SmolLM2-135M-Instruct from PyPI)")
    p.add_argument("--streams", type=lambda v: [int(x) for x in v.split(",")], default=[1, 16])
    p.add_argument("--tokens", type=int, default=300, help="tokens per stream")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    model = args.model or default_model()
    for streams in args.streams:
        rows = measure(model, streams, args.tokens, args.repeats, args.threads)
        med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        print(f"streams {streams}: median step {med['step_ms']:.3f} ms = llama_decode {med['decode_ms']:.3f} ms "
              f"+ {med['outside_ms']:.3f} ms of Python around it ({med['outside_ms'] / streams * 1e3:.0f} us per "
              f"stream)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
