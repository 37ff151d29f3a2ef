"""`tune-split` on Hugging Face Hub references: header-only planning by range requests, and the repo listing.

A real `tune-split` process talks to a fake Hub on loopback (tests/kit/hub.py) through huggingface-hub, with
HF_ENDPOINT pointed at it; the Hub serves real GGUFs (SmolLM2, generated tiny models, a sparse 70B shape).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.kit import synth
from tests.kit.hub import FakeHub, fake_hub, hub_env
from tuner.errors import HubError
from tuner.hubref import HubReference, RemoteFile, group_models, parse_reference, quant_tag

TOKEN = "hf_TestTokenNeverPrinted0123456789"
TINY_QUANTS = ("Q4_0", "Q8_0", "F16")
# A simulated card with 545 MiB and no reserve: after llama.cpp's ~529 MiB fixed overhead, the tiny Q4_0 and
# Q8_0 fit at their whole 2048-token training context and F16 only at 1024 (see the listing test).
TINY_CARD = ("--gpus", "545MiB", "--reserve", "0")


@pytest.fixture(scope="module")
def files(
    tmp_path_factory: pytest.TempPathFactory, synth_model: Callable[[str], Path], smollm2: Path, gemma3: Path
) -> dict[str, Path]:
    """Local files the fake Hub serves, by name; planning them is what a download would plan."""
    folder = tmp_path_factory.mktemp("hub-files")
    found = {f"tiny-llama-{q}.gguf": synth.write_gguf(folder / f"tiny-llama-{q}.gguf", synth.TINY_LLAMA, q)
             for q in TINY_QUANTS}  # fmt: skip
    split_dir = folder / "split"
    for part in synth.write_split_gguf(split_dir, synth.TINY_LLAMA, "Q5_0", n_splits=3):
        found[part.name] = part
    found["llama-70b-Q4_K_M.gguf"] = synth_model("llama-70b-q4_k_m")
    found["llama-8b-Q4_0.gguf"] = synth_model("llama-8b-q4_0")
    found["SmolLM2-135M-Instruct.Q4_1.gguf"] = smollm2
    found["gemma-3-270m-Q4_K_M.gguf"] = gemma3
    readme = folder / "README.md"
    readme.write_text("# tiny llama\n")
    found["README.md"] = readme
    return found


@pytest.fixture(scope="module")
def hub(files: dict[str, Path]) -> Iterator[FakeHub]:
    with fake_hub() as hub:
        tiny = {name: files[name] for name in (f"tiny-llama-{q}.gguf" for q in TINY_QUANTS)}
        hub.add_repo("acme/tiny-llama-GGUF", {**tiny, "README.md": files["README.md"],
                                              "mmproj-tiny-llama-F16.gguf": files["tiny-llama-F16.gguf"]})  # fmt: skip
        parts = sorted(name for name in files if "-of-00003" in name)
        hub.add_repo("acme/tiny-llama-split-GGUF", {f"Q5_0/{name}": files[name] for name in parts})
        hub.add_repo("meta/llama-GGUF", {n: files[n] for n in ("llama-70b-Q4_K_M.gguf", "llama-8b-Q4_0.gguf")})
        hub.add_repo("HuggingFaceTB/SmolLM2-GGUF", {"SmolLM2-135M-Instruct.Q4_1.gguf": files[
            "SmolLM2-135M-Instruct.Q4_1.gguf"]})  # fmt: skip
        hub.add_repo("google/gemma-3-270m-GGUF", {"gemma-3-270m-Q4_K_M.gguf": files["gemma-3-270m-Q4_K_M.gguf"]})
        hub.add_repo("acme/gated-GGUF", {"tiny-llama-Q4_0.gguf": files["tiny-llama-Q4_0.gguf"]}, gated=True,
                     token=TOKEN)  # fmt: skip
        hub.add_repo("acme/private-GGUF", {"tiny-llama-Q4_0.gguf": files["tiny-llama-Q4_0.gguf"]}, token=TOKEN)
        yield hub


@pytest.fixture
def run(hub: FakeHub, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run `tune-split ARGS` against the fake Hub (keyword arguments become environment variables)."""

    def tune_split(*args: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
        hub.reset_counters()
        return subprocess.run(
            [sys.executable, "-m", "tuner.cli", *map(str, args)], capture_output=True, text=True, timeout=120,
            env=hub_env(hub, tmp_path / "hf-home", **env),
        )  # fmt: skip

    return tune_split


def local_plan(path: Path, *args: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", "tuner.cli", str(path), *args, "--format", "json"], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode in (0, 3), result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def same_plan(remote: dict[str, object], local: dict[str, object]) -> None:
    """Equal in everything but where the model came from."""
    assert str(remote.pop("model_path")).startswith("hf://")
    local.pop("model_path")
    assert remote == local


# References and file names (no network) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bartowski/Llama-3.3-70B-GGUF:Q4_K_M", HubReference("bartowski/Llama-3.3-70B-GGUF", tag="Q4_K_M")),
        ("owner/repo", HubReference("owner/repo")),
        ("owner/repo@v1.0:q8_0", HubReference("owner/repo", "v1.0", tag="q8_0")),
        ("owner/repo/Q4_K_M/m-Q4_K_M-00002-of-00003.gguf",
         HubReference("owner/repo", filename="Q4_K_M/m-Q4_K_M-00002-of-00003.gguf")),
        ("hf://owner/repo/m.gguf", HubReference("owner/repo", filename="m.gguf")),
        ("https://huggingface.co/owner/repo/resolve/main/sub/m.gguf",
         HubReference("owner/repo", "main", filename="sub/m.gguf")),
        ("https://huggingface.co/owner/repo/blob/abc123/m.gguf?download=true",
         HubReference("owner/repo", "abc123", filename="m.gguf")),
        ("models/model.gguf", None),
        ("./owner/repo", None),
        ("/abs/owner/repo:Q4_K_M", None),
    ],
    ids=["tag", "repo", "revision", "split-part", "hf-uri", "resolve-url", "blob-url", "relative-file", "dot",
         "absolute"],
)  # fmt: skip
def test_references_parse_like_llama_cpp_and_the_hub_write_them(text: str, expected: HubReference | None) -> None:
    assert parse_reference(text) == expected


def test_a_url_elsewhere_is_refused() -> None:
    with pytest.raises(HubError, match="not a Hugging Face Hub URL"):
        parse_reference("https://example.com/owner/repo/resolve/main/m.gguf")
    assert parse_reference("http://127.0.0.1:9/owner/repo/resolve/main/m.gguf", "http://127.0.0.1:9") == (
        HubReference("owner/repo", "main", filename="m.gguf")
    )


@pytest.mark.parametrize(
    ("name", "tag"),
    [
        ("Llama-3.3-70B-Instruct-Q4_K_M-00001-of-00002.gguf", "Q4_K_M"),
        ("Q8_0/Llama-3.3-70B-Instruct-Q8_0-00002-of-00002.gguf", "Q8_0"),
        ("qwen2.5-7b-instruct-q5_k_m.gguf", "Q5_K_M"),
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"),
        ("gemma-3-27b-it-UD-Q4_K_XL.gguf", "UD-Q4_K_XL"),
        ("Qwen3-8B-IQ4_XS.gguf", "IQ4_XS"),
        ("model-f16.gguf", "F16"),
        ("Qwen3-8B-BF16.gguf", "BF16"),
        ("gpt-oss-20b-MXFP4.gguf", "MXFP4"),
        ("Qwen2.5-7B.gguf", None),
    ],
)
def test_quantisation_tags_come_from_file_names(name: str, tag: str | None) -> None:
    assert quant_tag(name) == tag


def test_repo_files_group_into_models_with_split_parts_together() -> None:
    files = [
        RemoteFile("README.md", 10),
        RemoteFile("m-Q8_0.gguf", 800),
        RemoteFile("mmproj-m-F16.gguf", 50),
        RemoteFile("Q4_K_M/m-Q4_K_M-00002-of-00002.gguf", 200),
        RemoteFile("Q4_K_M/m-Q4_K_M-00001-of-00002.gguf", 300),
        RemoteFile("F16/m-F16-00001-of-00003.gguf", 600),
    ]
    models = group_models(files)
    assert [(m.tag, [f.path for f in m.files], m.complete) for m in models] == [
        ("Q4_K_M", ["Q4_K_M/m-Q4_K_M-00001-of-00002.gguf", "Q4_K_M/m-Q4_K_M-00002-of-00002.gguf"], True),
        ("F16", ["F16/m-F16-00001-of-00003.gguf"], False),
        ("Q8_0", ["m-Q8_0.gguf"], True),
    ]


# Header-only planning ---------------------------------------------------------------------------------------


def test_header_only_plan_of_a_70b_fetches_a_few_mib_and_matches_the_file(run, hub: FakeHub, files) -> None:  # type: ignore[no-untyped-def]
    gpus = ("--gpus", "RTX 4090,RTX 4080", "--ctx", "8192")
    result = run("meta/llama-GGUF:Q4_K_M", *gpus, "--format", "json")
    assert result.returncode == 0, result.stderr
    source = files["llama-70b-Q4_K_M.gguf"]
    served = hub.served_bytes("meta/llama-GGUF/llama-70b-Q4_K_M.gguf")
    assert 0 < served <= 8 * 2**20 and served / source.stat().st_size < 0.0002  # ~40 GB file
    assert f"{served / 2**20:.2f} MiB fetched" in result.stderr
    same_plan(json.loads(result.stdout), local_plan(source, *gpus))
    ranged = [r for r in hub.requests if r.path.startswith("/cdn/")]
    assert ranged and all(r.range and r.range.startswith("bytes=") for r in ranged)


@pytest.mark.parametrize(
    ("repo", "name", "spelling", "header_mib"),
    [
        ("HuggingFaceTB/SmolLM2-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf", "/{name}", 1.7),
        ("google/gemma-3-270m-GGUF", "gemma-3-270m-Q4_K_M.gguf", ":Q4_K_M", 6.2),
    ],
    ids=["smollm2-by-file", "gemma3-by-quant"],
)
def test_real_model_header_costs_less_than_twice_its_size(  # type: ignore[no-untyped-def]
    run, hub: FakeHub, files, repo: str, name: str, spelling: str, header_mib: float
) -> None:
    result = run(repo + spelling.format(name=name), "--format", "json")
    assert result.returncode == 0, result.stderr
    served = hub.served_bytes(f"{repo}/{name}")
    assert header_mib * 2**20 < served < 2 * header_mib * 2**20  # of 94 MiB and 241 MiB files
    same_plan(json.loads(result.stdout), local_plan(files[name]))


def test_resolve_url_on_the_endpoint_is_planned(run, hub: FakeHub) -> None:  # type: ignore[no-untyped-def]
    url = f"{hub.url}/acme/tiny-llama-GGUF/resolve/main/tiny-llama-Q8_0.gguf"
    result = run(url, *TINY_CARD)
    assert result.returncode == 0, result.stderr
    assert "FITS" in result.stdout and "fetched" in result.stderr


def test_split_gguf_reads_every_parts_header(run, hub: FakeHub, files) -> None:  # type: ignore[no-untyped-def]
    result = run("acme/tiny-llama-split-GGUF:q5_0", *TINY_CARD, "--format", "json")
    assert result.returncode == 0, result.stderr
    parts = sorted(name for name in files if "-of-00003" in name)
    for name in parts:
        # every part's header is read; these parts are below the first request's 1 MiB, so they come whole
        assert 0 < hub.served_bytes(f"acme/tiny-llama-split-GGUF/Q5_0/{name}") <= min(files[name].stat().st_size, 2**20)
    plan = json.loads(result.stdout)
    assert plan["model_path"] == f"hf://acme/tiny-llama-split-GGUF/Q5_0/{parts[0]}"
    same_plan(plan, local_plan(files[parts[1]], *TINY_CARD))  # any part names the model locally


# The listing: which quantisation to download ----------------------------------------------------------------


def test_listing_verdicts_agree_with_planning_each_file(run, hub: FakeHub, files) -> None:  # type: ignore[no-untyped-def]
    result = run("acme/tiny-llama-GGUF", *TINY_CARD, "--format", "json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    rows = {row["quant"]: row for row in listing["models"]}
    assert list(rows) == ["Q4_0", "Q8_0", "F16"]  # smallest first; README and the projector left out
    for quant, row in rows.items():
        local = local_plan(files[f"tiny-llama-{quant}.gguf"], *TINY_CARD, "--max-ctx")
        same_plan(row["plan"], local)
        assert row["fits"] == local["fits"] and row["on_devices"] == (local["n_gpu_layers"] == local["n_layer"] + 1)
    assert [rows[q]["plan"]["n_ctx"] for q in TINY_QUANTS] == [2048, 2048, 1024]
    assert listing["bytes_fetched"] == hub.served_bytes()


def test_listing_table_shows_fit_context_layers_and_speed(run, hub: FakeHub) -> None:  # type: ignore[no-untyped-def]
    result = run("meta/llama-GGUF", "--gpus", "RTX 4090,RTX 4080")
    assert result.returncode == 0, result.stderr
    lines = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 5}
    assert "yes" in lines["Q4_0"] and "33/33" in lines["Q4_0"]  # the 8B: every layer on the cards
    assert "partly" in lines["Q4_K_M"] and "/81" in lines["Q4_K_M"]  # the 70B: some layers on the CPU
    assert "2 headers" in result.stderr and "llamasplit pull meta/llama-GGUF:QUANT" in result.stderr
    assert hub.served_bytes() < 16 * 2**20


# Tokens, gated and private repos, offline ---------------------------------------------------------------------


def test_gated_repo_without_access_says_what_to_do(run) -> None:  # type: ignore[no-untyped-def]
    result = run("acme/gated-GGUF:Q4_0")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "gated" in result.stderr and "HF_TOKEN" in result.stderr
    wrong = run("acme/gated-GGUF:Q4_0", HF_TOKEN="hf_SomeoneElsesToken")
    assert wrong.returncode == 2 and "gated" in wrong.stderr and "hf_SomeoneElsesToken" not in wrong.stderr


def test_token_opens_gated_and_private_repos_and_never_leaves_the_hub(run, hub: FakeHub) -> None:  # type: ignore[no-untyped-def]
    for repo in ("acme/gated-GGUF", "acme/private-GGUF"):
        result = run(f"{repo}:Q4_0", *TINY_CARD, HF_TOKEN=TOKEN)
        assert result.returncode == 0, result.stderr
        assert TOKEN not in result.stdout + result.stderr
        assert all(r.authorized for r in hub.requests if r.path.startswith(f"/{repo}/"))
        cdn = [r for r in hub.requests if r.path.startswith("/cdn/")]
        assert cdn and not any(r.authorized for r in cdn)  # the CDN is another origin: no token there


def test_private_repo_without_token_is_not_found(run) -> None:  # type: ignore[no-untyped-def]
    result = run("acme/private-GGUF:Q4_0")
    assert result.returncode == 2 and "no repo acme/private-GGUF to this client" in result.stderr
    assert "HF_TOKEN" in result.stderr


def test_offline_mode_is_honoured(run, hub: FakeHub) -> None:  # type: ignore[no-untyped-def]
    result = run("acme/tiny-llama-GGUF:Q4_0", HF_HUB_OFFLINE="1")
    assert result.returncode == 2 and "HF_HUB_OFFLINE" in result.stderr
    assert hub.requests == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["acme/tiny-llama-GGUF:Q6_K"], "has no Q6_K GGUF; it has Q4_0, Q8_0, F16"),
        (["acme/tiny-llama-GGUF/nope.gguf"], "has no GGUF file nope.gguf"),
        (["acme/nothing-here:Q4_0"], "no repo acme/nothing-here"),
        (["acme/tiny-llama-GGUF@v9:Q4_0"], "has no revision 'v9'"),
        (["acme/tiny-llama-GGUF:Q4_0", "--measure"], "download it first"),
        (["acme/tiny-llama-GGUF", "--format", "flags"], "needs one model"),
    ],
    ids=["unknown-quant", "unknown-file", "unknown-repo", "unknown-revision", "measure", "listing-flags"],
)
def test_bad_hub_references_get_one_line_and_exit_2(run, args: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    result = run(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tune-split: ") and message in lines[0], result.stderr


def test_unreachable_hub_is_one_line(tmp_path: Path) -> None:
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path), "HF_HUB_ETAG_TIMEOUT": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "tuner.cli", "acme/tiny-llama-GGUF:Q4_0"], capture_output=True, text=True,
        timeout=120, env={**hub_env_without_hub(), **env},
    )  # fmt: skip
    assert result.returncode == 2 and "cannot reach the Hub at http://127.0.0.1:9" in result.stderr, result.stderr


def hub_env_without_hub() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("HF_")}


def test_a_local_file_never_loads_huggingface_hub(smollm2: Path, tmp_path: Path) -> None:
    (tmp_path / "owner").mkdir()
    shutil.copy(smollm2, tmp_path / "owner" / "repo")  # spelled like a Hub repo, but a file here wins
    code = (
        "import sys, contextlib, io; from tuner.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()): assert main(['owner/repo', '--format', 'json']) == 0\n"
        "print('huggingface_hub' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.stdout.strip() == "False", result.stderr


def test_the_token_hf_auth_login_stored_is_used(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "hf-home"  # the run fixture's HF_HOME, where `hf auth login` keeps the token
    home.mkdir(exist_ok=True)
    (home / "token").write_text(TOKEN)
    result = run("acme/gated-GGUF:Q4_0", *TINY_CARD)
    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stdout + result.stderr


def test_listing_where_nothing_fits_exits_3(run) -> None:  # type: ignore[no-untyped-def]
    result = run("acme/tiny-llama-GGUF", "--gpus", "540MiB", "--reserve", "0", "--ctx", "2048", "--format", "json")
    assert result.returncode == 3, result.stderr
    assert [row["verdict"] for row in json.loads(result.stdout)["models"]] == ["no", "no", "no"]
