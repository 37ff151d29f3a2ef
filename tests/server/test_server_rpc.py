"""Two llama.cpp RPC devices on loopback (this CPU, served twice): `llamasplit serve --rpc` plans across them,
loads with the plan, reports predicted and actual bytes per device, and generates through them.

The server runs in its own process: llama.cpp's RPC client state is process-wide and an RPC server serves
one client at a time, so the test process itself never connects to these endpoints.
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
MiB = 1024 * 1024


def test_serve_over_two_rpc_devices_reports_memory_per_device(smollm2: Path, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMASPLIT_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with rpc_servers(2) as endpoints, open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--model", f"smol={smollm2}", "--rpc", ",".join(endpoints),
             "--port", str(port), "--ctx", "2048", "--n-gpu-layers", "31", "--tensor-split", "0.6,0.4"],
            stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=env,
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
    plan, memory = entry["plan"], entry["memory"]
    assert plan["n_gpu_layers"] == 31 and plan["tensor_split"] == [0.6, 0.4]
    rows = memory["devices"]
    # Devices in llama.cpp's order, each matched to the buffers llama.cpp named after its endpoint.
    assert [row["buffer_name"] for row in rows] == [f"RPC0[{e}]" for e in endpoints]
    for row, device in zip(rows, plan["devices"], strict=True):
        assert row["predicted_bytes"] == device["total_bytes"]
        assert device["actual_bytes"]["total_bytes"] == row["actual_bytes"]
        # The acceptance bound of the tuner: within 3% or 16 MiB of what llama.cpp allocated.
        assert abs(row["actual_bytes"] - row["predicted_bytes"]) <= max(0.03 * row["actual_bytes"], 16 * MiB)
        assert row["nvml_used_bytes"] is None  # RPC devices have no NVML
    assert "predicted" in log.read_text()
