"""llamasplit tuner: predicts llama.cpp's per-device memory and plans multi-GPU splits.

    from tuner import plan_model, PlanRequest
    plan = plan_model("models/model.gguf", PlanRequest(n_ctx=8192))

Names are imported on first use, so `import tuner.gguf` (or the CLI's --help) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "plan_model": "tuner.api",
    "Device": "tuner.devices",
    "TunerError": "tuner.errors",
    "GGUFError": "tuner.errors",
    "InventoryError": "tuner.errors",
    "PlanRequestError": "tuner.errors",
    "DoesNotFitError": "tuner.errors",
    "Plan": "tuner.plan",
    "PlanRequest": "tuner.plan",
    "DevicePlan": "tuner.plan",
    "HostUsage": "tuner.plan",
    "render_plan": "tuner.render",
}
__all__ = [
    "Device",
    "DevicePlan",
    "DoesNotFitError",
    "GGUFError",
    "HostUsage",
    "InventoryError",
    "Plan",
    "PlanRequest",
    "PlanRequestError",
    "TunerError",
    "plan_model",
    "render_plan",
]

if TYPE_CHECKING:
    from tuner.api import plan_model
    from tuner.devices import Device
    from tuner.errors import DoesNotFitError, GGUFError, InventoryError, PlanRequestError, TunerError
    from tuner.plan import DevicePlan, HostUsage, Plan, PlanRequest
    from tuner.render import render_plan


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tuner' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
