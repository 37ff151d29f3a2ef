"""`tune-split` as a user runs it: a real process, real GGUF files, simulated cards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tuner.split import layer_counts


def tune_split(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tuner.cli", *map(str, args)], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def big(synth_model) -> Path:  # type: ignore[no-untyped-def]
    return synth_model("llama-70b-q4_k_m")


def test_table_shows_every_device_and_the_verdict(big: Path) -> None:
    result = tune_split(big, "--gpus", "RTX 4090,RTX 4080", "--ctx", "8192")
    assert result.returncode == 0, result.stderr
    assert "RTX 4090" in result.stdout and "RTX 4080" in result.stdout and "host RAM" in result.stdout
    assert "FITS" in result.stdout and "CUDA_DEVICE_ORDER=PCI_BUS_ID llama-server -ngl" in result.stdout


def test_json_schema_is_complete(big: Path) -> None:
    result = tune_split(big, "--gpus", "24GiB,16GiB", "--ctx", "8192", "--format", "json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    for key in (
        "split_mode", "tensor_split", "n_gpu_layers", "main_gpu", "n_ctx", "n_seq_max", "type_k", "type_v",
        "flash_attn", "n_ubatch", "fits", "host", "devices",
    ):
        assert key in plan, key
    assert set(plan["host"]) >= {"weights_bytes", "kv_bytes", "compute_bytes"}
    for device in plan["devices"]:
        assert set(device) >= {
            "index", "name", "kind", "free_bytes", "weights_bytes", "kv_bytes", "compute_bytes",
            "overhead_bytes", "total_bytes", "layers",
        }
        assert device["kind"] == "simulated"
    counts = layer_counts(plan["tensor_split"], 80, plan["n_gpu_layers"])
    assert counts == [d["n_layers"] for d in plan["devices"]]


def test_flags_and_env_formats(big: Path) -> None:
    flags = tune_split(big, "--gpus", "RTX 4090,RTX 4080", "--format", "flags")
    assert flags.returncode == 0 and flags.stdout.startswith("-ngl ") and "--fit off" in flags.stdout
    env = tune_split(big, "--gpus", "RTX 4090,RTX 4080", "--format", "env")
    variables = dict(line.split("=", 1) for line in env.stdout.splitlines())
    assert variables["LLAMASPLIT_SPLIT_MODE"] == "layer" and int(variables["LLAMASPLIT_N_GPU_LAYERS"]) > 0


def test_impossible_fit_exits_3_with_explanation(big: Path) -> None:
    result = tune_split(big, "--gpus", "RTX 4090,RTX 4080", "--ctx", "8192", "-ngl", "99", "-ts", "1,1")
    assert result.returncode == 3
    assert "DOES NOT FIT" in result.stdout and "GiB short" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}"], "no such file"),
        (["{not_gguf}"], "not a GGUF file"),
        (["{truncated}"], "truncated"),
        (["{model}", "--gpus", "RTX 4909"], "unknown GPU"),
        (["{model}", "--gpus", "24GiB,16GiB", "-ts", "1,1,1"], "3 entries for 2 devices"),
        (["{model}", "--gpus", "24GiB", "-ctv", "q8_0", "-fa", "off"], "needs flash attention"),
        (["{model}", "--rpc", "127.0.0.1:1"], "127.0.0.1:1"),
    ],
    ids=["missing", "not-gguf", "truncated", "unknown-gpu", "split-length", "quantised-v", "rpc-down"],
)
def test_bad_input_gets_one_line_and_non_zero_exit(
    args: list[str], message: str, smollm2: Path, tmp_path: Path
) -> None:
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("just text")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(smollm2.read_bytes()[:3000])
    paths = {"missing": tmp_path / "nope.gguf", "not_gguf": not_gguf, "truncated": truncated, "model": smollm2}
    result = tune_split(*[a.format(**paths) for a in args])
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tune-split: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_gpu_name_suggests_close_names(smollm2: Path) -> None:
    result = tune_split(smollm2, "--gpus", "RTX 4909")
    assert result.returncode == 2 and "4090" in result.stderr


def test_bad_flag_values_are_usage_errors(smollm2: Path) -> None:
    result = tune_split(smollm2, "--parallel", "0")
    assert result.returncode == 2 and "must be at least 1" in result.stderr


def test_env_format_is_what_the_server_reads(big: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.config import load_settings

    env = tune_split(big, "--gpus", "RTX 4090,RTX 4080", "--ctx", "8192", "-np", "2", "--format", "env")
    assert env.returncode == 0, env.stderr
    variables = dict(line.split("=", 1) for line in env.stdout.splitlines())
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.ctx == 8192 and settings.parallel == 2
    assert settings.n_gpu_layers == int(variables["LLAMASPLIT_N_GPU_LAYERS"])
    assert settings.tensor_split == tuple(float(v) for v in variables["LLAMASPLIT_TENSOR_SPLIT"].split(","))
    assert settings.ubatch_size == 512 and settings.flash_attn == "on" and settings.split_mode == "layer"


def test_split_gguf_is_planned_as_one_model(tmp_path: Path) -> None:
    from tests.kit import synth

    parts = synth.write_split_gguf(tmp_path, synth.TINY_LLAMA, "Q4_0", n_splits=3)
    whole = synth.write_gguf(tmp_path / "whole.gguf", synth.TINY_LLAMA, "Q4_0")
    split_plan = json.loads(tune_split(parts[1], "--gpus", "24GiB", "--format", "json").stdout)
    whole_plan = json.loads(tune_split(whole, "--gpus", "24GiB", "--format", "json").stdout)
    assert split_plan["devices"][0]["weights_bytes"] == whole_plan["devices"][0]["weights_bytes"]
    assert split_plan["n_gpu_layers"] == whole_plan["n_gpu_layers"] == synth.TINY_LLAMA.n_layer + 1


def test_unknown_architecture_is_one_line(alien_gguf: Path) -> None:
    path = alien_gguf
    result = tune_split(path, "--gpus", "24GiB")
    assert result.returncode == 2
    expected = f"tune-split: {path}: unknown architecture 'alien9000'; llama.cpp 0.3.36 cannot load it"
    assert result.stderr.strip() == expected


def test_narrow_terminal_table_keeps_every_number_whole(big: Path) -> None:
    from rich.console import Console

    from tuner import PlanRequest, plan_model, render_plan
    from tuner.inventory import discover_devices

    plan = plan_model(big, PlanRequest(n_ctx=8192), discover_devices(gpus="RTX 4090,RTX 4080"))
    console = Console(width=100, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(render_plan(plan, width=100))
    text = console.export_text()
    assert "…" not in text and "RTX 4090 [sim]" in text and "sizes in GiB" in text
    assert f"{plan.devices[0].weights_bytes / 1024**3:.2f}" in text


@pytest.mark.parametrize("extra", [(), ("--tensor-split", "1,1"), ("--split-mode", "tensor"),
                                   ("--split-mode", "tensor", "--tensor-split", "3,1")],
                         ids=["layer", "layer-ts", "tensor", "tensor-ts"])  # fmt: skip
def test_zero_gpu_layers_means_a_cpu_only_placement(synth_model, extra: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    model = synth_model("tiny-gemma3-q4_k_m")  # 6 blocks + the output layer
    table = tune_split(model, "--gpus", "24GiB,16GiB", "--n-gpu-layers", "0", *extra)
    assert table.returncode == 0, table.stderr
    assert "0 of 7 layers on the devices" in table.stdout
    flags = tune_split(model, "--gpus", "24GiB,16GiB", "--n-gpu-layers", "0", *extra, "--format", "flags")
    assert flags.stdout.split()[:2] == ["-ngl", "0"]


def test_split_mode_row_is_refused_with_the_reason(big: Path) -> None:
    result = tune_split(big, "--gpus", "RTX 4090,RTX 4080", "--split-mode", "row")
    assert result.returncode == 2
    assert "row is not available on CUDA, ROCm, RPC or CPU devices" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_tensor_split_is_planned_for_the_4090_and_4080(big: Path) -> None:
    result = tune_split(big, "--gpus", "RTX 4090,RTX 4080", "--ctx", "8192", "-sm", "tensor", "--format", "json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["split_mode"] == "tensor" and len(plan["tensor_split"]) == 2 and plan["flash_attn"]
    assert all(d["free_after_bytes"] >= 0 for d in plan["devices"])
