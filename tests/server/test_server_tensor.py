"""`llamasplit serve --split-mode tensor` across two local RPC devices: the plan says tensor, the engine loads with
llama.cpp's tensor parallelism and answers a chat, and /v1/plan gives each device's actual bytes from a source
outside llama.cpp (whose report shows only the Meta() device); `--split-mode row` is refused at start-up with the
tuner's one-line reason instead of a llama.cpp exception.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.kit.rpcbed import classify, logged_rpc_servers, rpc_servers
from tests.server.support import ROOT, cli_environment, plan_and_chat_over_two_rpc_devices, serve_cli

pytestmark = pytest.mark.llama
MiB = 1024 * 1024


def test_serve_with_tensor_split_over_two_rpc_devices_answers_a_chat(smollm2: Path, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    flags = ("--split-mode", "tensor", "--tensor-split", "0.6,0.4")
    _, entry, reply = plan_and_chat_over_two_rpc_devices(smollm2, log, *flags)

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
            capture_output=True, text=True, cwd=ROOT, env=cli_environment(), timeout=120,
        )  # fmt: skip
    assert result.returncode != 0
    assert "row is not available on CUDA, ROCm, RPC or CPU devices" in result.stderr
    assert "Traceback" not in result.stderr and 'does not support split buffers")' in result.stderr


def test_plan_gives_each_tensor_split_device_its_measured_bytes(smollm2: Path, tmp_path: Path) -> None:
    """Each RPC server's own allocation log is the oracle: the figure /v1/plan reports for a device (its server
    process's growth over the load) holds at least what that server allocated, and at most a MiB more (the
    server's own bookkeeping); it differs per device, so it is no share of the Meta() aggregate."""
    log = tmp_path / "serve.log"
    with logged_rpc_servers(2) as servers:
        endpoints = ",".join(server.endpoint for server in servers)
        flags = ["--model", f"smol={smollm2}", "--rpc", endpoints, "--ctx", "2048", "--split-mode", "tensor",
                 "--tensor-split", "0.6,0.4"]  # fmt: skip
        with serve_cli(flags, log) as url:
            entry = httpx.get(url + "/v1/plan").json()["data"][0]
            allocated = [classify(server.allocations(until_teardown=False)).total_bytes for server in servers]

    plan, memory = entry["plan"], entry["memory"]
    assert plan["split_mode"] == "tensor"
    assert "Meta(" in "".join(memory["buffers"])  # llama.cpp's own report: the aggregate only
    actual = []
    for device, row, logged in zip(plan["devices"], memory["devices"], allocated, strict=True):
        measured = device["actual_bytes"]["total_bytes"]
        assert row["actual_bytes"] == measured
        assert "RPC server process" in row["actual_source"] and "VmData" in row["actual_source"]
        assert logged <= measured <= logged + MiB, (device["name"], logged, measured)
        assert set(device["actual_bytes"]) == {"total_bytes"}  # nothing borrowed from the Meta() aggregate
        assert row["buffer_name"] is None and row["actual"] is None
        actual.append(measured)
    assert actual[0] - actual[1] == pytest.approx(allocated[0] - allocated[1], abs=MiB)
