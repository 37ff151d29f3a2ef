"""The tuner's one entry point for other programs (the server uses nothing else)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from tuner.devices import Device
from tuner.errors import DoesNotFitError
from tuner.gguf import read_model
from tuner.model import ModelInfo
from tuner.plan import Plan, PlanRequest
from tuner.planner import plan
from tuner.speed import DEFAULT_SPEED_MODEL, SpeedModel


def plan_model(
    model_path: str | os.PathLike[str] | ModelInfo,
    request: PlanRequest | None = None,
    devices: Sequence[Device] | None = None,
    *,
    strict: bool = True,
    speed: SpeedModel = DEFAULT_SPEED_MODEL,
) -> Plan:
    """Read the GGUF header, inventory the devices (unless given) and plan the placement.

    ``model_path`` may also be a model already read (a header fetched from the Hub by tuner.hub).

    With ``strict`` a plan that does not fit raises DoesNotFitError (carrying the plan, whose verdict says
    which device is short by how much and what would help); otherwise the plan comes back with fits=False.
    """
    request = request or PlanRequest()
    model = model_path if isinstance(model_path, ModelInfo) else read_model(model_path)
    if devices is None:
        from tuner.inventory import discover_devices

        devices = discover_devices()
    result = plan(model, devices, request, speed)
    if strict and not result.fits:
        raise DoesNotFitError(result.verdict, closest=result)
    return result
