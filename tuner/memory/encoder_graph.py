"""Rebuilds llama.cpp's reserve graph for BERT-family encoders (src/models/bert.cpp), op for op.

An encoder has no KV cache (llama_model::create_memory returns nullptr): attention runs over the tokens of
the batch alone (build_attn_inp_no_cache, build_attn_mha), so its peak is KQ = T x T x n_head f32 instead of
n_kv x T x n_head. Embeddings are token, position (bert) and token-type rows added on the host, then a
LayerNorm pinned to the first block. Every block is post-norm: attention, add, LayerNorm, feed-forward
(GELU, or a gated GLU for nomic-bert), add, LayerNorm. The context computes embeddings, so the graph ends with
the GGUF's pooling (build_pooling): mean pooling multiplies the transposed hidden states by an
n_tokens x n_seqs input, CLS/last pooling gathers one row per sequence. Package-private.
"""

from __future__ import annotations

from tuner.memory.ggml_graph import (
    _F16,
    _F32,
    _I32,
    _T,
    OUTPUT,
    _dup,
    _get_rows,
    _Graph,
    _mul_mat,
    _new,
    _permute,
    _reshape,
    _view,
)
from tuner.memory.reserve_graph import _Decoder, _Layer

# enum llama_pooling_type
POOLING_NONE, POOLING_MEAN, POOLING_CLS, POOLING_LAST, POOLING_RANK = 0, 1, 2, 3, 4
# Encoders that rotate Q and K (RoPE) instead of adding learned position rows (src/models/bert.cpp).
_ROPE_ENCODERS = frozenset({"nomic-bert", "nomic-bert-moe", "jina-bert-v3"})


class _Encoder(_Decoder):
    """Builds one reserve graph of a BERT-family encoder; see the module docstring."""

    def norm(self, x: _T, w: _T | None, home: int | None, bias: _T | None = None) -> _T:
        """build_norm with LLM_NORM (LayerNorm): norm, scale, shift; "norm-il" pinned like the decoder's."""
        cur = _dup("NORM", x)
        if self.pin_norms and home is not None and (w is not None or bias is not None):
            cur.bid = home
        if w is not None:
            cur = _dup("MUL", cur, w)
        return _dup("ADD", cur, bias) if bias is not None else cur

    def build(self) -> _Graph:
        s, r, g = self.s, self.r, self.g
        T = r.n_tokens
        first_home = self.plan[0].home if self.plan else self.cpu
        tok = self.weight("token_embd.weight", self.cpu, "in", (_F16, (s.n_embd, s.n_vocab)))
        assert tok is not None
        inp_pos = self.input("inp_pos", _I32, (T,)) if s.arch != "jina-bert-v2" else None
        inp_tokens = self.input("inp_tokens", _I32, (T,))
        inp_embd = self.input("inp_embd", _F32, (s.n_embd, T))
        cur = _get_rows(tok, inp_tokens)
        g.expand(cur)
        g.expand(inp_embd)  # ggml_build_forward_select keeps the unused branch: a leaf never freed
        types = self.weight("token_types.weight", self.cpu, "in")
        if types is not None:  # token types are all "sentence A": row 0 added to every token
            cur = _dup("ADD", cur, _view(types, (s.n_embd,), ()))
        positions = self.weight("position_embd.weight", self.cpu, "in")
        if s.arch == "bert" and positions is not None and inp_pos is not None:
            cur = _new("ADD", _F32, cur.ne, _get_rows(positions, inp_pos), cur)
        # the embedding LayerNorm's weights belong to the first block (LLM_TENSOR_LAYER_REPEATING)
        cur = self.norm(
            cur,
            self.weight("token_embd_norm.weight", first_home, "in0"),
            first_home,
            self.weight("token_embd_norm.bias", first_home, "in0"),
        )
        self.mask = self.input("self_kq_mask", _F16 if r.flash_attn else _F32, (T, T, 1, 1))
        self.out_ids = self.input("out_ids", _I32, (r.n_outputs,))
        self.inp_pos = inp_pos
        for key, layer in enumerate(self.plan):
            cur = self.block(key, layer, cur)
        cur.flags |= OUTPUT  # result_embd (res->t_embd)
        g.expand(cur)
        _pool(self, cur)
        return g

    def block(self, key: int, layer: _Layer, inpL: _T) -> _T:
        il, home = layer.il, layer.home
        w = self.layer_weights(il, home, key)
        bias = {name: self.weight(f"blk.{il}.{name}.bias", home, key)
                for name in ("attn_output_norm", "layer_output_norm", "attn_norm_2")}  # fmt: skip
        w["attn_q_norm.b"] = self.weight(f"blk.{il}.attn_q_norm.bias", home, key)
        w["attn_k_norm.b"] = self.weight(f"blk.{il}.attn_k_norm.bias", home, key)
        w["attn_norm_2"] = self.weight(f"blk.{il}.attn_norm_2.weight", home, key)
        w["attn_output_norm"] = self.weight(f"blk.{il}.attn_output_norm.weight", home, key)
        w["layer_output_norm"] = self.weight(f"blk.{il}.layer_output_norm.weight", home, key)
        q, k, v = self.encoder_qkv(il, home, inpL, w)
        cur = _attention_no_cache(self, q, k, v, w, self.mask)
        if layer.last:
            cur = _get_rows(cur, self.out_ids)
            inpL = _get_rows(inpL, self.out_ids)
        cur = _dup("ADD", cur, inpL)
        cur = self.norm(cur, w["attn_output_norm"], home, bias["attn_output_norm"])
        if w["attn_norm_2"] is not None:
            cur = self.norm(_dup("ADD", cur, inpL), w["attn_norm_2"], home, bias["attn_norm_2"])
        ffn_inp = cur
        up_w, gate_w, down_w = w["ffn_up"], w["ffn_gate"], w["ffn_down"]
        assert up_w is not None and down_w is not None
        up = self.mm(up_w, cur, w["ffn_up.b"])
        if gate_w is not None:  # nomic-bert: SwiGLU with a separate gate
            act = _new("GLU", _F32, up.ne, self.mm(gate_w, cur, w["ffn_gate.b"]), up)
        elif up.ne[0] != self.s.n_ff[il]:  # jina-bert-v2: ffn_up holds the gate too, GEGLU halves it
            act = _new("GLU", _F32, (up.ne[0] // 2, *up.ne[1:]), up)
        else:
            act = _dup("UNARY", up)  # GELU, in place
        cur = self.mm(down_w, act, w["ffn_down.b"])
        cur = _dup("ADD", cur, ffn_inp)
        return self.norm(cur, w["layer_output_norm"], home, bias["layer_output_norm"])

    def encoder_qkv(self, il: int, home: int, cur: _T, w: dict[str, _T | None]) -> tuple[_T, _T, _T]:
        """build_qkv (separate projections with biases, or one fused QKV) and RoPE for the rotary encoders."""
        s, T = self.s, self.r.n_tokens
        hq, hk, D = s.n_head[il], s.n_head_kv[il], s.head_k
        if w["attn_qkv"] is not None:
            qkv = self.mm(w["attn_qkv"], cur, w["attn_qkv.b"])
            row = qkv.nb[1]
            q = _view(qkv, (D, hq, T), (qkv.nb[0] * D, row))
            k = _view(qkv, (D, hk, T), (qkv.nb[0] * D, row))
            v = _view(qkv, (D, hk, T), (qkv.nb[0] * D, row))
        else:
            assert w["attn_q"] is not None and w["attn_k"] is not None and w["attn_v"] is not None
            q = _reshape(self.mm(w["attn_q"], cur, w["attn_q.b"]), D, hq, T)
            k = _reshape(self.mm(w["attn_k"], cur, w["attn_k.b"]), D, hk, T)
            v = _reshape(self.mm(w["attn_v"], cur, w["attn_v.b"]), D, hk, T)
        # jina-bert-v2: LayerNorms over each token's whole Q and K rows
        for name in ("attn_q_norm", "attn_k_norm"):
            norm_w = w[name]
            if norm_w is not None:
                x = q if name == "attn_q_norm" else k
                normed = self.norm(_reshape(x, x.ne[0] * x.ne[1], T), norm_w, home, w[f"{name}.b"])
                if name == "attn_q_norm":
                    q = _reshape(normed, D, hq, T)
                else:
                    k = _reshape(normed, D, hk, T)
        if s.arch in _ROPE_ENCODERS and self.inp_pos is not None:
            q = _dup("ROPE", q, self.inp_pos)
            k = _dup("ROPE", k, self.inp_pos)
        return q, k, v


def _attention_no_cache(builder: _Decoder, q: _T, k: _T, v: _T, w: dict[str, _T | None], mask: _T) -> _T:
    """build_attn with llm_graph_input_attn_no_cache: K and V are this batch's own rows, never stored."""
    g = builder.g
    for t in (q, k, v):  # expanded together so that they are not reordered
        g.expand(t)
    qp = _permute(_view(q, q.ne, (q.nb[1], q.nb[2], q.nb[3])), (0, 2, 1, 3))
    kp = _permute(k, (0, 2, 1, 3))
    vp = _permute(v, (0, 2, 1, 3))
    if builder.r.flash_attn:
        # K and V are F32 activations here, so llama.cpp casts them to F16 for the fused kernel
        kc = _new("CPY", _F16, kp.ne, kp)
        vc = _new("CPY", _F16, vp.ne, vp)
        fa = _new("FLASH_ATTN_EXT", _F32, (vc.ne[0], qp.ne[2], qp.ne[1], qp.ne[3]), qp, kc, vc, mask)
        cur = _reshape(fa, fa.ne[0] * fa.ne[1], fa.ne[2] * fa.ne[3])
    else:
        kq = _dup("SOFT_MAX", _mul_mat(kp, qp), mask)
        vt = _new("CONT", vp.type, (vp.ne[1], vp.ne[0], vp.ne[2], vp.ne[3]), _permute(vp, (1, 0, 2, 3)))
        kqv = _mul_mat(vt, kq)
        perm = _permute(kqv, (0, 2, 1, 3))
        cur = _new("CONT", perm.type, (perm.ne[0] * perm.ne[1], perm.ne[2] * perm.ne[3]), perm)
    g.expand(cur)
    assert w["attn_output"] is not None
    return builder.mm(w["attn_output"], cur, w["attn_output.b"])


def _pool(builder: _Decoder, embd: _T) -> None:
    """build_pooling for the GGUF's pooling type, then build_dense_out (sentence-transformers' dense layers,
    output-layer weights) when the model has them; the last of them is the pooled result."""
    s, r, g = builder.s, builder.r, builder.g
    pooled: _T | None = None
    if s.pooling == POOLING_MEAN:
        mean = builder.input("mean", _F32, (r.n_tokens, r.n_seqs))
        transposed = _new("CONT", embd.type, (embd.ne[1], embd.ne[0]), _permute(embd, (1, 0, 2, 3)))
        pooled = _mul_mat(transposed, mean)
    elif s.pooling in (POOLING_CLS, POOLING_LAST):
        pooled = _get_rows(embd, builder.input("cls", _I32, (r.n_seqs,)))
    # NONE keeps the token embeddings; RANK (rerankers) is not modelled
    out = builder.out_home
    dense_2 = builder.weight("dense_2.weight", out, "out")
    dense_2_b = builder.weight("dense_2.bias", out, "out")
    dense_3 = builder.weight("dense_3.weight", out, "out")
    if pooled is not None:
        g.expand(pooled)
    cur = pooled if pooled is not None else embd
    if dense_2 is not None:
        cur = _mul_mat(dense_2, cur)
    if dense_2_b is not None:
        cur = _dup("ADD", cur, dense_2_b)
    if dense_3 is not None:
        cur = _mul_mat(dense_3, cur)
    if cur is not embd:
        cur.flags |= OUTPUT  # result_embd_pooled
        g.expand(cur)


class _NoCacheDecoder(_Decoder):
    """gemma-embedding (src/models/gemma-embedding.cpp): gemma3's blocks run without a KV cache over the batch's
    own tokens (two T x T masks: full and symmetric sliding window), then result_norm is the embedding, pooled;
    no logits are computed."""

    def attention(self, il: int, home: int, q: _T, k: _T, v: _T, w: dict[str, _T | None]) -> _T:
        T, masked = self.r.n_tokens, _F16 if self.r.flash_attn else _F32
        name = "self_kq_mask_swa" if self.s.swa[il] else "self_kq_mask"
        return _attention_no_cache(self, q, k, v, w, self.input(name, masked, (T, T, 1, 1)))

    def build(self) -> _Graph:
        s, r, g = self.s, self.r, self.g
        T = r.n_tokens
        tok = self.weight("token_embd.weight", self.cpu, "in", (_F16, (s.n_embd, s.n_vocab)))
        assert tok is not None
        cur = _get_rows(tok, self.input("inp_tokens", _I32, (T,)))
        g.expand(cur)
        g.expand(self.input("inp_embd", _F32, (s.n_embd, T)))  # the unused branch: a leaf never freed
        inpL = _dup("SCALE", cur)  # sqrt(n_embd)
        for key, layer in enumerate(self.plan):
            inpL = self.block(key, layer, inpL)
        out = self.out_home
        cur = self.norm(inpL, self.weight("output_norm.weight", out, "out", (_F32, (s.n_embd,))), None)
        cur.flags |= OUTPUT  # result_norm, which is res->t_embd
        g.expand(cur)
        _pool(self, cur)
        return g
