"""Rebuilds llama.cpp's worst-case reserve graph for llama-style decoders, op for op.

What src/llama-graph.cpp and src/models/*.cpp (llama, qwen2/qwen3, gemma3) build for the reserve: embeddings,
blocks of attention with a KV cache and a dense or MoE feed-forward network, the output layer. Package-private.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuner.memory.ggml_graph import (
    _F16,
    _F32,
    _I32,
    _I64,
    _T,
    INPUT,
    OUTPUT,
    _dup,
    _get_rows,
    _Graph,
    _mul_mat,
    _new,
    _permute,
    _quantized,
    _reshape,
    _row_bytes,
    _set_rows,
    _type_of,
    _view,
)
from tuner.model import ModelInfo, TensorInfo

# The decoder graph (src/models/llama.cpp, qwen2/qwen3, gemma3 and llm_graph_context's helpers).
# Architectures whose graph adds sqrt(n_embd) scaling of the embeddings as a separate op.
_EMBD_SCALED = frozenset({"gemma", "gemma2", "gemma3", "gemma-embedding"})
# Architectures that cap the final logits with scale -> tanh -> scale (all in place).
_LOGIT_SOFTCAP = frozenset({"gemma2"})
# Architectures whose attention residual is ggml_add(residual, attention) rather than (attention, residual).
_RESIDUAL_FIRST = frozenset({"openelm"})


@dataclass(frozen=True)
class _Shape:
    """What the graph needs from a model: hyper-parameters, optional tensors and weight sizes."""

    arch: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    n_ff: tuple[int, ...]
    head_k: int
    head_v: int
    swa: tuple[bool, ...]
    n_swa: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    weights: tuple[tuple[str, str, tuple[int, ...]], ...]  # name, type, ne
    encoder: bool = False  # a BERT-family encoder (tuner.memory.encoder_graph rebuilds its graph)
    pooling: int = 0  # llama_pooling_type of an embedding model's context
    no_cache_decoder: bool = False  # gemma-embedding: decoder blocks without a KV cache (encoder_graph)

    @staticmethod
    def of(model: ModelInfo) -> _Shape:
        return _Shape(
            arch=model.architecture, n_layer=model.n_layer, n_embd=model.n_embd, n_vocab=model.n_vocab,
            n_head=model.n_head, n_head_kv=model.n_head_kv, n_ff=model.n_ff, head_k=model.n_embd_head_k,
            head_v=model.n_embd_head_v, swa=model.swa_layers if model.n_swa > 0 else (False,) * model.n_layer,
            n_swa=model.n_swa, n_expert=model.n_expert, n_expert_used=model.n_expert_used,
            n_ff_exp=model.n_ff_exp, weights=tuple(_weight_entry(t) for t in model.tensors),
            encoder=model.is_encoder, pooling=model.pooling_type,
            no_cache_decoder=model.embeddings and not model.is_encoder,
        )


def _weight_entry(t: TensorInfo) -> tuple[str, str, tuple[int, ...]]:
    return (t.name, _type_of(t.ggml_type), t.shape)


@dataclass(frozen=True)
class _Run:
    """The settings the reserve graph depends on (llama_context::sched_reserve)."""

    n_tokens: int
    n_outputs: int
    n_seqs: int
    n_stream: int
    n_kv: int  # cells per stream of the full-attention cache
    n_kv_swa: int  # cells per stream of the sliding-window cache
    flash_attn: bool
    type_k: str
    type_v: str


@dataclass(frozen=True)
class _Layer:
    """One block of the rebuilt graph."""

    il: int  # the model layer whose shapes and weight names it uses (a representative of equal layers)
    home: int  # the backend holding its weights and KV cache
    last: bool  # the model's last block: it selects the output rows


class _Decoder:
    """Builds one reserve graph from a plan of blocks; ``out_home`` holds the output layer."""

    def __init__(self, shape: _Shape, run: _Run, plan: tuple[_Layer, ...], out_home: int, cpu: int,
                 pin_norms: bool) -> None:
        self.s = shape
        self.r = run
        self.plan = plan
        self.out_home = out_home
        self.cpu = cpu
        self.pin_norms = pin_norms
        self.g = _Graph()
        self._weights = {name: (type_, ne) for name, type_, ne in shape.weights}
        self._leaf_cache: dict[str, _T] = {}

    # -- leaves --------------------------------------------------------------------------------------
    def weight(self, name: str, home: int, key: object,
               fallback: tuple[str, tuple[int, ...]] | None = None) -> _T | None:
        """A weight leaf of block ``key`` on backend ``home``; None when the model has no such tensor."""
        spec = self._weights.get(name, fallback)
        if spec is None:
            return None
        cache_key = f"{name}@{key}"
        if cache_key not in self._leaf_cache:
            t = _T("NONE", spec[0], spec[1], name=name)
            t.home = home
            t.host = t.home == self.cpu
            t.weight = True
            self._leaf_cache[cache_key] = t
        return self._leaf_cache[cache_key]

    def input(self, name: str, type_: str, ne: tuple[int, ...]) -> _T:
        if name not in self._leaf_cache:
            t = _T("NONE", type_, ne, name=name)
            t.flags |= INPUT
            self._leaf_cache[name] = t
        return self._leaf_cache[name]

    def kv(self, kind: str, home: int, n_embd_gqa: int, size: int, type_: str) -> _T:
        t = _T("NONE", type_, (n_embd_gqa, size, self.r.n_stream), name=f"cache_{kind}")
        t.home = home
        return t

    def norm(self, x: _T, w: _T | None, home: int | None) -> _T:
        """build_norm (RMS); ``home`` is the layer's backend where llama.cpp names it "norm-il"."""
        cur = _dup("RMS_NORM", x)
        if self.pin_norms and home is not None and w is not None:
            cur.bid = home  # llama_context::graph_get_cb pins "norm-il" to the layer's device
        return _dup("MUL", cur, w) if w is not None else cur

    def mm(self, w: _T, x: _T, bias: _T | None = None) -> _T:
        cur = _mul_mat(w, x)
        return _dup("ADD", cur, bias) if bias is not None else cur

    # -- the graph -----------------------------------------------------------------------------------
    def build(self) -> _Graph:
        s, r, g = self.s, self.r, self.g
        T = r.n_tokens
        tok = self.weight("token_embd.weight", self.cpu, "in", (_F16, (s.n_embd, s.n_vocab)))
        assert tok is not None
        inp_tokens = self.input("inp_tokens", _I32, (T,))
        inp_embd = self.input("inp_embd", _F32, (s.n_embd, T))
        cur = _get_rows(tok, inp_tokens)
        g.expand(cur)
        g.expand(inp_embd)  # ggml_build_forward_select keeps the unused branch: a leaf never freed
        inpL = cur
        if s.arch in _EMBD_SCALED:
            inpL = _dup("SCALE", inpL)
        for key, layer in enumerate(self.plan):
            inpL = self.block(key, layer, inpL)
        out = self.out_home
        cur = self.norm(inpL, self.weight("output_norm.weight", out, "out", (_F32, (s.n_embd,))), None)
        cur.flags |= OUTPUT
        out_w = self.weight("output.weight", out, "out") or self.weight(
            "token_embd.weight", out, "out", (_F16, (s.n_embd, s.n_vocab)))  # tied: a copy on the output device
        assert out_w is not None
        logits = _mul_mat(out_w, cur)
        if s.arch in _LOGIT_SOFTCAP:
            logits = _dup("SCALE", _dup("UNARY", _dup("SCALE", logits)))
        logits.flags |= OUTPUT
        g.expand(logits)
        return g

    def block(self, key: int, layer: _Layer, inpL: _T) -> _T:
        r, il, home = self.r, layer.il, layer.home
        w = self.layer_weights(il, home, key)
        cur = self.norm(inpL, w["attn_norm"], home)
        if self.s.n_head_kv[il] and self.s.head_k:
            q, k, v = self.qkv(il, home, cur, w)
            cur = self.attention(il, home, q, k, v, w)
        # else: a recurrent or attention-free block; its mixer is not modelled (the norm output stands in)
        inpSA = inpL
        if layer.last:
            out_ids = self.input("out_ids", _I32, (r.n_outputs,))
            cur = _get_rows(cur, out_ids)
            inpSA = _get_rows(inpSA, out_ids)
        if w["attn_post_norm"] is not None:
            cur = self.norm(cur, w["attn_post_norm"], home)
        # The operand order decides which one an in-place ADD reuses (ggml-alloc tries src[0] first).
        ffn_inp = _dup("ADD", inpSA, cur) if self.s.arch in _RESIDUAL_FIRST else _dup("ADD", cur, inpSA)
        if w["ffn_gate_inp"] is None and w["ffn_up"] is None:
            return ffn_inp  # no feed-forward network in this block
        cur = self.norm(ffn_inp, w["ffn_norm"], home)
        cur = self.moe(cur, w) if w["ffn_gate_inp"] is not None else self.ffn(cur, w, "")
        if w["ffn_post_norm"] is not None:
            cur = self.norm(cur, w["ffn_post_norm"], None)  # gemma3 names this one without its layer
        return _dup("ADD", cur, ffn_inp)

    def layer_weights(self, il: int, home: int, key: int) -> dict[str, _T | None]:
        """The block's weights by role; a model read without tensors gets llama-shaped stand-ins."""
        s = self.s
        names = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "attn_q_norm",
                 "attn_k_norm", "attn_post_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "ffn_post_norm",
                 "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_shexp",
                 "ffn_up_shexp", "ffn_down_shexp")
        out = {name: self.weight(f"blk.{il}.{name}.weight", home, key) for name in names}
        for name in ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            out[f"{name}.b"] = self.weight(f"blk.{il}.{name}.bias", home, key)
        out["rope_freqs"] = self.weight("rope_freqs.weight", home, key)

        def stand_in(name: str, type_: str, *ne: int) -> None:
            out[name] = self.weight(f"blk.{il}.{name}.weight", home, key, (type_, ne))

        # Attention layouts other than Q/K/V (MLA, ...) and tensor-less models: plain projections stand in.
        if out["attn_q"] is None and out["attn_qkv"] is None:
            stand_in("attn_q", _F16, s.n_embd, s.head_k * s.n_head[il])
            stand_in("attn_k", _F16, s.n_embd, s.head_k * s.n_head_kv[il])
            stand_in("attn_v", _F16, s.n_embd, s.head_v * s.n_head_kv[il])
        if out["attn_output"] is None:
            stand_in("attn_output", _F16, s.head_v * s.n_head[il], s.n_embd)
        if not self._weights:
            stand_in("attn_norm", _F32, s.n_embd)
            stand_in("ffn_norm", _F32, s.n_embd)
            if s.n_expert:
                stand_in("ffn_gate_inp", _F32, s.n_embd, s.n_expert)
                for name in ("ffn_gate_exps", "ffn_up_exps"):
                    stand_in(name, _F16, s.n_embd, s.n_ff_exp, s.n_expert)
                stand_in("ffn_down_exps", _F16, s.n_ff_exp, s.n_embd, s.n_expert)
            elif s.n_ff[il]:
                stand_in("ffn_gate", _F16, s.n_embd, s.n_ff[il])
                stand_in("ffn_up", _F16, s.n_embd, s.n_ff[il])
                stand_in("ffn_down", _F16, s.n_ff[il], s.n_embd)
        return out

    def qkv(self, il: int, home: int, cur: _T, w: dict[str, _T | None]) -> tuple[_T, _T, _T]:
        """build_qkv plus the per-architecture Q/K norms and RoPE."""
        s, T = self.s, self.r.n_tokens
        hq, hk, D, Dv = s.n_head[il], s.n_head_kv[il], s.head_k, s.head_v
        if w["attn_qkv"] is not None:
            qkv = self.mm(w["attn_qkv"], cur, w["attn_qkv.b"])
            row = qkv.nb[1]
            q = _view(qkv, (D, hq, T), (qkv.nb[0] * D, row, row * T))
            k = _view(qkv, (D, hk, T), (qkv.nb[0] * D, row, row * T))
            v = _view(qkv, (Dv, hk, T), (qkv.nb[0] * Dv, row, row * T))
        else:
            assert w["attn_q"] is not None and w["attn_k"] is not None and w["attn_v"] is not None
            q = _reshape(self.mm(w["attn_q"], cur, w["attn_q.b"]), D, hq, T)
            k = _reshape(self.mm(w["attn_k"], cur, w["attn_k.b"]), D, hk, T)
            v = _reshape(self.mm(w["attn_v"], cur, w["attn_v.b"]), Dv, hk, T)
        pos = self.input("inp_pos", _I32, (T,))
        freqs = w["rope_freqs"]
        rope_src = (pos, freqs) if freqs is not None else (pos,)
        if w["attn_q_norm"] is not None:
            q = self.norm(q, w["attn_q_norm"], home)
        q = _dup("ROPE", q, *rope_src)
        if w["attn_k_norm"] is not None:
            k = self.norm(k, w["attn_k_norm"], home)
        k = _dup("ROPE", k, *rope_src)
        if s.arch in _EMBD_SCALED:
            q = _dup("SCALE", q)  # gemma scales Q by f_attention_scale before attention
        return q, k, v

    def hadamard(self, x: _T, rot: _T) -> _T:
        n = rot.ne[0]
        flat = _reshape(x, n, x.ne[0] * x.ne[1] * x.ne[2] * x.ne[3] // n)
        return _reshape(_mul_mat(rot, flat), *x.ne)

    def attention(self, il: int, home: int, q: _T, k: _T, v: _T, w: dict[str, _T | None]) -> _T:
        """build_attn (with a KV cache) and build_attn_mha."""
        s, r, g = self.s, self.r, self.g
        T, ns = r.n_tokens, r.n_stream
        swa_cache = any(s.swa)
        is_swa = s.swa[il]
        sfx = "_swa" if is_swa else ""
        n_kv = r.n_kv_swa if is_swa else r.n_kv
        v_trans = not r.flash_attn
        n_embd_k = s.head_k * s.n_head_kv[il]
        n_embd_v = s.head_v * s.n_head_kv[il]
        n_embd_v_max = max(s.head_v * h for h in s.n_head_kv)
        k_rot = v_rot = None
        if _quantized(r.type_k) and s.head_k % 64 == 0:
            n_rot = 64
            while s.head_k % (n_rot * 2) == 0:
                n_rot *= 2
            k_rot = self.input("attn_inp_k_rot" + sfx, _F32, (n_rot, n_rot))
        if _quantized(r.type_v) and s.head_v % 64 == 0:
            v_rot = self.input("attn_inp_v_rot" + sfx, _F32, (64, 64))
        if k_rot is not None:
            q = self.hadamard(q, k_rot)
            k = self.hadamard(k, k_rot)
        if v_rot is not None:
            v = self.hadamard(v, v_rot)
        order = (q, k, v) if swa_cache else (q, v, k)  # the iswa variant expands K before V
        for t in order:
            g.expand(t)
        k_idxs = self.input("attn_inp_k_idxs" + sfx, _I64, (T,))
        v_idxs = self.input("attn_inp_v_idxs" + sfx, _I64, (T * n_embd_v_max if v_trans else T,))
        k_cache = self.kv("k", home, n_embd_k, n_kv, r.type_k)
        v_cache = self.kv("v", home, n_embd_v if r.flash_attn else n_embd_v_max, n_kv, r.type_v)
        # cpy_k / cpy_v: views of the current K/V rows stored into the cache with set_rows
        k_dst = _reshape(k_cache, n_embd_k, n_kv * ns) if ns > 1 else k_cache
        g.expand(_set_rows(k_dst, _view(k, (n_embd_k, T), (k.nb[2], k.nb[2] * T)), k_idxs))
        if not v_trans:
            v_dst = _reshape(v_cache, n_embd_v, n_kv * ns) if ns > 1 else v_cache
            g.expand(_set_rows(v_dst, _view(v, (n_embd_v, T), (v.nb[2], v.nb[2] * T)), v_idxs))
        else:
            v_cur = _reshape(v, n_embd_v, T) if v.contiguous else _dup("CONT", v)
            v_width = n_embd_v
            if n_embd_v < v_cache.ne[0]:  # [TAG_V_CACHE_VARIABLE]: rows padded to the widest layer's V
                v_width = v_cache.ne[0]
                v_cur = _new("PAD", v_cur.type, (v_width, T), v_cur)
            v_nel = v_cache.ne[0] * v_cache.ne[1] * v_cache.ne[2]
            g.expand(_set_rows(_reshape(v_cache, 1, v_nel), _reshape(v_cur, 1, v_width * T), v_idxs))
        k_view = _view(k_cache, (s.head_k, s.n_head_kv[il], n_kv, ns),
                       (_row_bytes(r.type_k, s.head_k), _row_bytes(r.type_k, n_embd_k),
                        _row_bytes(r.type_k, n_embd_k * n_kv)))
        if v_trans:
            vrow = _row_bytes(r.type_v, n_kv)
            v_view = _view(v_cache, (n_kv, s.n_head_kv[il], s.head_v, ns),
                           (vrow * s.head_v, vrow, _row_bytes(r.type_v, n_kv * v_cache.ne[0])))
        else:
            v_view = _view(v_cache, (s.head_v, s.n_head_kv[il], n_kv, ns),
                           (_row_bytes(r.type_v, s.head_v), _row_bytes(r.type_v, n_embd_v),
                            _row_bytes(r.type_v, n_embd_v * n_kv)))
        mask = self.input("attn_inp_kq_mask" + sfx, _F16 if r.flash_attn else _F32, (n_kv, T // ns, 1, ns))
        q4 = _view(q, (q.ne[0], q.ne[1], q.ne[2] // ns, ns), (q.nb[1], q.nb[2], q.nb[2] * (q.ne[2] // ns)))
        qp = _permute(q4, (0, 2, 1, 3))
        kp = _permute(k_view, (0, 2, 1, 3))
        vp = _permute(v_view, (0, 2, 1, 3))
        if r.flash_attn:
            fa = _new("FLASH_ATTN_EXT", _F32, (vp.ne[0], qp.ne[2], qp.ne[1], qp.ne[3]), qp, kp, vp, mask)
            cur = _reshape(fa, fa.ne[0] * fa.ne[1], fa.ne[2] * fa.ne[3])
        else:
            kq = _mul_mat(kp, qp)
            if s.arch in _LOGIT_SOFTCAP:
                kq = _dup("SCALE", _dup("UNARY", _dup("SCALE", kq)))
            kq = _dup("SOFT_MAX", kq, mask)
            kqv = _mul_mat(vp, kq)
            perm = _permute(kqv, (0, 2, 1, 3))
            cur = _new("CONT", perm.type, (perm.ne[0] * perm.ne[1], perm.ne[2] * perm.ne[3]), perm)
        g.expand(cur)
        if v_rot is not None:
            cur = self.hadamard(cur, v_rot)
        assert w["attn_output"] is not None
        return self.mm(w["attn_output"], cur, w["attn_output.b"])

    def ffn(self, cur: _T, w: dict[str, _T | None], sfx: str) -> _T:
        """build_ffn with a parallel gate (SwiGLU/GeGLU): up, gate, glu, down."""
        up_w, gate_w, down_w = w["ffn_up" + sfx], w["ffn_gate" + sfx], w["ffn_down" + sfx]
        assert up_w is not None and down_w is not None
        up = self.mm(up_w, cur, w.get("ffn_up.b") if not sfx else None)
        if gate_w is not None:
            gate = self.mm(gate_w, cur, w.get("ffn_gate.b") if not sfx else None)
            act = _new("GLU", gate.type, gate.ne, gate, up)
        else:
            act = _dup("UNARY", up)
        return self.mm(down_w, act, w.get("ffn_down.b") if not sfx else None)

    def moe(self, cur: _T, w: dict[str, _T | None]) -> _T:
        """build_moe_ffn: softmax gating, top-k routing, three mul_mat_id, weighted sum of the experts."""
        s, g = self.s, self.g
        k, T = s.n_expert_used, cur.ne[1]  # the last block only carries the output rows
        assert w["ffn_gate_inp"] is not None and w["ffn_up_exps"] is not None and w["ffn_down_exps"] is not None
        logits = _mul_mat(w["ffn_gate_inp"], cur)
        probs = _dup("SOFT_MAX", logits)
        order = _T("ARGSORT", _I32, probs.ne, (probs,))
        selected = _view(order, (k, T), (order.nb[1], order.nb[2], order.nb[3]))
        weights = _get_rows(_reshape(probs, 1, s.n_expert, T), selected)
        w2 = _reshape(weights, k, T)
        total = _T("CLAMP", _F32, (1, T), (_new("SUM_ROWS", _F32, (1, T), w2),))
        weights = _reshape(_dup("DIV", w2, total), 1, k, T)
        g.expand(weights)
        x = _reshape(cur, s.n_embd, 1, T)
        up = _new("MUL_MAT_ID", _F32, (w["ffn_up_exps"].ne[1], k, T), w["ffn_up_exps"], x, selected)
        if w["ffn_gate_exps"] is not None:
            gate = _new("MUL_MAT_ID", _F32, up.ne, w["ffn_gate_exps"], x, selected)
            act = _new("GLU", _F32, gate.ne, gate, up)
        else:
            act = _dup("UNARY", up)
        experts = _new("MUL_MAT_ID", _F32, (s.n_embd, k, T), w["ffn_down_exps"], act, selected)
        experts = _dup("MUL", experts, weights)
        g.expand(experts)
        views = [_view(experts, (s.n_embd, T), (experts.nb[2], experts.nb[2] * T)) for _ in range(k)]
        for view in views:
            g.expand(view)
        out = views[0]
        for view in views[1:]:
            out = _dup("ADD", out, view)
            g.expand(out)
        if k == 1:
            out = _dup("CONT", out)
        if w["ffn_up_shexp"] is not None:
            out = _dup("ADD", out, self.ffn(cur, w, "_shexp"))
        return out

