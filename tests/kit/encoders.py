"""Synthetic BERT-family embedding GGUFs (nomic-bert, jina-bert-v2, bert) of any size, written with gguf-py.

The real MiniLM (tests/kit/minilm.py) covers ``bert``; these cover the other encoder graphs the tuner replays:
nomic-bert (one fused QKV projection, RoPE instead of position rows, SwiGLU) and jina-bert-v2 (ALiBi, Q/K
LayerNorms, a GEGLU whose gate rides in ffn_up). Weights are random N(0, 0.02), the vocabulary a small
WordPiece one with BERT's special tokens, so llama.cpp loads, tokenizes and embeds them (meaningless vectors).
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType, PoolingType, TokenType

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIALS))
_WEIGHT_STD = 0.02
ARCHITECTURES = ("bert", "nomic-bert", "jina-bert-v2", "gemma-embedding")


@dataclass(frozen=True)
class EncoderShape:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_ff: int
    n_ctx_train: int = 512
    pooling: str = "MEAN"  # gguf.PoolingType name
    name: str = "synthetic-encoder"
    # gemma-embedding only: grouped K/V heads, the head width, the sliding window and the dense projections
    n_head_kv: int | None = None
    head_dim: int | None = None
    sliding_window: int = 0
    dense_out: int = 0  # sentence-transformers' dense_2 (n_embd -> dense_out) and dense_3 (back); 0 = none

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch {self.arch!r} is not one of {ARCHITECTURES}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")

    def replace(self, **changes: object) -> EncoderShape:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


TINY_NOMIC_BERT = EncoderShape("nomic-bert", n_layer=3, n_embd=128, n_head=4, n_ff=320, name="tiny-nomic-bert")
TINY_JINA_BERT_V2 = EncoderShape(
    "jina-bert-v2", n_layer=3, n_embd=128, n_head=4, n_ff=256, pooling="CLS", name="tiny-jina-bert-v2"
)
# Seven layers: with gemma's pattern of 6 they are sliding-window but the sixth (index 5).
TINY_GEMMA_EMBEDDING = EncoderShape(
    "gemma-embedding", n_layer=7, n_embd=128, n_head=4, n_head_kv=1, head_dim=64, n_ff=256, n_ctx_train=2048,
    sliding_window=128, dense_out=512, name="tiny-gemma-embedding",
)  # fmt: skip


def vocabulary() -> tuple[list[str], list[int]]:
    """BERT's specials, then word starts ("▁a", "▁the", ...) and continuations ("a", "s", ...) in WPM form."""
    words = ["the", "a", "man", "is", "eating", "food", "model", "split", "across", "two", "cards", "and"]
    pieces = [*string.ascii_lowercase, *string.digits, *".,!?'-"]
    # dict.fromkeys drops repeats ("▁a" is a word and a letter): llama.cpp refuses a vocabulary with duplicates
    tokens = list(dict.fromkeys([*SPECIALS, *("\u2581" + p for p in [*words, *pieces]), *pieces, "ing", "ed"]))
    types = [TokenType.CONTROL] * len(SPECIALS) + [TokenType.NORMAL] * (len(tokens) - len(SPECIALS))
    return tokens, types


def write_encoder_gguf(path: str | Path, shape: EncoderShape, seed: int = 0) -> Path:
    """Write ``shape`` as an F16 GGUF at ``path`` (norms, biases and position/type rows in F32)."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens, types = vocabulary()
    n_embd, n_ff, arch = shape.n_embd, shape.n_ff, shape.arch
    writer = GGUFWriter(str(path), arch)
    writer.add_name(shape.name)
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_block_count(shape.n_layer)
    writer.add_head_count(shape.n_head)
    writer.add_layer_norm_eps(1e-12)
    writer.add_causal_attention(False)
    writer.add_pooling_type(PoolingType[shape.pooling])
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    if arch == "nomic-bert":
        writer.add_rope_freq_base(1000.0)
    if arch == "gemma-embedding":
        return _write_gemma_embedding(writer, path, shape, rng, tokens, types)
    _write_vocabulary(writer, tokens, types)

    def matrix(name: str, n_in: int, n_out: int) -> None:  # ggml ne = (n_in, n_out): numpy (n_out, n_in)
        writer.add_tensor(name, rng.normal(0.0, _WEIGHT_STD, (n_out, n_in)).astype(np.float16))

    def vector(name: str, n: int, value: float | None = None) -> None:
        data = (
            np.full(n, value, np.float32) if value is not None else rng.normal(0.0, _WEIGHT_STD, n).astype(np.float32)
        )
        writer.add_tensor(name, data)

    writer.add_tensor("token_embd.weight", rng.normal(0.0, _WEIGHT_STD, (len(tokens), n_embd)).astype(np.float16))
    writer.add_tensor("token_types.weight", rng.normal(0.0, _WEIGHT_STD, (2, n_embd)).astype(np.float32))
    if arch == "bert":
        writer.add_tensor(
            "position_embd.weight", rng.normal(0.0, _WEIGHT_STD, (shape.n_ctx_train, n_embd)).astype(np.float32)
        )
    vector("token_embd_norm.weight", n_embd, 1.0)
    vector("token_embd_norm.bias", n_embd)
    for il in range(shape.n_layer):
        blk = f"blk.{il}"
        if arch == "nomic-bert":
            matrix(f"{blk}.attn_qkv.weight", n_embd, 3 * n_embd)
        else:
            for proj in ("attn_q", "attn_k", "attn_v"):
                matrix(f"{blk}.{proj}.weight", n_embd, n_embd)
                vector(f"{blk}.{proj}.bias", n_embd)
        if arch == "jina-bert-v2":
            for norm in ("attn_q_norm", "attn_k_norm"):
                vector(f"{blk}.{norm}.weight", n_embd, 1.0)
                vector(f"{blk}.{norm}.bias", n_embd)
        matrix(f"{blk}.attn_output.weight", n_embd, n_embd)
        vector(f"{blk}.attn_output.bias", n_embd)
        vector(f"{blk}.attn_output_norm.weight", n_embd, 1.0)
        vector(f"{blk}.attn_output_norm.bias", n_embd)
        if arch == "nomic-bert":
            matrix(f"{blk}.ffn_up.weight", n_embd, n_ff)
            matrix(f"{blk}.ffn_gate.weight", n_embd, n_ff)
            matrix(f"{blk}.ffn_down.weight", n_ff, n_embd)
        else:
            n_up = 2 * n_ff if arch == "jina-bert-v2" else n_ff  # jina's GEGLU keeps its gate in ffn_up
            matrix(f"{blk}.ffn_up.weight", n_embd, n_up)
            vector(f"{blk}.ffn_up.bias", n_up)
            matrix(f"{blk}.ffn_down.weight", n_ff, n_embd)
            vector(f"{blk}.ffn_down.bias", n_embd)
        vector(f"{blk}.layer_output_norm.weight", n_embd, 1.0)
        vector(f"{blk}.layer_output_norm.bias", n_embd)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_vocabulary(writer: GGUFWriter, tokens: list[str], types: list[TokenType]) -> None:
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_type_count(2)
    writer.add_bos_token_id(CLS_ID)
    writer.add_eos_token_id(SEP_ID)
    writer.add_sep_token_id(SEP_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_mask_token_id(MASK_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)


def _write_gemma_embedding(
    writer: GGUFWriter,
    path: Path,
    shape: EncoderShape,
    rng: np.random.Generator,
    tokens: list[str],
    types: list[TokenType],
) -> Path:
    """gemma-embedding: gemma3's blocks (RMS norms, Q/K norms, GELU-gated FFN, post norms) run non-causally."""
    arch, n_embd, n_ff = shape.arch, shape.n_embd, shape.n_ff
    n_head_kv = shape.n_head_kv or shape.n_head
    head = shape.head_dim or n_embd // shape.n_head
    writer.add_head_count_kv(n_head_kv)
    writer.add_key_length(head)
    writer.add_value_length(head)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_sliding_window(shape.sliding_window)
    writer.add_rope_freq_base(1_000_000.0)
    if shape.dense_out:
        for key, value in (("dense_2_feat_in", n_embd), ("dense_2_feat_out", shape.dense_out),
                           ("dense_3_feat_in", shape.dense_out), ("dense_3_feat_out", n_embd)):  # fmt: skip
            writer.add_uint32(f"{arch}.{key}", value)
    _write_vocabulary(writer, tokens, types)

    def matrix(name: str, n_in: int, n_out: int) -> None:
        writer.add_tensor(name, rng.normal(0.0, _WEIGHT_STD, (n_out, n_in)).astype(np.float16))

    def ones(name: str, n: int) -> None:
        writer.add_tensor(name, np.ones(n, np.float32))

    writer.add_tensor("token_embd.weight", rng.normal(0.0, _WEIGHT_STD, (len(tokens), n_embd)).astype(np.float16))
    ones("output_norm.weight", n_embd)
    if shape.dense_out:
        matrix("dense_2.weight", n_embd, shape.dense_out)
        matrix("dense_3.weight", shape.dense_out, n_embd)
    for il in range(shape.n_layer):
        blk = f"blk.{il}"
        matrix(f"{blk}.attn_q.weight", n_embd, shape.n_head * head)
        matrix(f"{blk}.attn_k.weight", n_embd, n_head_kv * head)
        matrix(f"{blk}.attn_v.weight", n_embd, n_head_kv * head)
        matrix(f"{blk}.attn_output.weight", shape.n_head * head, n_embd)
        for norm in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            ones(f"{blk}.{norm}.weight", n_embd)
        for norm in ("attn_q_norm", "attn_k_norm"):
            ones(f"{blk}.{norm}.weight", head)
        matrix(f"{blk}.ffn_gate.weight", n_embd, n_ff)
        matrix(f"{blk}.ffn_up.weight", n_embd, n_ff)
        matrix(f"{blk}.ffn_down.weight", n_ff, n_embd)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
