"""`llamasplit serve --split-mode tensor` across two local RPC devices: the plan says tensor, the engine loads with
llama.cpp's tensor parallelism and answers a chat; `--split-mode row` is refused at start-up with the tuner's
one-line reason instead of a llama.cpp exception.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.kit.rpcbed import rpc_servers
from tests.server.support import ROOT, cli_environment, plan_and_chat_over_two_rpc_devices

pytestmark = pytest.mark.llama


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
    assert "Traceback" not in result.stderr and "does not support split buffers\")" in result.stderr
