"""`llamasplit serve` as users run it: start-up refusals exit non-zero with one line and no traceback; a real
run prints the tuner's plan, serves the default model, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", *args],
        capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, env=_env(), check=False,
    )  # fmt: skip


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMASPLIT_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_console_script_is_llamasplit() -> None:
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "llamasplit"]
    assert script.value == "server.cli:main"


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["--host", "0.0.0.0"], 2, "not a loopback address"),
        (["--alias", "x"], 2, "--alias needs --model"),
        (["--model", "/no/such/model.gguf"], 2, "/no/such/model.gguf does not exist"),
        (["--ctx", "0"], 2, "ctx=0"),
        (["--split-mode", "diagonal"], 2, "invalid choice"),
        (["--config", "/no/such/config.toml"], 2, "cannot read config file"),
        (["--cache-type-v", "q8_0", "--flash-attn", "off"], 2, "needs flash attention"),
        (["--ctx", "100000000"], 3, "does not fit"),
    ],
    ids=["public-bind-no-key", "alias-alone", "missing-model", "ctx-zero", "bad-choice", "missing-config",
         "quantised-v-without-fa", "context-too-big"],
)  # fmt: skip
def test_start_up_refusals_exit_non_zero_with_one_line(args: list[str], code: int, fragment: str) -> None:
    result = run_cli(*args, "--port", str(free_port()))
    assert result.returncode == code, result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    if code != 2 or "invalid choice" not in result.stderr:  # argparse prints usage first
        assert len([line for line in result.stderr.splitlines() if line.startswith("llamasplit:")]) == 1


@pytest.fixture
def served_default(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    """`llamasplit serve` with an empty models/ and no --model: the default SmolLM2."""
    port = free_port()
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--models-dir", str(tmp_path / "models"),
             "--port", str(port), "--ctx", "1024"],
            stdout=subprocess.DEVNULL, stderr=err, text=True, cwd=ROOT, env=_env(),
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert proc.poll() is None, log.read_text()
        yield proc, url, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.llama
def test_serve_prints_the_plan_serves_the_default_model_and_stops_on_ctrl_c(
    served_default: tuple[subprocess.Popen[str], str, Path],
) -> None:
    proc, url, log = served_default
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hello!"}], max_tokens=4
    )
    assert reply.choices[0].message.content
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    text = log.read_text()
    assert "FITS" in text and "llama-server flags" in text  # the tuner's table
    assert "SmolLM2-135M-Instruct is ready" in text
    assert "predicted" in text and "llama.cpp" in text  # predicted vs actual after loading


@pytest.mark.llama
def test_insecure_public_bind_is_allowed_and_loudly_logged(tmp_path: Path, smollm2: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--model", f"tiny={smollm2}", "--host", "0.0.0.0",
         "--insecure", "--port", str(port), "--ctx", "512"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"] == "tiny"
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    assert "WITHOUT an API key" in stderr


@pytest.mark.llama
def test_api_key_file_keys_are_required(tmp_path: Path, smollm2: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# one key per line\nalpha-key\n\nbeta-key\n")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(smollm2), "--api-key-file", str(keys),
         "--port", str(port), "--ctx", "512", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env(),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer beta-key"}).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    assert "alpha-key" not in stderr and "beta-key" not in stderr  # keys never logged


@pytest.mark.llama
def test_model_that_fails_to_load_stops_the_server_with_llama_cpps_reason(tmp_path: Path, smollm2: Path) -> None:
    broken = tmp_path / "broken.gguf"
    with open(smollm2, "rb") as src:
        broken.write_bytes(src.read(50_000_000))  # the header is intact, the tensor data is cut short
    result = run_cli("--model", str(broken), "--port", str(free_port()), "--ctx", "512", timeout_s=120)
    assert result.returncode == 1, result.stderr
    assert "a model failed to load: llama.cpp could not load" in result.stderr
    assert "not within the file bounds" in result.stderr
    assert "Traceback" not in result.stderr
