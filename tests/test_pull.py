"""`llamasplit pull` against a fake Hub on loopback: resume, checksums, split models, the choice of quantisation.

Each test runs the real CLI in a process with HF_ENDPOINT pointed at the fake Hub (tests/kit/hub.py), which
serves real GGUFs and counts the bytes it sends.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.kit import synth
from tests.kit.hub import FakeHub, fake_hub, hub_env

TOKEN = "hf_PullTokenNeverPrinted0123456789"
# 1057 MiB with the default 512 MiB reserve leaves what tests/test_hub.py's 545 MiB card leaves: the tiny Q4_0 and
# Q8_0 fit at the 2048-token default context with every layer on the card, F16 does not.
TINY_CARD = ("--gpus", "1057MiB")
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pull-files")
    found = {f"tiny-llama-{q}.gguf": synth.write_gguf(folder / f"tiny-llama-{q}.gguf", synth.TINY_LLAMA, q)
             for q in ("Q4_0", "Q8_0", "F16")}  # fmt: skip
    for part in synth.write_split_gguf(folder / "split", synth.TINY_LLAMA, "Q5_0", n_splits=3):
        found[part.name] = part
    found[SMOLLM2] = smollm2
    return found


@pytest.fixture(scope="module")
def hub(files: dict[str, Path]) -> Iterator[FakeHub]:
    with fake_hub() as hub:
        hub.add_repo("acme/tiny-llama-GGUF", {n: p for n, p in files.items() if n.startswith("tiny-llama-")
                                              and "-of-" not in n})  # fmt: skip
        hub.add_repo("acme/tiny-llama-split-GGUF", {f"Q5_0/{n}": p for n, p in files.items() if "-of-" in n})
        hub.add_repo("acme/git-GGUF", {"tiny-llama-Q4_0.gguf": files["tiny-llama-Q4_0.gguf"]}, lfs=False)
        hub.add_repo("acme/gated-GGUF", {"tiny-llama-Q4_0.gguf": files["tiny-llama-Q4_0.gguf"]}, gated=True,
                     token=TOKEN)  # fmt: skip
        hub.add_repo("HuggingFaceTB/SmolLM2-GGUF", {SMOLLM2: files[SMOLLM2]})
        yield hub


@pytest.fixture
def models(tmp_path: Path) -> Path:
    return tmp_path / "models"


def command(hub: FakeHub, home: Path, *args: str | Path, **env: str) -> tuple[list[str], dict[str, str]]:
    return [sys.executable, "-m", "server.cli", "pull", *map(str, args)], hub_env(hub, home, **env)


@pytest.fixture
def pull(hub: FakeHub, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run `llamasplit pull ARGS` (keyword arguments become environment variables)."""

    def run(*args: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
        hub.reset_counters()
        argv, environment = command(hub, tmp_path / "hf-home", *args, **env)
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=environment)

    return run


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".gguf")) if folder.exists() else []


def test_pull_downloads_verifies_and_prints_the_plan(pull, hub: FakeHub, files, models: Path) -> None:  # type: ignore[no-untyped-def]
    result = pull("acme/tiny-llama-GGUF:q8_0", "--dir", models, *TINY_CARD)
    assert result.returncode == 0, result.stderr
    dest = models / "tiny-llama-Q8_0.gguf"
    assert sha256(dest) == sha256(files["tiny-llama-Q8_0.gguf"]) and leftovers(models) == []
    assert "FITS" in result.stdout and "llama-server flags" in result.stdout
    assert "checksums verified" in result.stderr
    again = pull("acme/tiny-llama-GGUF:Q8_0", "--dir", models, *TINY_CARD)
    assert again.returncode == 0 and "already here" in again.stderr and hub.served_bytes() == 0


def test_interrupted_pull_resumes_where_it_stopped(hub: FakeHub, files, tmp_path: Path, models: Path) -> None:  # type: ignore[no-untyped-def]
    key = f"HuggingFaceTB/SmolLM2-GGUF/{SMOLLM2}"
    size = files[SMOLLM2].stat().st_size
    hub.reset_counters()
    hub.stalled.clear()
    hub.release.clear()
    hub.stall_after[key] = 35 * 2**20  # huggingface-hub writes 10 MiB chunks: 30 MiB reach the disk
    argv, env = command(hub, tmp_path / "hf-home", "HuggingFaceTB/SmolLM2-GGUF:Q4_1", "--dir", models)
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert hub.stalled.wait(60), "the download never reached the stall"
        partials = list(models.glob(f"{SMOLLM2}.*.partial"))
        deadline = time.monotonic() + 30
        while not (partials and partials[0].stat().st_size >= 30 * 2**20) and time.monotonic() < deadline:
            time.sleep(0.05)
            partials = list(models.glob(f"{SMOLLM2}.*.partial"))
        first.send_signal(signal.SIGINT)  # Ctrl-C
        _, stderr = first.communicate(timeout=30)
    finally:
        hub.release.set()
        if first.poll() is None:
            first.kill()
    kept = partials[0].stat().st_size
    assert first.returncode == 130 and "run the same command to resume" in stderr and f"{kept:,} of" in stderr
    assert not (models / SMOLLM2).exists()  # nothing under the final name

    hub.reset_counters()
    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert f"resuming {SMOLLM2} at {kept:,}" in second.stderr
    assert sha256(models / SMOLLM2) == sha256(files[SMOLLM2]) and leftovers(models) == []
    assert hub.served_bytes(key) == size - kept  # only the rest was sent again
    assert any(r.range == f"bytes={kept}-" for r in hub.requests)


def test_corrupted_download_is_refused_and_deleted(pull, hub: FakeHub, models: Path) -> None:  # type: ignore[no-untyped-def]
    hub.corrupt.add("acme/tiny-llama-GGUF/tiny-llama-Q4_0.gguf")
    try:
        result = pull("acme/tiny-llama-GGUF:Q4_0", "--dir", models, *TINY_CARD)
    finally:
        hub.corrupt.clear()
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("llamasplit: ") and "checksum mismatch" in result.stderr
    assert not (models / "tiny-llama-Q4_0.gguf").exists() and leftovers(models) == []


def test_split_gguf_pull_fetches_every_part(pull, hub: FakeHub, files, models: Path) -> None:  # type: ignore[no-untyped-def]
    result = pull("acme/tiny-llama-split-GGUF:Q5_0", "--dir", models, *TINY_CARD)
    assert result.returncode == 0, result.stderr
    parts = sorted(n for n in files if "-of-00003" in n)
    assert sorted(p.name for p in models.iterdir()) == parts  # flattened beside each other, nothing else
    for name in parts:
        assert sha256(models / name) == sha256(files[name])
    assert "FITS" in result.stdout


def test_small_files_kept_in_git_are_verified_by_their_git_id(pull, models: Path) -> None:  # type: ignore[no-untyped-def]
    result = pull("acme/git-GGUF:Q4_0", "--dir", models, *TINY_CARD)
    assert result.returncode == 0, result.stderr
    assert (models / "tiny-llama-Q4_0.gguf").is_file()


def test_a_repo_reference_takes_the_largest_quantisation_that_fits(pull, models: Path) -> None:  # type: ignore[no-untyped-def]
    result = pull("acme/tiny-llama-GGUF", "--dir", models, *TINY_CARD)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in models.iterdir()] == ["tiny-llama-Q8_0.gguf"]
    assert "Q8_0 (3.8 MiB) is the largest quantisation that fits with every layer on the GPUs" in result.stderr
    assert "the next larger, F16 (7.0 MiB), does not fit" in result.stderr


def test_a_repo_with_nothing_that_fits_exits_3_naming_the_closest(pull, models: Path) -> None:  # type: ignore[no-untyped-def]
    result = pull("acme/tiny-llama-GGUF", "--dir", models, "--gpus", "600MiB")
    assert result.returncode == 3
    assert "no quantisation of acme/tiny-llama-GGUF fits entirely on the GPUs; the smallest, Q4_0" in result.stderr
    assert not models.exists() or not any(models.iterdir())


def test_offline_pull_plans_the_copy_already_downloaded(pull, hub: FakeHub, models: Path) -> None:  # type: ignore[no-untyped-def]
    assert pull("acme/tiny-llama-GGUF:Q4_0", "--dir", models, *TINY_CARD).returncode == 0
    offline = pull("acme/tiny-llama-GGUF:Q4_0", "--dir", models, *TINY_CARD, HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr
    assert "HF_HUB_OFFLINE" in offline.stderr and "FITS" in offline.stdout and hub.requests == []
    missing = pull("acme/tiny-llama-GGUF:F16", "--dir", models, HF_HUB_OFFLINE="1")
    assert missing.returncode == 2 and "unset HF_HUB_OFFLINE to download" in missing.stderr and hub.requests == []


def test_a_different_file_under_the_name_is_never_overwritten(pull, models: Path) -> None:  # type: ignore[no-untyped-def]
    models.mkdir()
    mine = models / "tiny-llama-Q4_0.gguf"
    mine.write_bytes(b"my own model")
    result = pull("acme/tiny-llama-GGUF:Q4_0", "--dir", models, *TINY_CARD)
    assert result.returncode == 2 and "exists and is not acme/tiny-llama-GGUF/tiny-llama-Q4_0.gguf" in result.stderr
    assert mine.read_bytes() == b"my own model"


def test_gated_repo_needs_the_token_which_is_never_printed(pull, models: Path) -> None:  # type: ignore[no-untyped-def]
    refused = pull("acme/gated-GGUF:Q4_0", "--dir", models, *TINY_CARD)
    assert refused.returncode == 2 and "gated" in refused.stderr and "HF_TOKEN" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    allowed = pull("acme/gated-GGUF:Q4_0", "--dir", models, *TINY_CARD, HF_TOKEN=TOKEN)
    assert allowed.returncode == 0, allowed.stderr
    assert TOKEN not in allowed.stdout + allowed.stderr and (models / "tiny-llama-Q4_0.gguf").is_file()


def test_not_a_hub_reference_is_one_line(pull, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = pull("./models/x.gguf", "--dir", tmp_path)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "not a Hub reference" in result.stderr
