"""Two llama.cpp RPC devices on loopback (this CPU, served twice): `llamasplit serve --rpc` plans across them,
loads with the plan, reports predicted and actual bytes per device, and generates through them.

The server runs in its own process: llama.cpp's RPC client state is process-wide and an RPC server serves
one client at a time, so the test process itself never connects to these endpoints.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.server.support import plan_and_chat_over_two_rpc_devices

pytestmark = pytest.mark.llama
MiB = 1024 * 1024


def test_serve_over_two_rpc_devices_reports_memory_per_device(smollm2: Path, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    flags = ("--n-gpu-layers", "31", "--tensor-split", "0.6,0.4")
    endpoints, entry, reply = plan_and_chat_over_two_rpc_devices(smollm2, log, *flags)

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
