"""Shared fixtures: the real PyPI models, generated GGUFs of every family, and a bed of local RPC devices."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kit import synth
from tests.kit.models import gemma3_path, smollm2_path

# Generated models the tuner is tested on: (key, shape, weight type, sparse). Tiny ones load in llama.cpp;
# the 8B and 70B shapes are sparse files only the tuner reads.
SYNTH_MODELS = {
    "tiny-llama-q4_0": (synth.TINY_LLAMA, "Q4_0", False),
    "tiny-qwen2-q8_0": (synth.TINY_QWEN2, "Q8_0", False),
    "tiny-gemma3-q4_k_m": (synth.TINY_GEMMA3, "Q4_K_M", False),
    "tiny-moe-q5_k_m": (synth.TINY_MOE, "Q5_K_M", False),
    "tiny-moe-q8_0": (synth.TINY_MOE, "Q8_0", False),
    "tiny-openelm-q4_0": (synth.TINY_OPENELM, "Q4_0", False),
    "llama-8b-q4_0": (synth.LLAMA_8B, "Q4_0", True),
    "llama-70b-q4_k_m": (synth.LLAMA_70B, "Q4_K_M", True),
}


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return smollm2_path()


@pytest.fixture(scope="session")
def gemma3() -> Path:
    return gemma3_path()


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synth")


@pytest.fixture(scope="session")
def synth_model(synth_dir: Path):  # type: ignore[no-untyped-def]
    """A function key -> path that writes each generated model once per session."""
    written: dict[str, Path] = {}

    def get(key: str) -> Path:
        if key not in written:
            shape, weight_type, sparse = SYNTH_MODELS[key]
            written[key] = synth.write_gguf(synth_dir / f"{key}.gguf", shape, weight_type, sparse=sparse)
        return written[key]

    return get


@pytest.fixture(scope="session")
def rpc_endpoints() -> Iterator[list[str]]:
    """Three llama.cpp RPC servers on loopback, each serving this machine's CPU as one device."""
    from tests.kit.rpcbed import rpc_servers

    with rpc_servers(3) as endpoints:
        yield endpoints


@pytest.fixture
def alien_gguf(tmp_path: Path) -> Path:
    """A well-formed GGUF of an architecture llama.cpp does not know ("alien9000")."""
    import gguf

    path = tmp_path / "alien.gguf"
    writer = gguf.GGUFWriter(str(path), "alien9000")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
