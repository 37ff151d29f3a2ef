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


def test_engine_protocol_imports_neither_llama_cpp_nor_http() -> None:
    loaded = run_python(
        "import sys, server.engine, server.engine.protocol, server.engine.errors; "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('llama_cpp', 'fastapi', 'starlette', 'uvicorn', 'httpx', 'pydantic', 'tuner'))))"
    )
    assert loaded.strip() == ""


def test_the_server_uses_the_tuner_through_its_public_packages_only() -> None:
    import ast
    from pathlib import Path

    public = {"tuner", "tuner.llamacpp"}
    offenders = []
    for path in sorted((Path(__file__).parents[1] / "server").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tuner":
                if node.module not in public:
                    offenders.append(f"{path.name}: from {node.module} import ...")
            elif isinstance(node, ast.Import):
                offenders += [f"{path.name}: import {a.name}" for a in node.names if a.name.startswith("tuner.")]
    assert offenders == []
