"""The lazy GGUF reader: same answers as gguf-py's GGUFReader, clear errors on bad files, split models."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGUFReader

from tests.kit import synth
from tuner.errors import GGUFError
from tuner.gguf import read_header, read_model, read_split_model, split_paths


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_reader_matches_gguf_py_on_real_models(which: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(which)
    model = read_model(path)
    reference = GGUFReader(path)
    assert [t.name for t in model.tensors] == [t.name for t in reference.tensors]
    for ours, theirs in zip(model.tensors, reference.tensors, strict=True):
        assert ours.n_bytes == int(theirs.n_bytes), ours.name
        assert ours.offset == int(theirs.data_offset), ours.name
        assert ours.ggml_type == int(theirs.tensor_type), ours.name
    arch = model.architecture
    field = reference.fields[f"{arch}.block_count"]
    assert model.n_layer == int(field.parts[field.data[0]][0])


def test_smollm2_hyperparameters(smollm2: Path) -> None:
    model = read_model(smollm2)
    assert (model.architecture, model.n_layer, model.n_embd, model.n_vocab) == ("llama", 30, 576, 49152)
    assert (model.n_head[0], model.n_head_kv[0], model.n_embd_head_k, model.n_ff[0]) == (9, 3, 64, 1536)
    assert model.chat_template and "im_start" in model.chat_template
    assert not any(model.swa_layers)


def test_gemma3_sliding_window_layers(gemma3: Path) -> None:
    model = read_model(gemma3)
    assert model.n_swa == 512
    # llama.cpp's gemma3 pattern: every sixth layer (5, 11, 17) attends globally.
    assert [il for il, swa in enumerate(model.swa_layers) if not swa] == [5, 11, 17]
    assert model.n_vocab == 262144 and model.chat_template is None


def test_moe_expert_counts(synth_model) -> None:  # type: ignore[no-untyped-def]
    model = read_model(synth_model("tiny-moe-q5_k_m"))
    assert (model.n_expert, model.n_expert_used, model.n_ff_exp) == (4, 2, 256)


def test_sparse_70b_header_reads_without_touching_data(synth_model) -> None:  # type: ignore[no-untyped-def]
    path = synth_model("llama-70b-q4_k_m")
    model = read_model(path)
    assert model.n_layer == 80 and model.n_embd == 8192 and model.n_vocab == 128256
    assert model.file_bytes > 39 * 1024**3  # ~40 GB of weights, all sparse
    assert Path(path).stat().st_blocks * 512 < 64 * 1024**2


def test_split_model_reads_as_one(tmp_path: Path) -> None:
    parts = synth.write_split_gguf(tmp_path, synth.TINY_LLAMA, "Q4_0", n_splits=3)
    whole = synth.write_gguf(tmp_path / "whole.gguf", synth.TINY_LLAMA, "Q4_0")
    assert split_paths(parts[1]) == [str(p) for p in parts]
    split_model = read_model(parts[0])
    assert len(split_model.paths) == 3
    assert {t.name for t in split_model.tensors} == {t.name for t in read_model(whole).tensors}
    assert split_model.file_bytes == read_model(whole).file_bytes


def test_split_model_with_missing_part_names_it(tmp_path: Path) -> None:
    parts = synth.write_split_gguf(tmp_path, synth.TINY_LLAMA, "Q4_0", n_splits=2)
    parts[1].unlink()
    with pytest.raises(GGUFError, match="missing part 2 of 2"):
        read_model(parts[0])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="no such file"):
        read_model(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_model(path)


@pytest.mark.parametrize("keep_bytes", [10, 200, 5000])
def test_truncated_header(smollm2: Path, tmp_path: Path, keep_bytes: int) -> None:
    path = tmp_path / "cut.gguf"
    path.write_bytes(smollm2.read_bytes()[:keep_bytes])
    with pytest.raises(GGUFError, match="truncated"):
        read_model(path)


def test_unknown_architecture(alien_gguf: Path) -> None:
    with pytest.raises(GGUFError, match="unknown architecture 'alien9000'"):
        read_model(alien_gguf)


def test_directory_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="is a directory"):
        read_model(tmp_path)


@pytest.mark.parametrize("step", [1, 4096, 1 << 20], ids=["byte-by-byte", "4KiB", "1MiB"])
def test_growing_source_reads_what_the_file_reads_and_no_further(step: int, gemma3: Path) -> None:
    """A remote file's prefix arrives on demand: same model as the local read, and only the header is asked for."""
    data = memoryview(gemma3.read_bytes())  # slices without copying: the byte-by-byte case asks ~10^6 times
    asked: list[int] = []

    def grow(n_bytes: int) -> bytes:
        asked.append(n_bytes)
        return data[: -(-n_bytes // step) * step]  # type: ignore[return-value]

    header = read_header(grow, str(gemma3))
    local = read_model(gemma3)
    assert read_split_model([str(gemma3)], lambda _path, _index: header) == local
    data_start = min(t.offset for t in local.tensors)
    assert max(asked) <= data_start  # never past the tensor table
    if step == 1:
        assert max(asked) > data_start - 64  # the whole table was needed (alignment padding is the slack)


def test_growing_source_that_ends_early_is_a_truncated_header(smollm2: Path) -> None:
    data = smollm2.read_bytes()[:300_000]
    with pytest.raises(GGUFError, match=r"truncated GGUF header .* file has 300,000"):
        read_header(lambda n_bytes: data[:n_bytes], "remote.gguf")
