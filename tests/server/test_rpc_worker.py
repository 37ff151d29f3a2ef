"""`llamasplit rpc-worker`: serves this machine's devices through llama.cpp's own RPC server, says what it serves,
warns off the internet, refuses what it cannot do in one line, and keeps weights in its tensor cache so that a
restarted worker is sent only their hashes."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kit.rpcworker import ROOT, RpcWorker, child_env
from tuner.llamacpp import load_and_report, probe_rpc_endpoint
from tuner.plan import LoadSettings

pytestmark = pytest.mark.llama
MiB = 1024 * 1024


def rpc_worker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "rpc-worker", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=child_env(),
    )  # fmt: skip


def test_list_devices_prints_this_machines_devices() -> None:
    done = rpc_worker("--list-devices")
    assert done.returncode == 0, done.stderr
    assert re.search(r"^\s+CPU\s+.*cpu\s+[\d.]+ GiB free of [\d.]+ GiB$", done.stdout, re.M)


def test_an_unknown_device_is_refused_in_one_line_naming_the_devices_there() -> None:
    done = rpc_worker("--device", "CUDA7")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "llamasplit: --device CUDA7: no such device here; this machine has: CPU"
    ]


def test_a_worker_says_what_it_serves_answers_the_handshake_and_stops_on_sigterm(tmp_path: Path) -> None:
    worker = RpcWorker(tmp_path, "--cache-dir", str(tmp_path / "cache"), "--threads", "1").start()
    try:
        assert probe_rpc_endpoint(worker.endpoint) == 1
    finally:
        worker.kill(signal.SIGTERM)
    out = worker.output()
    assert f"serving 1 device(s) on {worker.endpoint}" in out
    assert re.search(r"^\s+CPU\s+.*GiB free of", out, re.M)
    assert f"tensor cache: {tmp_path / 'cache'} (0 tensors" in out
    assert f"llamasplit serve --rpc {worker.endpoint}" in out
    assert "WARNING" not in out  # loopback: nothing to warn about
    assert worker.proc is not None and worker.proc.returncode == 0 and "stopping (SIGTERM)" in out


def test_a_non_loopback_address_warns_that_rpc_has_no_authentication() -> None:
    # 192.0.2.1 (TEST-NET-1) is nobody's address: the warning comes, then the bind fails, and nothing is exposed.
    done = rpc_worker("--host", "192.0.2.1", "--port", "50999", "--no-cache")
    assert "no authentication and no encryption" in done.stderr and "trusted LAN only" in done.stderr
    assert done.returncode == 2
    assert "llamasplit: the RPC server on 192.0.2.1:50999 stopped (port taken, or accept failed)" in done.stderr


def test_a_taken_port_is_an_error_not_a_hang(tmp_path: Path) -> None:
    worker = RpcWorker(tmp_path, "--no-cache").start()
    try:
        done = rpc_worker("--port", str(worker.port), "--no-cache")
    finally:
        worker.stop()
    assert done.returncode == 2
    assert f"the RPC server on 127.0.0.1:{worker.port} stopped (port taken" in done.stderr


# ggml-rpc's GGML_RPC_DEBUG lines: a tensor sent whole, and a tensor the client offered by its hash first.
_SET_TENSOR = re.compile(r"\[set_tensor\] buffer: \S+, data: \S+, offset: \d+, size: (\d+)")
_SET_TENSOR_HASH = re.compile(r"\[set_tensor_hash\] buffer: \S+, data: \S+, offset: \d+, size: (\d+)")


def test_a_restarted_worker_is_sent_only_the_hashes_of_the_weights_it_cached(smollm2: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    worker = RpcWorker(tmp_path, "--cache-dir", str(cache), debug=True)
    settings = LoadSettings(n_gpu_layers=99, n_ctx=256)
    sent: list[int] = []
    hashed: list[int] = []
    for _ in range(2):  # the first load fills the cache; the second goes to a fresh worker process
        worker.start()
        mark = worker.log_size()
        try:
            load_and_report(smollm2, settings, rpc_endpoints=[worker.endpoint])
        finally:
            worker.stop()
        log = worker.log_path.read_bytes()[mark:].decode(errors="replace")
        sent.append(sum(int(m) for m in _SET_TENSOR.findall(log)))
        hashed.append(sum(int(m) for m in _SET_TENSOR_HASH.findall(log)))

    cached = sorted(f.stat().st_size for f in cache.iterdir())
    # SmolLM2's tied output weights (28.7 MiB, a copy of token_embd) are its only tensor over llama.cpp's 10 MiB
    # hash threshold: they went to the cache on the first load and were not sent again on the second.
    assert cached and all(size > 10 * MiB for size in cached)
    assert hashed == [0, sum(cached)]
    assert sent[0] - sent[1] == sum(cached)
    assert sent[1] < sent[0] * 0.8
