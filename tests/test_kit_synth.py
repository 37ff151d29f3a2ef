"""The synthetic-model kit (tests/kit/synth.py) writes GGUFs that llama.cpp loads as the shapes they claim.

llama.cpp runs in a child process per model, so that a crash in native code (an abort, an illegal
instruction) fails one test with its signal instead of killing the whole pytest run.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest

from tests.kit.models import gemma3_path, smollm2_path
from tests.kit.synth import (
    GEMMA3_270M,
    LLAMA_8B,
    LLAMA_70B,
    SMOLLM2_135M,
    TINY_GEMMA3,
    TINY_LLAMA,
    TINY_MOE,
    TINY_PRESETS,
    TINY_QWEN2,
    WEIGHT_TYPES,
    ModelShape,
    TensorSpec,
    plan_tensors,
    write_gguf,
    write_split_gguf,
)

# Loads the model on the CPU, evaluates a short prompt, generates two tokens and reports what llama.cpp saw.
_CHILD = r"""
import ctypes, json, re, sys
import numpy as np
import llama_cpp
from llama_cpp import Llama

logs = []

@llama_cpp.llama_log_callback
def _capture(level, text, user_data):
    logs.append(text.decode("utf-8", "replace"))

llama_cpp.llama_log_set(_capture, ctypes.c_void_p(0))
llm = Llama(sys.argv[1], n_gpu_layers=0, n_ctx=128, n_batch=32, n_threads=2, vocab_only=False, verbose=False)
model = llm.model
tokens = llm.tokenize(b"the cat sat on the mat", add_bos=True)
llm.eval(tokens)
# without logits_all, Llama.eval does not copy logits into llm.scores: read the last row from the context
logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
completion = llm.create_completion("hello", max_tokens=2, temperature=0.0)
text = "".join(logs)
desc = ctypes.create_string_buffer(256)
llama_cpp.llama_model_desc(model, desc, len(desc))
print(json.dumps({
    "finite": bool(np.isfinite(logits).all()),
    "logit_std": float(np.std(logits)),
    "completion_tokens": completion["usage"]["completion_tokens"],
    "n_layer": llama_cpp.llama_model_n_layer(model),
    "n_embd": llama_cpp.llama_model_n_embd(model),
    "n_head": llama_cpp.llama_model_n_head(model),
    "n_head_kv": llama_cpp.llama_model_n_head_kv(model),
    "n_swa": llama_cpp.llama_model_n_swa(model),
    "n_ctx_train": llama_cpp.llama_model_n_ctx_train(model),
    "n_vocab": llm.n_vocab(),
    "model_size": llama_cpp.llama_model_size(model),
    "is_swa": [int(m) for m in re.findall(r"layer +\d+ assigned to device \S+, is_swa = (\d)", text)],
    "desc": desc.value.decode(),
}))
"""


def _llama_cpp_report(path: Path) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        how = (f"died with {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
               else f"exited with {proc.returncode}")
        pytest.fail(f"llama.cpp {how} loading {path.name}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class _GGUFInitParams(ctypes.Structure):
    _fields_ = (("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p))


@dataclass(frozen=True)
class _GGMLView:
    """A GGUF header as llama.cpp's own parser (ggml's gguf.c) reads it."""

    data_offset: int
    tensors: list[tuple[str, int, tuple[int, ...], int, int]]  # name, ggml type, ne (4 dims), bytes, offset
    keys: dict[str, int]  # the split.* integers


@functools.cache
def _ggml_base() -> ctypes.CDLL:
    spec = importlib.util.find_spec("llama_cpp")
    assert spec is not None and spec.submodule_search_locations
    lib = ctypes.CDLL(str(Path(next(iter(spec.submodule_search_locations))) / "lib" / "libggml-base.so"))
    lib.gguf_init_from_file.argtypes = (ctypes.c_char_p, _GGUFInitParams)
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_free.argtypes = (ctypes.c_void_p,)
    for name, restype in (("gguf_get_tensor_name", ctypes.c_char_p), ("gguf_get_tensor_type", ctypes.c_int),
                          ("gguf_get_tensor_ne", ctypes.POINTER(ctypes.c_int64)),
                          ("gguf_get_tensor_size", ctypes.c_size_t), ("gguf_get_tensor_offset", ctypes.c_size_t),
                          ("gguf_get_val_u16", ctypes.c_uint16), ("gguf_get_val_i32", ctypes.c_int32)):
        getattr(lib, name).argtypes = (ctypes.c_void_p, ctypes.c_int64)
        getattr(lib, name).restype = restype
    for name in ("gguf_get_n_tensors", "gguf_get_data_offset"):
        getattr(lib, name).argtypes = (ctypes.c_void_p,)
        getattr(lib, name).restype = ctypes.c_int64
    lib.gguf_find_key.argtypes = (ctypes.c_void_p, ctypes.c_char_p)
    lib.gguf_find_key.restype = ctypes.c_int64
    return lib


def _read_with_ggml(path: Path) -> _GGMLView:
    # gguf-py's GGUFReader takes seconds on a 128k-262k token vocabulary; ggml's parser takes milliseconds
    lib = _ggml_base()
    ctx = lib.gguf_init_from_file(str(path).encode(), _GGUFInitParams(True, None))
    assert ctx, f"ggml could not parse {path}"
    try:
        tensors = [
            (lib.gguf_get_tensor_name(ctx, i).decode(), lib.gguf_get_tensor_type(ctx, i),
             tuple(lib.gguf_get_tensor_ne(ctx, i)[:4]), lib.gguf_get_tensor_size(ctx, i),
             lib.gguf_get_tensor_offset(ctx, i))
            for i in range(lib.gguf_get_n_tensors(ctx))
        ]
        keys = {}
        for key, getter in (("split.no", lib.gguf_get_val_u16), ("split.count", lib.gguf_get_val_u16),
                            ("split.tensors.count", lib.gguf_get_val_i32)):
            key_id = lib.gguf_find_key(ctx, key.encode())
            if key_id >= 0:
                keys[key] = getter(ctx, key_id)
        return _GGMLView(lib.gguf_get_data_offset(ctx), tensors, keys)
    finally:
        lib.gguf_free(ctx)


def _ne4(ne: tuple[int, ...]) -> tuple[int, ...]:
    return ne + (1,) * (4 - len(ne))


def _planned_bytes(specs: list[TensorSpec]) -> int:
    return sum(spec.n_bytes for spec in specs)


# Every weight type on llama; the commonest three on the other architectures (each case costs ~0.4 s).
_LOAD_CASES = [(TINY_LLAMA, wt) for wt in WEIGHT_TYPES] + [
    (shape, wt) for shape in (TINY_QWEN2, TINY_GEMMA3, TINY_MOE) for wt in ("Q4_0", "Q4_K_M", "F16")
] + [(TINY_GEMMA3.replace(swa_pattern=3, name="tiny-gemma3-swa3"), "Q8_0")]


@pytest.mark.llama
@pytest.mark.parametrize(("shape", "weight_type"), _LOAD_CASES, ids=[f"{s.name}-{w}" for s, w in _LOAD_CASES])
def test_tiny_model_loads_and_generates_in_llama_cpp(tmp_path: Path, shape: ModelShape, weight_type: str) -> None:
    path = write_gguf(tmp_path / f"{shape.name}-{weight_type}.gguf", shape, weight_type)

    report = _llama_cpp_report(path)

    assert report["finite"], "logits contain NaN or inf"
    assert report["logit_std"] > 0, "all logits equal: the weights did not reach the output"
    assert report["completion_tokens"] >= 1
    assert report["model_size"] == _planned_bytes(plan_tensors(shape, weight_type))
    expected = {"n_layer": shape.n_layer, "n_embd": shape.n_embd, "n_head": shape.n_head,
                "n_head_kv": shape.n_head_kv, "n_ctx_train": shape.n_ctx_train, "n_vocab": shape.n_vocab,
                "n_swa": shape.sliding_window}
    assert {key: report[key] for key in expected} == expected
    # llama.cpp logs one line per block plus one for the output layer (index n_layer, never SWA)
    assert report["is_swa"] == [int(flag) for flag in shape.swa_layers()] + [0]


def test_gemma3_swa_layers_follow_llama_cpp_default_pattern() -> None:
    # llama.cpp's gemma3 default: five sliding-window layers, then a global one
    assert GEMMA3_270M.swa_layers() == tuple(il % 6 != 5 for il in range(18))
    assert TINY_GEMMA3.replace(swa_pattern=3).swa_layers() == (True, True, False, True, True, False)
    assert not any(TINY_LLAMA.swa_layers())


@pytest.mark.llama
def test_split_model_loads_in_llama_cpp_as_one_model(tmp_path: Path) -> None:
    paths = write_split_gguf(tmp_path, TINY_LLAMA, "Q8_0", n_splits=3)

    assert [p.name for p in paths] == [f"tiny-llama-Q8_0-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    specs = plan_tensors(TINY_LLAMA, "Q8_0")
    seen: list[str] = []
    for index, path in enumerate(paths):
        view = _read_with_ggml(path)
        assert view.keys == {"split.no": index, "split.count": 3, "split.tensors.count": len(specs)}
        assert view.tensors, f"{path.name} holds no tensor"
        seen += [name for name, *_ in view.tensors]
    assert seen == [spec.name for spec in specs]

    report = _llama_cpp_report(paths[0])

    assert report["finite"]
    assert report["model_size"] == _planned_bytes(specs)
    assert report["n_layer"] == TINY_LLAMA.n_layer


@pytest.mark.parametrize("shape", [LLAMA_8B, LLAMA_70B], ids=lambda s: s.name)
def test_sparse_giant_has_full_apparent_size_and_tiny_footprint(tmp_path: Path, shape: ModelShape) -> None:
    path = write_gguf(tmp_path / f"{shape.name}.gguf", shape, "Q4_K_M", sparse=True)

    specs = plan_tensors(shape, "Q4_K_M")
    view = _read_with_ggml(path)
    padded = sum(gguf.GGUFWriter.ggml_pad(spec.n_bytes, 32) for spec in specs)
    stat = os.stat(path)
    assert stat.st_size == view.data_offset + padded
    assert stat.st_blocks * 512 < 8 * 2**20, "the data region should be a hole, not allocated blocks"
    assert [(name, ggml_type, ne, size) for name, ggml_type, ne, size, _ in view.tensors] == [
        (spec.name, int(spec.ggml_type), _ne4(spec.ne), spec.n_bytes) for spec in specs
    ]
    _, _, _, last_bytes, last_offset = view.tensors[-1]
    assert view.data_offset + last_offset + last_bytes <= stat.st_size


def test_split_sparse_giant_spreads_bytes_evenly(tmp_path: Path) -> None:
    paths = write_split_gguf(tmp_path, LLAMA_70B, "Q4_K_M", n_splits=4, sparse=True)

    sizes = [os.stat(p).st_size for p in paths]
    assert len(paths) == 4
    assert max(sizes) < 1.1 * min(sizes)
    assert sum(os.stat(p).st_blocks * 512 for p in paths) < 8 * 2**20


# Sizes of the public Q4_K_M uploads (bartowski's Meta-Llama-3.1-8B/70B-Instruct-GGUF list 4.92 GB and
# 42.5 GB): the mix of Q4_K/Q6_K must land within 1 % of llama-quantize's.
@pytest.mark.parametrize(("shape", "published_bytes"), [(LLAMA_8B, 4.92e9), (LLAMA_70B, 42.5e9)],
                         ids=["8b", "70b"])
def test_q4_k_m_mix_matches_published_llama_sizes(shape: ModelShape, published_bytes: float) -> None:
    assert _planned_bytes(plan_tensors(shape, "Q4_K_M")) == pytest.approx(published_bytes, rel=0.01)


@pytest.mark.parametrize(("shape", "weight_type", "locate"),
                         [(SMOLLM2_135M, "Q4_1", smollm2_path), (GEMMA3_270M, "Q4_K_M", gemma3_path)],
                         ids=["smollm2-Q4_1", "gemma3-Q4_K_M"])
def test_quant_mix_reproduces_real_model_tensor_types(shape: ModelShape, weight_type: str, locate) -> None:
    real = {name: (ggml_type, ne, size) for name, ggml_type, ne, size, _ in _read_with_ggml(locate()).tensors}

    planned = {s.name: (int(s.ggml_type), _ne4(s.ne), s.n_bytes) for s in plan_tensors(shape, weight_type)}

    assert planned == real


def test_random_k_quant_blocks_dequantize_to_small_finite_weights(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "kq.gguf", TINY_LLAMA, "Q4_K_M")

    by_type: dict[str, np.ndarray] = {}
    for tensor in gguf.GGUFReader(path).tensors:
        if tensor.tensor_type.name in ("Q4_K", "Q5_K", "Q6_K", "Q4_0"):
            by_type.setdefault(tensor.tensor_type.name, gguf.dequantize(tensor.data, tensor.tensor_type))
    assert set(by_type) == {"Q4_K", "Q6_K"}
    for name, values in by_type.items():
        assert np.isfinite(values).all(), name
        assert 0.005 < float(values.std()) < 0.08, f"{name} std {values.std():.4f}"
        assert abs(float(values.mean())) < 0.01, f"{name} mean {values.mean():.4f}"


def test_tiny_presets_stay_small(tmp_path: Path) -> None:
    for shape in TINY_PRESETS:
        path = write_gguf(tmp_path / f"{shape.name}.gguf", shape, "F16")
        assert path.stat().st_size < 12 * 2**20, f"{shape.name} F16 is {path.stat().st_size} bytes"


@pytest.mark.parametrize(("changes", "message"), [
    ({"arch": "qwen2", "head_dim": 32}, "qwen2 needs n_head * head_dim == n_embd"),
    ({"n_expert": 8, "n_expert_used": 2, "n_ff_exp": 256}, "experts are only generated for qwen3moe"),
    ({"n_vocab": 100}, "n_vocab 100 is below"),
    ({"n_head_kv": 3}, "not a multiple of n_head_kv 3"),
], ids=["qwen2-head-dim", "llama-experts", "small-vocab", "gqa"])
def test_model_shape_rejects_inconsistent_dimensions(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        TINY_LLAMA.replace(**changes)


def test_plan_falls_back_like_llama_quantize_when_rows_do_not_fill_k_blocks() -> None:
    shape = TINY_LLAMA.replace(n_embd=320, n_head=5, n_head_kv=1, n_ff=768)  # rows of 320 do not fill 256

    types = {s.name: s.ggml_type.name for s in plan_tensors(shape, "Q4_K_M")}

    assert types["blk.1.attn_q.weight"] == "Q5_0"  # Q4_K -> Q5_0
    assert types["blk.1.attn_v.weight"] == "Q5_0"
    assert types["blk.3.attn_v.weight"] == "Q8_0"  # use_more_bits picks the last eighth: Q6_K -> Q8_0
    assert types["output.weight"] == "Q8_0"
    assert types["blk.1.ffn_down.weight"] == "Q4_K"  # its rows are n_ff = 768 long
    assert types["blk.3.ffn_down.weight"] == "Q6_K"
    assert types["blk.1.ffn_norm.weight"] == "F32"


def test_pure_puts_every_matrix_in_the_base_type() -> None:
    mixed = {s.ggml_type.name for s in plan_tensors(TINY_QWEN2, "Q4_K_M") if len(s.ne) > 1}
    pure = {s.ggml_type.name for s in plan_tensors(TINY_QWEN2, "Q4_K_M", pure=True) if len(s.ne) > 1}

    assert mixed == {"Q4_K", "Q6_K"}
    assert pure == {"Q4_K"}
