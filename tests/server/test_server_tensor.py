"""`llamasplit serve --split-mode tensor` across two local RPC devices: the plan says tensor, the engine loads with
llama.cpp's tensor parallelism and answers a chat; `--split-mode row` is refused at start-up with the tuner's
one-line reason instead of a llama.cpp exception.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.kit.rpcbed import rpc_servers

pytestmark = pytest.mark.llama
ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMASPLIT_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def test_serve_with_tensor_split_over_two_rpc_devices_answers_a_chat(smollm2: Path, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with rpc_servers(2) as endpoints, open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--model", f"smol={smollm2}", "--rpc", ",".join(endpoints),
             "--port", str(port), "--ctx", "2048", "--split-mode", "tensor", "--tensor-split", "0.6,0.4"],
            stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=_env(),
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            assert proc.poll() is None, log.read_text()
            entry = httpx.get(url + "/v1/plan").json()["data"][0]
            reply = httpx.post(
                url + "/v1/chat/completions",
                json={"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
                timeout=120,
            )
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)

    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] >= 1
    plan = entry["plan"]
    assert plan["split_mode"] == "tensor" and plan["tensor_split"] == [0.6, 0.4] and plan["flash_attn"]
    assert plan["n_gpu_layers"] == 31 and len(plan["devices"]) == 2
    assert "tensor" in log.read_text()  # the start-up table names the split mode


def test_serve_refuses_split_mode_row_at_start_up(smollm2: Path) -> None:
    with rpc_servers(2) as endpoints:
        result = subprocess.run(
            [sys.executable, "-m", "server.cli", "serve", "--model", f"smol={smollm2}", "--rpc", ",".join(endpoints),
             "--port", "0", "--split-mode", "row"],
            capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=120,
        )  # fmt: skip
    assert result.returncode != 0
    assert "row is not available on CUDA, ROCm, RPC or CPU devices" in result.stderr
    assert "Traceback" not in result.stderr and "does not support split buffers\")" in result.stderr
