"""`llamasplit rpc-worker`: serve this machine's GPUs (or its CPU) to another machine as llama.cpp RPC devices.

The serving is llama.cpp's own (``ggml_backend_rpc_start_server`` of the libggml-rpc that llama-cpp-python
ships), so any llama.cpp of the same RPC protocol version can use the worker, llama-server included. The
tensor cache keeps weights over 10 MiB on the worker's disk by content hash: after a restart of the worker or
of the server, the server sends only the hashes of the weights the worker already has.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from server.config import is_loopback
from server.errors import ConfigError

log = logging.getLogger("llamasplit.rpc_worker")

DEFAULT_PORT = 50052  # llama.cpp's rpc-server default
GiB = 1024**3

RPC_WORKER_HELP = """\
Serve this machine's GPUs (or, without one, its CPU) as llama.cpp RPC devices for a llamasplit server (or
llama-server) on another machine: `llamasplit serve --rpc THIS_HOST:PORT` there puts layers here.

The RPC protocol has no authentication and no encryption: bind a LAN address only on a trusted network.

example (on the second machine, then on the first):
  llamasplit rpc-worker --host 192.168.1.20 --port 50052
  llamasplit serve --model models/Llama-3.3-70B-Instruct-Q4_K_M.gguf --rpc 192.168.1.20:50052
"""


def default_cache_dir() -> Path:
    """Where llama.cpp's rpc-server keeps its cache (``rpc-server -c``): $LLAMA_CACHE/rpc or ~/.cache/llama.cpp/rpc."""
    if os.environ.get("LLAMA_CACHE"):
        return Path(os.environ["LLAMA_CACHE"]) / "rpc"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llama.cpp" / "rpc"


def add_rpc_worker_parser(sub: Any) -> None:
    """Register `llamasplit rpc-worker` on the CLI's subparsers (``sub`` is argparse's _SubParsersAction)."""
    worker = sub.add_parser(
        "rpc-worker", help="serve this machine's GPUs to another machine (llama.cpp RPC)",
        description=RPC_WORKER_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add = worker.add_argument
    add("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; a LAN address to serve others)")
    add("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    add(
        "--device",
        action="append",
        metavar="NAME",
        help="a device to serve, e.g. CUDA0 (repeatable or comma-separated; default: every GPU, else the CPU)",
    )
    add("--cache-dir", type=Path, help=f"tensor cache folder (default {default_cache_dir()})")
    add("--no-cache", action="store_true", help="no tensor cache: every load sends all weights")
    add("-t", "--threads", type=int, help="CPU threads when serving the CPU (default: all CPUs)")
    add("--list-devices", action="store_true", help="print this machine's devices and exit")
    add("--debug", action="store_true", help="show tracebacks")
    worker.set_defaults(run=run_rpc_worker)


def _choose(requested: list[str] | None, available: list[Any]) -> list[Any]:
    from tuner.llamacpp import default_served_devices

    if not requested:
        return default_served_devices(available)
    names = [n.strip() for spec in requested for n in spec.split(",") if n.strip()]
    by_name = {d.name.lower(): d for d in available}
    unknown = [n for n in names if n.lower() not in by_name]
    if unknown:
        have = ", ".join(d.name for d in available) or "none"
        raise ConfigError(f"--device {', '.join(unknown)}: no such device here; this machine has: {have}")
    chosen = []
    for name in names:
        if by_name[name.lower()] not in chosen:
            chosen.append(by_name[name.lower()])
    return chosen


def describe_device(device: Any) -> str:
    return (
        f"  {device.name:<10} {device.description[:40]:<40} {device.kind:<5} "
        f"{device.free_bytes / GiB:7.1f} GiB free of {device.total_bytes / GiB:.1f} GiB"
    )


def cache_summary(cache_dir: Path) -> str:
    try:
        files = [f for f in cache_dir.iterdir() if f.is_file()]
    except OSError:
        files = []
    size = sum(f.stat().st_size for f in files)
    return f"{cache_dir} ({len(files)} tensors, {size / GiB:.2f} GiB)"


def run_rpc_worker(args: argparse.Namespace) -> int:
    from tuner.llamacpp import local_devices, serve_rpc_devices

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: must be between 1 and 65535")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads {args.threads}: must be at least 1")
    available = local_devices()
    if args.list_devices:
        for device in available:
            print(describe_device(device))
        return 0
    devices = _choose(args.device, available)
    if not devices:
        raise ConfigError("llama.cpp sees no device on this machine to serve")
    cache_dir: Path | None = None
    if not args.no_cache:
        cache_dir = (args.cache_dir or default_cache_dir()).expanduser()
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--cache-dir {cache_dir}: {exc.strerror or exc}") from exc
    threads = args.threads or os.cpu_count() or 1

    if not is_loopback(args.host):
        print(
            f"llamasplit rpc-worker: WARNING: binding {args.host}:{args.port}. The llama.cpp RPC protocol has no "
            "authentication and no encryption: anyone who can reach this port can allocate memory and run "
            "computations on these devices and read what they hold. Use it on a trusted LAN only, never on "
            "the internet (firewall the port to the serving machine).",
            file=sys.stderr,
        )
    print(f"llamasplit rpc-worker: serving {len(devices)} device(s) on {args.host}:{args.port}")
    for device in devices:
        print(describe_device(device))
    print(f"  tensor cache: {cache_summary(cache_dir) if cache_dir else 'off'}")
    address = args.host if args.host not in ("0.0.0.0", "::") else "THIS_MACHINE_IP"
    print(f"  use it with: llamasplit serve --rpc {address}:{args.port}", flush=True)

    # llama.cpp serves in its own loop and never returns while it can accept; run it in a thread so that
    # this (main) thread handles SIGTERM/SIGINT, also as PID 1 in a container where default actions do not apply.
    failed: list[BaseException] = []
    stopped = threading.Event()

    def serve() -> None:
        try:
            serve_rpc_devices(args.host, args.port, devices, threads, str(cache_dir) if cache_dir else None)
        except BaseException as exc:  # the port is taken, or accept failed
            failed.append(exc)
        stopped.set()

    def stop(signum: int, _frame: Any) -> None:
        print(f"llamasplit rpc-worker: stopping ({signal.Signals(signum).name})", file=sys.stderr, flush=True)
        # The serving thread is inside llama.cpp's accept/recv and cannot be asked to stop: end the process.
        sys.stdout.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threading.Thread(target=serve, name="rpc-server", daemon=True).start()
    while not stopped.wait(3600):
        pass
    if failed:
        raise failed[0]
    return 0
