"""llamasplit server: an OpenAI-compatible HTTP server that loads GGUF models with the tuner's plan.

    from server import create_app, load_settings
    app = create_app(load_settings({"ctx": 4096}))

Names are imported on first use, so `import server.config` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "create_app": "server.app",
    "Settings": "server.config",
    "ModelSettings": "server.config",
    "load_settings": "server.config",
    "ModelRegistry": "server.registry",
    "ServedModel": "server.registry",
    "Engine": "server.engine",
    "WorkerEngine": "server.engine.client",
    "GenerationRequest": "server.engine",
    "ServerError": "server.errors",
    "ConfigError": "server.errors",
}
__all__ = [
    "ConfigError",
    "Engine",
    "GenerationRequest",
    "ModelRegistry",
    "ModelSettings",
    "ServedModel",
    "ServerError",
    "Settings",
    "WorkerEngine",
    "create_app",
    "load_settings",
]

if TYPE_CHECKING:
    from server.app import create_app
    from server.config import ModelSettings, Settings, load_settings
    from server.engine import Engine, GenerationRequest
    from server.engine.client import WorkerEngine
    from server.errors import ConfigError, ServerError
    from server.registry import ModelRegistry, ServedModel


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'server' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
