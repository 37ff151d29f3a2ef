"""Synthetic GGUF models of any llama-family shape (llama, qwen2, gemma3, qwen3moe, openelm), written with gguf-py.

Tiny presets load and generate in llama.cpp (random weights, a byte-level BPE vocabulary, a ChatML template);
big presets are written ``sparse`` (header only, the data region left as a hole) so a 40 GB 70B costs a few MB.
Per-tensor types follow llama.cpp's ``llama_tensor_get_type`` (src/llama-quant.cpp); see ``tensor_type``.
openelm models have layers of different shapes: head counts and FFN widths are written as per-layer arrays,
which llama.cpp reads with ``get_key_or_arr`` and OpenELM's graph uses layer by layer (src/models/openelm.cpp).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    TokenType,
)
from gguf.quants import quantize

T = GGMLQuantizationType

ARCHITECTURES = ("llama", "qwen2", "gemma3", "qwen3moe", "openelm")

# weight_type -> (the type most tensors get, general.file_type); the mix around it is in tensor_type()
WEIGHT_TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "F16": (T.F16, LlamaFileType.MOSTLY_F16),
    "Q8_0": (T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "Q5_0": (T.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "Q4_1": (T.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "Q4_0": (T.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "Q5_K_M": (T.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    "Q4_K_M": (T.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
}

GGUF_ALIGNMENT = 32  # gguf-py's and llama.cpp's default general.alignment
GEMMA3_SWA_PATTERN = 6  # llama_model_gemma3::load_arch_hparams: load_swa_pattern(ml, 6)

# Vocabulary layout: [specials][256 byte tokens][merged tokens][fillers]. ChatML specials like SmolLM2's, so the
# server's chat route works on tiny models; bos/eos ids are fixed whatever n_vocab is.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_MERGES = (
    ("Ġ", "t"), ("h", "e"), ("i", "n"), ("e", "r"), ("a", "n"), ("Ġ", "a"), ("o", "n"), ("r", "e"),
    ("Ġt", "he"), ("Ġ", "s"), ("i", "s"), ("e", "n"), ("in", "g"), ("Ġ", "w"), ("o", "u"), ("a", "t"),
    ("Ġ", "o"), ("e", "d"), ("Ġ", "b"), ("o", "r"),
)  # fmt: skip
MIN_VOCAB = len(SPECIAL_TOKENS) + 256 + len(_MERGES)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Random weights: N(0, 0.02) like a freshly initialised transformer; keeps activations finite through the
# RMS norms, so llama.cpp generates (nonsense) tokens without NaNs.
_WEIGHT_STD = 0.02
_CHUNK_ELEMENTS = 1 << 22  # rows are generated in chunks of about 4M values to bound memory on big dense files


@dataclass(frozen=True)
class ModelShape:
    """Hyper-parameters of a synthetic model; the presets below are the ones the tests use."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    head_dim: int | None = None  # None: n_embd // n_head (written as attention.key_length when it differs)
    n_ctx_train: int = 4096
    tied_embeddings: bool = False  # no output.weight: llama.cpp reuses token_embd for the output layer
    n_expert: int = 0  # qwen3moe only
    n_expert_used: int = 0
    n_ff_exp: int = 0
    sliding_window: int = 0  # gemma3 only; 0 = every layer attends to the full context
    swa_pattern: int | None = None  # gemma3: every n-th layer is global; None = llama.cpp's default (6), key omitted
    rope_freq_base: float = 10000.0
    rms_eps: float = 1e-5
    name: str = "synthetic"
    # openelm only: per-layer head counts and FFN widths, written as GGUF arrays (None: the scalar everywhere)
    layer_n_head: tuple[int, ...] | None = None
    layer_n_head_kv: tuple[int, ...] | None = None
    layer_n_ff: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ValueError(f"invalid ModelShape {self.name!r}: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        if self.arch not in ARCHITECTURES:
            problems.append(f"arch {self.arch!r} is not one of {ARCHITECTURES}")
        for field in ("n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "n_ctx_train"):
            if getattr(self, field) <= 0:
                problems.append(f"{field} must be positive, got {getattr(self, field)}")
        if self.n_head_kv > 0 and self.n_head % self.n_head_kv:
            problems.append(f"n_head {self.n_head} is not a multiple of n_head_kv {self.n_head_kv}")
        if self.n_vocab < MIN_VOCAB:
            problems.append(f"n_vocab {self.n_vocab} is below the {MIN_VOCAB} tokens the tokenizer needs")
        if self.head_dim is None and self.n_head > 0 and self.n_embd % self.n_head:
            problems.append(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}; give head_dim")
        if self.arch == "qwen2" and self.n_head * self.n_embd_head != self.n_embd:
            # llama_model_qwen2::load_arch_tensors builds attn_output as {n_embd, n_embd}
            problems.append("qwen2 needs n_head * head_dim == n_embd")
        if self.arch == "qwen3moe":
            if not 0 < self.n_expert_used <= self.n_expert or self.n_ff_exp <= 0:
                problems.append("qwen3moe needs 0 < n_expert_used <= n_expert and n_ff_exp > 0")
        elif self.n_expert or self.n_expert_used or self.n_ff_exp:
            problems.append(f"experts are only generated for qwen3moe, not {self.arch}")
        if self.arch != "gemma3" and (self.sliding_window or self.swa_pattern is not None):
            problems.append(f"sliding_window/swa_pattern are only generated for gemma3, not {self.arch}")
        per_layer = {"layer_n_head": self.layer_n_head, "layer_n_head_kv": self.layer_n_head_kv,
                     "layer_n_ff": self.layer_n_ff}  # fmt: skip
        for field, values in per_layer.items():
            if values is None:
                continue
            if self.arch != "openelm":
                problems.append(f"{field} is only generated for openelm, not {self.arch}")
            elif len(values) != self.n_layer or min(values) <= 0:
                problems.append(f"{field} needs {self.n_layer} positive values, got {values}")
        if self.arch == "openelm":
            if self.head_dim is None:
                problems.append("openelm needs head_dim (its head counts vary by layer)")
            for il in range(self.n_layer if not problems else 0):
                if self.heads(il) % self.kv_heads(il):
                    problems.append(f"layer {il}: {self.heads(il)} heads are not a multiple of {self.kv_heads(il)}")
        return problems

    def heads(self, il: int) -> int:
        return self.layer_n_head[il] if self.layer_n_head is not None else self.n_head

    def kv_heads(self, il: int) -> int:
        return self.layer_n_head_kv[il] if self.layer_n_head_kv is not None else self.n_head_kv

    def ff(self, il: int) -> int:
        return self.layer_n_ff[il] if self.layer_n_ff is not None else self.n_ff

    @property
    def n_embd_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    def swa_layers(self) -> tuple[bool, ...]:
        """Which layers llama.cpp gives the sliding window (llama_hparams::set_swa_pattern, dense_first=false)."""
        if self.arch != "gemma3" or self.sliding_window <= 0:
            return (False,) * self.n_layer
        pattern = self.swa_pattern if self.swa_pattern is not None else GEMMA3_SWA_PATTERN
        return tuple(pattern == 0 or il % pattern < pattern - 1 for il in range(self.n_layer))

    def replace(self, **changes: object) -> ModelShape:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


# Tiny presets: a few MB, every row length a multiple of 256 so that K-quants apply without fallbacks.
TINY_LLAMA = ModelShape(
    arch="llama", n_layer=4, n_embd=256, n_head=4, n_head_kv=2, n_ff=768, n_vocab=1024,
    n_ctx_train=2048, name="tiny-llama",
)  # fmt: skip
TINY_QWEN2 = ModelShape(
    arch="qwen2", n_layer=4, n_embd=256, n_head=4, n_head_kv=2, n_ff=768, n_vocab=1024,
    n_ctx_train=4096, tied_embeddings=True, rope_freq_base=1_000_000.0, rms_eps=1e-6, name="tiny-qwen2",
)  # fmt: skip
# Six layers so that the default pattern gives five sliding-window layers and one global layer (index 5).
TINY_GEMMA3 = ModelShape(
    arch="gemma3", n_layer=6, n_embd=256, n_head=4, n_head_kv=1, head_dim=128, n_ff=512, n_vocab=1024,
    n_ctx_train=4096, tied_embeddings=True, sliding_window=128, rope_freq_base=1_000_000.0, rms_eps=1e-6,
    name="tiny-gemma3",
)  # fmt: skip
TINY_MOE = ModelShape(
    arch="qwen3moe", n_layer=4, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=768, n_vocab=1024,
    n_ctx_train=4096, n_expert=4, n_expert_used=2, n_ff_exp=256, rope_freq_base=1_000_000.0, rms_eps=1e-6,
    name="tiny-qwen3moe",
)  # fmt: skip
# OpenELM: every layer differs (heads 4-8, KV heads 1-4 with GQA ratios 4/2/3/2, FFN 512-1280), tied output,
# fused QKV with Q/K norms; the scalar n_head/n_head_kv/n_ff are unused beside the arrays.
TINY_OPENELM = ModelShape(
    arch="openelm", n_layer=4, n_embd=256, n_head=4, n_head_kv=1, head_dim=64, n_ff=512, n_vocab=1024,
    n_ctx_train=2048, tied_embeddings=True, layer_n_head=(4, 4, 6, 8), layer_n_head_kv=(1, 2, 2, 4),
    layer_n_ff=(512, 768, 1024, 1280), name="tiny-openelm",
)  # fmt: skip
# Llama 3.1 shapes: write these with sparse=True.
LLAMA_8B = ModelShape(
    arch="llama", n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256,
    n_ctx_train=131072, rope_freq_base=500_000.0, name="llama-8b",
)  # fmt: skip
LLAMA_70B = ModelShape(
    arch="llama", n_layer=80, n_embd=8192, n_head=64, n_head_kv=8, n_ff=28672, n_vocab=128256,
    n_ctx_train=131072, rope_freq_base=500_000.0, name="llama-70b",
)  # fmt: skip
# The shapes of the two real PyPI models (tests/kit/models.py), to check the quantisation mix against them.
SMOLLM2_135M = ModelShape(
    arch="llama", n_layer=30, n_embd=576, n_head=9, n_head_kv=3, n_ff=1536, n_vocab=49152,
    n_ctx_train=8192, tied_embeddings=True, rope_freq_base=100_000.0, name="smollm2-135m",
)  # fmt: skip
GEMMA3_270M = ModelShape(
    arch="gemma3", n_layer=18, n_embd=640, n_head=4, n_head_kv=1, head_dim=256, n_ff=2048, n_vocab=262144,
    n_ctx_train=32768, tied_embeddings=True, sliding_window=512, rope_freq_base=1_000_000.0, rms_eps=1e-6,
    name="gemma3-270m",
)  # fmt: skip

TINY_PRESETS = (TINY_LLAMA, TINY_QWEN2, TINY_GEMMA3, TINY_MOE, TINY_OPENELM)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a synthetic model: ``ne`` in ggml order (ne[0] is the contiguous row)."""

    name: str
    ne: tuple[int, ...]
    ggml_type: GGMLQuantizationType

    @property
    def n_bytes(self) -> int:
        block_size, type_size = GGML_QUANT_SIZES[self.ggml_type]
        return math.prod(self.ne) // block_size * type_size

    @property
    def layer(self) -> int | None:
        return int(self.name.split(".")[1]) if self.name.startswith("blk.") else None


def _use_more_bits(il: int, n_layer: int) -> bool:
    # llama-quant.cpp: the first and last eighth of the layers and every third layer in between
    return il < n_layer // 8 or il >= 7 * n_layer // 8 or (il - n_layer // 8) % 3 == 2


def _fallback(ggml_type: GGMLQuantizationType, n_cols: int) -> GGMLQuantizationType:
    """llama-quant.cpp's tensor_type_fallback: rows that do not fill 256-blocks get a 32-block type."""
    if n_cols % GGML_QUANT_SIZES[ggml_type][0] == 0:
        return ggml_type
    smaller = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}.get(ggml_type, ggml_type)
    return smaller if n_cols % GGML_QUANT_SIZES[smaller][0] == 0 else T.F16


def _is_70b(shape: ModelShape) -> bool:
    # LLM_TYPE_70B in llama.cpp: llama with 80 layers and GQA, or qwen2 with 80 layers
    gqa = shape.n_head_kv != shape.n_head
    return shape.n_layer == 80 and (shape.arch == "qwen2" or (shape.arch == "llama" and gqa))


def tensor_type(name: str, ne: Sequence[int], shape: ModelShape, weight_type: str, *,
                pure: bool = False) -> GGMLQuantizationType:
    """The type llama-quantize gives this tensor for ``weight_type`` (a subset of llama_tensor_get_type).

    Kept: 1-D tensors, norms and the expert router stay F32; the output matrix (and token_embd when tied) is
    Q6_K, or Q8_0 when the base is Q8_0 or the row length is not a multiple of the base's block; for *_K_M,
    attn_v and ffn_down use Q6_K on the layers ``use_more_bits`` picks; Llama-70B bumps Q4_K attn_v to Q5_K;
    8-expert models put attn_k/attn_v in Q8_0 (and Q4_K_M's attn_output in Q5_K); K-quants fall back to
    32-block types on rows that are not multiples of 256 (Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0).
    Left out: the IQ/Q2/Q3 rules, imatrix-dependent rules and Falcon's exceptions.
    ``pure`` is llama-quantize --pure: every quantisable tensor in the base type, only the fallback applies.
    """
    base, _ = WEIGHT_TYPES[weight_type]
    if len(ne) < 2 or "_norm." in name or "ffn_gate_inp" in name or not name.endswith(".weight"):
        return T.F32
    if base == T.F16:
        return T.F16
    if pure:
        return _fallback(base, ne[0])
    il = int(name.split(".")[1]) if name.startswith("blk.") else -1
    is_output = name == "output.weight" or (shape.tied_embeddings and name == "token_embd.weight")
    new_type = base
    if is_output:
        new_type = T.Q8_0 if ne[0] % GGML_QUANT_SIZES[base][0] or base == T.Q8_0 else T.Q6_K
    elif name == "token_embd.weight":
        new_type = base
    elif ".attn_v." in name:
        if weight_type in ("Q4_K_M", "Q5_K_M") and _use_more_bits(il, shape.n_layer):
            new_type = T.Q6_K
        if _is_70b(shape) and new_type == T.Q4_K:
            new_type = T.Q5_K
        if shape.n_expert == 8:
            new_type = T.Q8_0
    elif ".attn_k." in name:
        if shape.n_expert == 8:
            new_type = T.Q8_0
    elif ".ffn_down" in name:
        if weight_type in ("Q4_K_M", "Q5_K_M") and _use_more_bits(il, shape.n_layer):
            new_type = T.Q6_K
    elif ".attn_output." in name and shape.n_expert == 8 and weight_type == "Q4_K_M":
        new_type = T.Q5_K
    return _fallback(new_type, ne[0])


def _layer_tensors(shape: ModelShape, il: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Tensors of block ``il`` in the shapes each architecture's load_arch_tensors creates (src/models/*.cpp)."""
    e, q = shape.n_embd, shape.n_embd_head * shape.heads(il)
    kv = shape.n_embd_head * shape.kv_heads(il)
    p = f"blk.{il}."
    yield p + "attn_norm.weight", (e,)
    if shape.arch == "openelm":  # llama_model_openelm::load_arch_tensors: fused QKV, Q/K norms, SwiGLU
        yield p + "attn_qkv.weight", (e, q + 2 * kv)
        yield p + "attn_q_norm.weight", (shape.n_embd_head,)
        yield p + "attn_k_norm.weight", (shape.n_embd_head,)
        yield p + "attn_output.weight", (q, e)
        yield p + "ffn_norm.weight", (e,)
        yield p + "ffn_gate.weight", (e, shape.ff(il))
        yield p + "ffn_down.weight", (shape.ff(il), e)
        yield p + "ffn_up.weight", (e, shape.ff(il))
        return
    yield p + "attn_q.weight", (e, q)
    yield p + "attn_k.weight", (e, kv)
    yield p + "attn_v.weight", (e, kv)
    if shape.arch == "qwen2":
        yield p + "attn_q.bias", (q,)
        yield p + "attn_k.bias", (kv,)
        yield p + "attn_v.bias", (kv,)
    yield p + "attn_output.weight", (q, e)
    if shape.arch in ("gemma3", "qwen3moe"):
        yield p + "attn_q_norm.weight", (shape.n_embd_head,)
        yield p + "attn_k_norm.weight", (shape.n_embd_head,)
    if shape.arch == "gemma3":
        yield p + "post_attention_norm.weight", (e,)
    yield p + "ffn_norm.weight", (e,)
    if shape.arch == "qwen3moe":
        f, x = shape.n_ff_exp, shape.n_expert
        yield p + "ffn_gate_inp.weight", (e, x)
        yield p + "ffn_gate_exps.weight", (e, f, x)
        yield p + "ffn_down_exps.weight", (f, e, x)
        yield p + "ffn_up_exps.weight", (e, f, x)
    else:
        yield p + "ffn_gate.weight", (e, shape.n_ff)
        yield p + "ffn_down.weight", (shape.n_ff, e)
        yield p + "ffn_up.weight", (e, shape.n_ff)
    if shape.arch == "gemma3":
        yield p + "post_ffw_norm.weight", (e,)


def plan_tensors(shape: ModelShape, weight_type: str = "Q4_0", *, pure: bool = False) -> list[TensorSpec]:
    """Every tensor the file will hold, in file order, with its llama-quantize type."""
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type {weight_type!r} is not one of {sorted(WEIGHT_TYPES)}")
    names: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (shape.n_embd, shape.n_vocab))]
    for il in range(shape.n_layer):
        names.extend(_layer_tensors(shape, il))
    names.append(("output_norm.weight", (shape.n_embd,)))
    if not shape.tied_embeddings:
        names.append(("output.weight", (shape.n_embd, shape.n_vocab)))
    specs = [TensorSpec(name, ne, tensor_type(name, ne, shape, weight_type, pure=pure)) for name, ne in names]
    for spec in specs:
        if spec.ne[0] % GGML_QUANT_SIZES[spec.ggml_type][0]:
            raise ValueError(f"{spec.name}: row length {spec.ne[0]} is not a multiple of the "
                             f"{spec.ggml_type.name} block; use dimensions that are multiples of 32")
    return specs


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def vocabulary(n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE vocabulary that tokenises any text."""
    tokens = list(SPECIAL_TOKENS)
    types = [int(TokenType.CONTROL)] * len(SPECIAL_TOKENS)
    tokens += list(_bytes_to_unicode().values())
    tokens += [left + right for left, right in _MERGES]
    types += [int(TokenType.NORMAL)] * (256 + len(_MERGES))
    n_fill = n_vocab - len(tokens)
    tokens += [f"<filler_{i}>" for i in range(n_fill)]  # unreachable by merges, but real ids for the logits
    types += [int(TokenType.NORMAL)] * n_fill
    return tokens, types, [f"{left} {right}" for left, right in _MERGES]


def _add_metadata(writer: GGUFWriter, shape: ModelShape, weight_type: str) -> None:
    _, file_type = WEIGHT_TYPES[weight_type]
    writer.add_type("model")
    writer.add_name(f"{shape.name} {weight_type} (synthetic)")
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    if shape.arch == "openelm":  # per-layer arrays, as convert_hf_to_gguf.py writes OpenELM's
        writer.add_feed_forward_length([shape.ff(il) for il in range(shape.n_layer)])
        writer.add_head_count([shape.heads(il) for il in range(shape.n_layer)])
        writer.add_head_count_kv([shape.kv_heads(il) for il in range(shape.n_layer)])
        writer.add_rope_dimension_count(shape.n_embd_head)
    else:
        writer.add_feed_forward_length(shape.n_ff)
        writer.add_head_count(shape.n_head)
        writer.add_head_count_kv(shape.n_head_kv)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_rope_freq_base(shape.rope_freq_base)
    if shape.head_dim is not None or shape.arch in ("gemma3", "qwen3moe"):
        writer.add_key_length(shape.n_embd_head)
        writer.add_value_length(shape.n_embd_head)
    if shape.arch == "llama":
        writer.add_vocab_size(shape.n_vocab)
        writer.add_rope_dimension_count(shape.n_embd_head)
    if shape.arch == "qwen3moe":
        writer.add_expert_count(shape.n_expert)
        writer.add_expert_used_count(shape.n_expert_used)
        writer.add_expert_feed_forward_length(shape.n_ff_exp)
    if shape.arch == "gemma3" and shape.sliding_window > 0:
        writer.add_sliding_window(shape.sliding_window)
        if shape.swa_pattern is not None:
            writer.add_sliding_window_pattern(shape.swa_pattern)
    writer.add_file_type(int(file_type))
    if weight_type != "F16":
        writer.add_quantization_version(2)  # GGML_QNT_VERSION

    tokens, types, merges = vocabulary(shape.n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHATML_TEMPLATE)


def _kquant_blocks(ggml_type: GGMLQuantizationType, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks (gguf-py cannot quantise K-types): random codes, fp16 scales sized for std ~0.02.

    Every bit pattern of the codes and packed 6-bit scales is valid; only the fp16 super-block scales need
    care. Scales follow from the code statistics: Q4_K w = d*sc*q - dmin*m (sc, m < 64, q < 16), with dmin =
    7.5 d centring it; Q5_K the same with q < 32; Q6_K w = d*sc*(q - 32) with int8 sc and q < 64.
    """
    _, type_size = GGML_QUANT_SIZES[ggml_type]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)

    def f16(value: float) -> np.ndarray:
        return np.array([value], dtype="<f2").view(np.uint8)

    if ggml_type == T.Q4_K:
        d = _WEIGHT_STD / 320.0
        blocks[:, 0:2], blocks[:, 2:4] = f16(d), f16(7.5 * d)
    elif ggml_type == T.Q5_K:
        d = _WEIGHT_STD / 660.0
        blocks[:, 0:2], blocks[:, 2:4] = f16(d), f16(15.5 * d)
    elif ggml_type == T.Q6_K:
        blocks[:, -2:] = f16(_WEIGHT_STD / 1365.0)
    else:
        raise ValueError(f"{ggml_type.name} is not a K-quant this kit generates")
    return blocks


def _tensor_chunks(spec: TensorSpec, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """The tensor's data, in row chunks, as arrays whose raw bytes are the GGUF data."""
    n_cols = spec.ne[0]
    n_rows = math.prod(spec.ne[1:])
    if len(spec.ne) == 1:
        if spec.name.endswith(".bias"):
            yield (rng.standard_normal(n_cols, dtype=np.float32) * _WEIGHT_STD).astype(np.float32)
        else:
            yield np.ones(n_cols, dtype=np.float32)  # norm weights: identity scaling
        return
    block_size = GGML_QUANT_SIZES[spec.ggml_type][0]
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // n_cols)
    for first in range(0, n_rows, rows_per_chunk):
        rows = min(rows_per_chunk, n_rows - first)
        if spec.ggml_type in (T.Q4_K, T.Q5_K, T.Q6_K):
            yield _kquant_blocks(spec.ggml_type, rows * n_cols // block_size, rng)
        else:
            values = rng.standard_normal((rows, n_cols), dtype=np.float32) * _WEIGHT_STD
            yield np.ascontiguousarray(quantize(values, spec.ggml_type))


def _split_groups(specs: list[TensorSpec], n_splits: int) -> list[list[TensorSpec]]:
    """Consecutive tensors into ``n_splits`` non-empty groups of roughly equal bytes (like gguf-split)."""
    if not 1 <= n_splits <= len(specs):
        raise ValueError(f"n_splits must be between 1 and the {len(specs)} tensors, got {n_splits}")
    total = sum(spec.n_bytes for spec in specs)
    groups: list[list[TensorSpec]] = [[]]
    done = 0
    for i, spec in enumerate(specs):
        must_start = len(specs) - i == n_splits - len(groups)  # one tensor left per remaining group
        full = done >= total * len(groups) / n_splits
        if groups[-1] and len(groups) < n_splits and (must_start or full):
            groups.append([])
        groups[-1].append(spec)
        done += spec.n_bytes
    return groups


def _write(path: Path, shape: ModelShape, weight_type: str, groups: list[list[TensorSpec]], sparse: bool,
           seed: int) -> list[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(path, shape.arch)
    _add_metadata(writer, shape, weight_type)
    # One dict per output file; GGUFWriter names them <stem>-0000i-of-0000n.gguf and adds the split.* keys.
    for i, group in enumerate(groups):
        if i > 0:
            writer.tensors.append({})  # add_tensor_info fills the last dict (what small_first_shard relies on)
        for spec in group:
            # numpy order (outermost first); a non-uint8 dtype makes gguf-py take the shape as elements
            writer.add_tensor_info(spec.name, tuple(reversed(spec.ne)), np.dtype(np.float32), spec.n_bytes,
                                   raw_dtype=spec.ggml_type)
    paths = writer.format_shard_names(path)
    rng = np.random.default_rng(seed)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None
        for fout, group in zip(writer.fout, groups, strict=True):
            writer.write_padding(fout, fout.tell())
            if sparse:
                # The data region becomes a hole: the apparent size is right, no blocks are allocated.
                fout.truncate(fout.tell() + sum(GGUFWriter.ggml_pad(s.n_bytes, GGUF_ALIGNMENT) for s in group))
                continue
            for spec in group:
                written = 0
                for chunk in _tensor_chunks(spec, rng):
                    chunk.tofile(fout)
                    written += chunk.nbytes
                if written != spec.n_bytes:
                    raise RuntimeError(f"{spec.name}: wrote {written} bytes, planned {spec.n_bytes}")
                writer.write_padding(fout, spec.n_bytes)
    finally:
        writer.close()
    return paths


def write_gguf(path: str | Path, shape: ModelShape, weight_type: str = "Q4_0", *, sparse: bool = False,
               pure: bool = False, seed: int = 0) -> Path:
    """Write ``shape`` as one GGUF file at ``path``.

    ``sparse`` leaves the tensor data as a hole in the file (for shapes only the tuner reads); ``pure`` puts
    every quantisable tensor in the base type like llama-quantize --pure; ``seed`` fixes the random weights.
    """
    specs = plan_tensors(shape, weight_type, pure=pure)
    return _write(Path(path), shape, weight_type, [specs], sparse, seed)[0]


def write_split_gguf(directory: str | Path, shape: ModelShape, weight_type: str = "Q4_0", n_splits: int = 2, *,
                     sparse: bool = False, pure: bool = False, seed: int = 0) -> list[Path]:
    """Write ``shape`` in llama.cpp's split format into ``directory``.

    Files are ``<name>-<weight_type>-0000i-of-0000n.gguf`` with consecutive tensors of about equal bytes; the
    metadata is in the first, split.no / split.count / split.tensors.count in every one (as gguf-split and
    gguf-py write them). Returns the paths in order; llama.cpp loads the model from the first.
    """
    specs = plan_tensors(shape, weight_type, pure=pure)
    base = Path(directory) / f"{shape.name}-{weight_type}.gguf"
    return _write(base, shape, weight_type, _split_groups(specs, n_splits), sparse, seed)
