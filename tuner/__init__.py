"""llamasplit tuner: predicts llama.cpp's per-device memory and plans multi-GPU splits.

    from tuner import plan_model, PlanRequest
    plan = plan_model("models/model.gguf", PlanRequest(n_ctx=8192))

Names are imported on first use, so `import tuner.gguf` (or the CLI's --help) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> "module" (the same name there) or "module:attribute".
_EXPORTS = {
    "plan_model": "tuner.api",
    "SPLIT_NAME": "tuner.gguf",
    "Hub": "tuner.hub",
    "HubError": "tuner.errors",
    "FileLocation": "tuner.hub",
    "hub_errors": "tuner.hub",
    "HubReference": "tuner.hubref",
    "RemoteModel": "tuner.hubref",
    "quant_tag": "tuner.hubref",
    "select_model": "tuner.hubref",
    "choose_quantisation": "tuner.quants:choose",
    "plan_quantisations": "tuner.quants:plan_options",
    "discover_devices": "tuner.inventory",
    "parse_size": "tuner.inventory.simulated",
    "gguf_files": "tuner.files",
    "model_alias": "tuner.files",
    "nvml_key": "tuner.inventory.nvidia",
    "nvml_used_bytes": "tuner.inventory.nvidia",
    "use_pci_bus_order": "tuner.inventory.nvidia",
    "CACHE_TYPES": "tuner.plan",
    "FlashAttn": "tuner.plan",
    "SplitMode": "tuner.plan",
    "MiB": "tuner.plan",
    "Device": "tuner.devices",
    "TunerError": "tuner.errors",
    "GGUFError": "tuner.errors",
    "InventoryError": "tuner.errors",
    "PlanRequestError": "tuner.errors",
    "DoesNotFitError": "tuner.errors",
    "LoadSettings": "tuner.plan",
    "Plan": "tuner.plan",
    "PlanRequest": "tuner.plan",
    "DevicePlan": "tuner.plan",
    "HostUsage": "tuner.plan",
    "render_plan": "tuner.render",
}
__all__ = [
    "CACHE_TYPES",
    "SPLIT_NAME",
    "Device",
    "DevicePlan",
    "DoesNotFitError",
    "FileLocation",
    "FlashAttn",
    "GGUFError",
    "HostUsage",
    "Hub",
    "HubError",
    "HubReference",
    "InventoryError",
    "LoadSettings",
    "MiB",
    "Plan",
    "PlanRequest",
    "PlanRequestError",
    "RemoteModel",
    "SplitMode",
    "TunerError",
    "choose_quantisation",
    "discover_devices",
    "gguf_files",
    "hub_errors",
    "model_alias",
    "nvml_key",
    "nvml_used_bytes",
    "parse_size",
    "plan_model",
    "plan_quantisations",
    "quant_tag",
    "render_plan",
    "select_model",
    "use_pci_bus_order",
]

if TYPE_CHECKING:
    from tuner.api import plan_model
    from tuner.devices import Device
    from tuner.errors import DoesNotFitError, GGUFError, HubError, InventoryError, PlanRequestError, TunerError
    from tuner.files import gguf_files, model_alias
    from tuner.gguf import SPLIT_NAME
    from tuner.hub import FileLocation, Hub, hub_errors
    from tuner.hubref import HubReference, RemoteModel, quant_tag, select_model
    from tuner.inventory import discover_devices
    from tuner.inventory.nvidia import nvml_key, nvml_used_bytes, use_pci_bus_order
    from tuner.inventory.simulated import parse_size
    from tuner.plan import (
        CACHE_TYPES,
        DevicePlan,
        FlashAttn,
        HostUsage,
        LoadSettings,
        MiB,
        Plan,
        PlanRequest,
        SplitMode,
    )
    from tuner.quants import choose as choose_quantisation
    from tuner.quants import plan_options as plan_quantisations
    from tuner.render import render_plan


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'tuner' has no attribute {name!r}")
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute or name)
