"""Start-up and loading: /health is 503 while the model loads and 200 once it is ready; requests meanwhile
get a 503 with Retry-After; a server without keys needs no Authorization; a setting that cannot fit fails
while planning, with the tuner's explanation, before anything is loaded."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import openai
import pytest

from server.app import create_app
from server.registry import ModelRegistry, find_models
from tests.server.support import LiveServer, make_settings
from tuner import GGUFError, gguf_files, model_alias
from tuner.errors import DoesNotFitError

pytestmark = pytest.mark.llama


def test_health_is_503_while_loading_and_200_when_ready(smollm2: Path) -> None:
    settings = make_settings(models=[{"path": str(smollm2), "alias": "late"}], ctx=512)
    registry = ModelRegistry.plan(settings)
    gate = threading.Event()
    load_all = registry.load_all

    def held_load() -> None:  # the real load, started only when the test says so
        gate.wait(60)
        load_all()

    registry.load_all = held_load  # type: ignore[method-assign]
    server = LiveServer(create_app(settings, registry)).start(wait_ready=False)
    try:
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        assert health.headers["Retry-After"]
        early = httpx.post(
            server.url + "/v1/chat/completions",
            json={"model": "late", "messages": [{"role": "user", "content": "Hi"}]},
        )
        assert early.status_code == 503
        assert early.json()["error"]["code"] == "model_loading" and early.headers["Retry-After"]
        assert httpx.get(server.url + "/v1/models").json()["data"][0]["status"] == "loading"
        gate.set()
        server.wait_ready()
        assert httpx.get(server.url + "/health").json() == {"status": "ok", "models": {"late": "ready"}}
        # No API key configured: none is needed.
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="anything", max_retries=0)
        reply = client.completions.create(model="late", prompt="Hello", max_tokens=2)
        assert reply.usage is not None and reply.usage.completion_tokens >= 1
    finally:
        gate.set()
        server.stop()


def test_setting_that_cannot_fit_fails_while_planning(smollm2: Path) -> None:
    from tuner.inventory import simulated_devices

    # A 64 MiB card cannot hold SmolLM2's 30 layers, which the user insists on offloading.
    settings = make_settings(models=[{"path": str(smollm2)}], n_gpu_layers=31, ctx=2048)
    with pytest.raises(DoesNotFitError) as info:
        ModelRegistry.plan(settings, devices=simulated_devices("1x64MiB"))
    assert info.value.closest is not None
    assert "MiB" in str(info.value) or "GiB" in str(info.value)


def test_models_dir_serves_every_gguf_and_split_files_once(tmp_path: Path, smollm2: Path) -> None:
    (tmp_path / "alpha.gguf").symlink_to(smollm2)
    for part in (1, 2):
        (tmp_path / f"big-{part:05d}-of-00002.gguf").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a model")
    assert [p.name for p in gguf_files(tmp_path)] == ["alpha.gguf", "big-00001-of-00002.gguf"]
    assert model_alias(tmp_path / "big-00001-of-00002.gguf") == "big"
    sources = find_models(make_settings(models_dir=tmp_path))
    assert [(s.alias, s.origin) for s in sources] == [("alpha", "models_dir"), ("big", "models_dir")]


def test_incomplete_split_model_is_a_config_error(tmp_path: Path) -> None:
    from server.errors import ConfigError

    (tmp_path / "big-00001-of-00003.gguf").write_bytes(b"")
    (tmp_path / "big-00003-of-00003.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match=r"big-00002-of-00003\.gguf missing"):
        gguf_files(tmp_path)
    # Serving that folder is a configuration error with the same words (exit 2).
    with pytest.raises(ConfigError, match=r"big-00002-of-00003\.gguf missing"):
        find_models(make_settings(models_dir=tmp_path))


def test_without_any_model_the_default_is_smollm2(tmp_path: Path, smollm2: Path) -> None:
    (source,) = find_models(make_settings(models_dir=tmp_path / "empty"))
    assert source.origin == "default"
    assert source.alias == "SmolLM2-135M-Instruct"
    assert source.path.resolve() == smollm2.resolve()
