"""Every public name of each package resolves, the tuner core stays light, and the tuner never imports the server."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


@pytest.mark.parametrize("package", ["tuner", "server", "tuner.llamacpp", "tuner.inventory"])
def test_every_exported_name_resolves(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"


def test_unknown_attribute_is_an_attribute_error() -> None:
    import tuner

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tuner.nope  # noqa: B018


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_tuner_core_imports_neither_llama_cpp_nor_drivers_nor_http() -> None:
    loaded = run_python(
        "import sys, tuner, tuner.planner, tuner.cli, tuner.inventory; "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('llama_cpp', 'pynvml', 'amdsmi', 'fastapi', 'server', 'uvicorn'))))"
    )
    assert loaded.strip() == ""
