"""The bridge to llama.cpp: RPC devices, per-buffer memory reports of real or dry-run loads, log capture.

Importing this package imports neither llama_cpp nor its submodules; each name loads its module on first
use, so that ``python -m tuner.llamacpp.rpc`` / ``.load`` run without a double-import warning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tuner.llamacpp.buffer_log import (
        LOG_ROUNDING_BYTES,
        BufferReport,
        BufferSizes,
        KvCacheSummary,
        LogCapture,
        UsedDevice,
        capture_llama_log,
        parse_log,
    )
    from tuner.llamacpp.device_usage import DeviceSample, DeviceUsage
    from tuner.llamacpp.libs import llama_cpp_module
    from tuner.llamacpp.load import describe_exit, load_and_report
    from tuner.llamacpp.open import (
        GGML_TYPE_IDS,
        LoadError,
        OpenedModel,
        apply_memory_breakdown,
        default_threads,
        ggml_type_id,
        memory_breakdown_rows,
        open_model,
        open_vocab,
    )
    from tuner.llamacpp.rpc import (
        LocalDevice,
        default_served_devices,
        device_list,
        local_devices,
        probe_rpc_endpoint,
        query_rpc_devices,
        register_rpc_endpoints,
        rpc_device_pointers,
        serve_rpc_devices,
        start_rpc_server,
    )

_MODULE_OF = {
    "LOG_ROUNDING_BYTES": "buffer_log",
    "BufferReport": "buffer_log",
    "BufferSizes": "buffer_log",
    "KvCacheSummary": "buffer_log",
    "LogCapture": "buffer_log",
    "UsedDevice": "buffer_log",
    "capture_llama_log": "buffer_log",
    "parse_log": "buffer_log",
    "DeviceSample": "device_usage",
    "DeviceUsage": "device_usage",
    "GGML_TYPE_IDS": "open",
    "LoadError": "open",
    "OpenedModel": "open",
    "apply_memory_breakdown": "open",
    "default_threads": "open",
    "ggml_type_id": "open",
    "memory_breakdown_rows": "open",
    "open_model": "open",
    "open_vocab": "open",
    "load_and_report": "load",
    "describe_exit": "load",
    "llama_cpp_module": "libs",
    "LocalDevice": "rpc",
    "default_served_devices": "rpc",
    "device_list": "rpc",
    "local_devices": "rpc",
    "serve_rpc_devices": "rpc",
    "probe_rpc_endpoint": "rpc",
    "query_rpc_devices": "rpc",
    "register_rpc_endpoints": "rpc",
    "rpc_device_pointers": "rpc",
    "start_rpc_server": "rpc",
}

__all__ = [
    "GGML_TYPE_IDS",
    "LOG_ROUNDING_BYTES",
    "BufferReport",
    "BufferSizes",
    "DeviceSample",
    "DeviceUsage",
    "KvCacheSummary",
    "LoadError",
    "LocalDevice",
    "LogCapture",
    "OpenedModel",
    "UsedDevice",
    "apply_memory_breakdown",
    "capture_llama_log",
    "default_served_devices",
    "default_threads",
    "describe_exit",
    "device_list",
    "ggml_type_id",
    "llama_cpp_module",
    "load_and_report",
    "local_devices",
    "memory_breakdown_rows",
    "open_model",
    "open_vocab",
    "parse_log",
    "probe_rpc_endpoint",
    "query_rpc_devices",
    "register_rpc_endpoints",
    "rpc_device_pointers",
    "serve_rpc_devices",
    "start_rpc_server",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
