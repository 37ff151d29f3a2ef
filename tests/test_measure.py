"""`--measure`: llama.cpp's dry run on real (RPC) devices lands beside the prediction and agrees with it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tuner import InventoryError, PlanRequest, plan_model
from tuner.inventory import discover_devices
from tuner.measure import attach_measurement

MiB = 1024 * 1024
pytestmark = pytest.mark.llama


def test_measurement_agrees_with_prediction_on_rpc_devices(smollm2: Path, rpc_endpoints: list[str]) -> None:
    endpoints = rpc_endpoints[:2]
    devices = [d.model_copy(update={"free_bytes": 200 * MiB}) for d in discover_devices(rpc=endpoints)]
    plan = plan_model(smollm2, PlanRequest(n_ctx=2048, reserve_bytes=0, objective="balanced"), devices)
    assert all(d.n_layers for d in plan.devices)
    measured = attach_measurement(plan, endpoints)
    for device in measured.devices:
        assert device.actual_bytes is not None
        assert abs(device.actual_bytes["weights_bytes"] - device.weights_bytes) < MiB
        assert abs(device.actual_bytes["kv_bytes"] - device.kv_bytes) < MiB
        assert abs(device.actual_bytes["total_bytes"] - device.total_bytes) < 16 * MiB


def test_measure_refuses_simulated_cards(smollm2: Path) -> None:
    plan = plan_model(smollm2, PlanRequest(n_ctx=2048), discover_devices(gpus="RTX 4090"))
    with pytest.raises(InventoryError, match="--gpus only simulates"):
        attach_measurement(plan, [])


def test_cli_measure_fills_actual_bytes(smollm2: Path, rpc_endpoints: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tuner.cli", str(smollm2), "--rpc", ",".join(rpc_endpoints[:2]), "--ctx", "1024",
         "--measure", "--format", "json"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["devices"][0]["actual_bytes"]["weights_bytes"] > 0
