"""Predicts llama.cpp's compute buffers per device by replaying its graph allocator on a rebuilt graph.

llama.cpp sizes each backend's compute buffer at context creation: it builds the worst-case graph
(n_ubatch tokens attending to a full KV cache), lets ``ggml_backend_sched`` split it across backends, and
runs the graph allocator (``ggml-alloc.c``) over it without computing anything. This module does the same
in miniature for llama-style decoders: it rebuilds that graph from the model's shapes (the same ops, in the
same order), assigns backends with the scheduler's rules and replays the allocator's best-fit planning, so
peaks, in-place reuse, copies between devices and fragmentation come out as llama.cpp's do.

What the replay finds, in words (T = n_ubatch tokens, n_kv = cells per sequence stream, f32 = 4 bytes):
- attention without flash attention peaks on KQ = n_kv x T x n_head f32 (softmax runs in place) next to
  the mask copy (n_kv x T f32) and a few n_embd x T activations; with flash attention the peak is its
  output (n_embd_head_v x n_head x T f32) and an F16 mask, and on CUDA with a quantised cache the F16
  copies of the layer's K and V views live inside the flash-attention output allocation;
- the feed-forward phase holds gate, up and the GLU result (3 x n_ff x T f32; MoE: n_ff_exp x n_expert_used);
- the output device holds the logits, n_vocab x T f32, beside result_norm;
- the host buffer holds the graph inputs (token ids, positions, KV row indices - n_embd_v_gqa x T int64
  without flash attention - and the masks), the unused inp_embd branch (n_embd x T f32, never freed), the
  token-embedding rows, and the activations of CPU-resident blocks;
- pipeline parallelism (several devices, everything offloaded) keeps 4 live copies of every stage input
  (masks, positions, indices, the incoming residual) on each device and of every graph input on the host;
- op_offload makes the first CUDA/ROCm device run large-batch matmuls of CPU-resident weights: those
  weights, and the KV views of CPU blocks, are copied into its compute buffer.
Fragmentation decides the rest (up to a few n_embd x T blocks), which is why this module replays rather
than sums.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from pydantic import BaseModel, ConfigDict, Field

from tuner.layout import Layout, RuntimeSettings
from tuner.model import ModelInfo, TensorInfo


@dataclass(frozen=True)
class ComputeBuffers:
    device_bytes: tuple[int, ...]  # compute buffer per device in Layout order (0 for a device with nothing)
    host_bytes: int  # CPU (or CUDA_Host pinned) compute buffer
    output_bytes: int  # the host output buffer (logits/embeddings), llama.cpp logs it separately


class CudaCalibration(BaseModel):
    """How a CUDA/ROCm backend sizes compute tensors. The defaults are ggml-cuda's own rules; with them the
    model reproduces seven H100 runs to the logged 0.01 MiB (tests/data/compute_measurements.json)."""

    model_config = ConfigDict(frozen=True)

    # ggml_backend_cuda_buffer_type_get_alignment
    alignment_bytes: int = Field(default=128, ge=1)
    # GGML_OP_OFFLOAD_MIN_BATCH: matmuls of CPU weights with at least this many rows run on GPU 0.
    op_offload_min_batch: int = Field(default=32, ge=1)
    # The MMA/tile flash-attention kernels convert a quantised K/V view to F16 inside their output allocation
    # (ggml_cuda_flash_attn_ext_get_alloc_size); Ada and newer take the vector kernel up to 2 query rows.
    fa_f16_kv_min_batch: int = Field(default=3, ge=1)
    # Added to every CUDA/ROCm compute buffer: a margin for kernels llama.cpp might pick differently.
    extra_bytes: int = Field(default=0, ge=0)


DEFAULT_CUDA = CudaCalibration()

# ---------------------------------------------------------------------------------------------------------
# Tensor types: (block size, bytes per block).
_F32, _F16, _I32, _I64 = "f32", "f16", "i32", "i64"
_TYPE_SIZES: dict[str, tuple[int, int]] = {_F32: (1, 4), _F16: (1, 2), _I32: (1, 4), _I64: (1, 8), "bf16": (1, 2)}
_CACHE_TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "iq4_nl": "IQ4_NL", "q5_0": "Q5_0", "q5_1": "Q5_1"}
for _name, _enum in _CACHE_TYPES.items():
    _TYPE_SIZES[_name] = GGML_QUANT_SIZES[GGMLQuantizationType[_enum]]


def _type_of(ggml_type: int) -> str:
    """A GGUF tensor type as a key of _TYPE_SIZES (quantised types keyed by their enum name)."""
    try:
        enum = GGMLQuantizationType(ggml_type)
    except ValueError:  # a type newer than gguf-py: its size only matters for op_offload copies
        return _F16
    key = {GGMLQuantizationType.F32: _F32, GGMLQuantizationType.F16: _F16, GGMLQuantizationType.BF16: "bf16"}
    name = key.get(enum, enum.name)
    _TYPE_SIZES.setdefault(name, GGML_QUANT_SIZES[enum])
    return name


def _quantized(type_name: str) -> bool:
    return _TYPE_SIZES[type_name][0] > 1


def _row_bytes(type_name: str, n: int) -> int:
    block, size = _TYPE_SIZES[type_name]
    return size * n // block


# ---------------------------------------------------------------------------------------------------------
# A miniature ggml: tensors with shapes, strides, sources and views; nothing is ever computed.
INPUT, OUTPUT = 1, 2
# ops the allocator may compute in place (ggml_op_can_inplace)
_INPLACE_OPS = frozenset({"SCALE", "ADD", "MUL", "DIV", "SUB", "UNARY", "ROPE", "RMS_NORM", "SOFT_MAX", "CLAMP"})
_VIEW_OPS = frozenset({"VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE"})  # ggml_is_view_op: skipped by the scheduler


class _T:
    """One ggml tensor. ``home`` is the backend owning a pre-allocated buffer (weights, KV cache)."""

    __slots__ = ("allocated", "bid", "buf", "flags", "home", "host", "n_children", "n_views", "name", "nb", "ne",
                 "offset", "op", "size", "src", "type", "view_src", "weight")

    def __init__(self, op: str, type_: str, ne: tuple[int, ...], src: tuple[_T, ...] = (),
                 nb: tuple[int, ...] | None = None, view_src: _T | None = None, name: str = "") -> None:
        self.op = op
        self.type = type_
        self.ne = (*ne, 1, 1, 1, 1)[:4]
        self.nb = nb if nb is not None else _contiguous_nb(type_, self.ne)
        self.src = src
        self.view_src = view_src.view_src or view_src if view_src is not None else None
        self.name = name
        self.flags = 0
        self.home: int | None = None
        self.host = False
        self.weight = False
        self.bid = -1  # the scheduler's backend for this tensor
        # the allocator's bookkeeping (ggml_gallocr's hash_node)
        self.n_children = 0
        self.n_views = 0
        self.allocated = False
        self.buf = -1
        self.offset = 0
        self.size = 0

    @property
    def nbytes(self) -> int:
        block, size = _TYPE_SIZES[self.type]
        if block == 1:
            return size + sum((n - 1) * b for n, b in zip(self.ne, self.nb, strict=True))
        rest = sum((n - 1) * b for n, b in zip(self.ne[1:], self.nb[1:], strict=True))
        return self.ne[0] * self.nb[0] // block + rest

    @property
    def contiguous(self) -> bool:
        return self.nb == _contiguous_nb(self.type, self.ne)


def _contiguous_nb(type_: str, ne: tuple[int, ...]) -> tuple[int, ...]:
    block, size = _TYPE_SIZES[type_]
    nb = [size, size * (ne[0] // block)]
    for i in (2, 3):
        nb.append(nb[-1] * ne[i - 1])
    return tuple(nb)


def _new(op: str, type_: str, ne: tuple[int, ...], *src: _T) -> _T:
    return _T(op, type_, ne, src)


def _dup(op: str, a: _T, *src: _T) -> _T:
    """ggml_dup_tensor: a fresh contiguous tensor shaped like ``a`` (unary/binary ops, norms, rope)."""
    return _T(op, a.type, a.ne, (a, *src))


def _view(a: _T, ne: tuple[int, ...], nb: tuple[int, ...]) -> _T:
    """ggml_view_Nd: ``nb`` gives strides 1..N-1; the missing outer ones follow from the shape."""
    full_ne = (*ne, 1, 1, 1, 1)[:4]
    strides = [a.nb[0], *nb]
    while len(strides) < 4:
        strides.append(strides[-1] * full_ne[len(strides) - 1])
    return _T("VIEW", a.type, full_ne, (a,), nb=tuple(strides), view_src=a)


def _reshape(a: _T, *ne: int) -> _T:
    full = (*ne, 1, 1, 1, 1)[:4]
    return _T("RESHAPE", a.type, full, (a,), view_src=a)


def _permute(a: _T, axes: tuple[int, int, int, int]) -> _T:
    ne = [0] * 4
    nb = [0] * 4
    for i, axis in enumerate(axes):
        ne[axis] = a.ne[i]
        nb[axis] = a.nb[i]
    return _T("PERMUTE", a.type, tuple(ne), (a,), nb=tuple(nb), view_src=a)


def _mul_mat(w: _T, x: _T) -> _T:
    return _new("MUL_MAT", _F32, (w.ne[1], x.ne[1], x.ne[2], x.ne[3]), w, x)


def _get_rows(a: _T, ids: _T) -> _T:
    return _new("GET_ROWS", _I32 if a.type == _I32 else _F32, (a.ne[0], ids.ne[0], ids.ne[1], ids.ne[2]), a, ids)


def _set_rows(dst: _T, src: _T, idxs: _T) -> _T:
    return _T("SET_ROWS", dst.type, dst.ne, (dst, src, idxs), nb=dst.nb, view_src=dst)


class _Graph:
    """Nodes and leafs in ggml's order: post-order DFS from every ggml_build_forward_expand call."""

    def __init__(self) -> None:
        self.nodes: list[_T] = []
        self.leafs: list[_T] = []
        self._seen: set[int] = set()

    def expand(self, root: _T) -> None:
        if id(root) in self._seen:
            return
        self._seen.add(id(root))
        stack: list[tuple[_T, int]] = [(root, 0)]
        while stack:
            tensor, i = stack.pop()
            if i < len(tensor.src):
                stack.append((tensor, i + 1))
                src = tensor.src[i]
                if id(src) not in self._seen:
                    self._seen.add(id(src))
                    stack.append((src, 0))
                continue
            (self.leafs if tensor.op == "NONE" else self.nodes).append(tensor)


# ---------------------------------------------------------------------------------------------------------
# The decoder graph (src/models/llama.cpp, qwen2/qwen3, gemma3 and llm_graph_context's helpers).
# Architectures whose graph adds sqrt(n_embd) scaling of the embeddings as a separate op.
_EMBD_SCALED = frozenset({"gemma", "gemma2", "gemma3", "gemma-embedding"})
# Architectures that cap the final logits with scale -> tanh -> scale (all in place).
_LOGIT_SOFTCAP = frozenset({"gemma2"})


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

    @staticmethod
    def of(model: ModelInfo) -> _Shape:
        return _Shape(
            arch=model.architecture, n_layer=model.n_layer, n_embd=model.n_embd, n_vocab=model.n_vocab,
            n_head=model.n_head, n_head_kv=model.n_head_kv, n_ff=model.n_ff, head_k=model.n_embd_head_k,
            head_v=model.n_embd_head_v, swa=model.swa_layers if model.n_swa > 0 else (False,) * model.n_layer,
            n_swa=model.n_swa, n_expert=model.n_expert, n_expert_used=model.n_expert_used,
            n_ff_exp=model.n_ff_exp, weights=tuple(_weight_entry(t) for t in model.tensors),
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
        ffn_inp = _dup("ADD", cur, inpSA)
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
            v_nel = v_cache.ne[0] * v_cache.ne[1] * v_cache.ne[2]
            g.expand(_set_rows(_reshape(v_cache, 1, v_nel), _reshape(v_cur, 1, n_embd_v * T), v_idxs))
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


# ---------------------------------------------------------------------------------------------------------
# The scheduler (ggml_backend_sched_split_graph): backend per node, splits, copies of foreign inputs.
@dataclass
class _Split:
    backend: int
    start: int  # first node in the graph
    end: int = 0
    inputs: list[_T] = field(default_factory=list)  # tensors copied in from other backends, in first-use order


def _op_batch(t: _T) -> int:
    """get_op_batch_size in ggml-cuda.cu: the rows an offloaded op would process."""
    if t.op == "GET_ROWS":
        return 0
    if t.op == "MUL_MAT":
        return t.ne[1]
    if t.op in ("MUL_MAT_ID", "ROPE"):
        return t.ne[2]
    return t.ne[1] * t.ne[2] * t.ne[3]


def _schedule(g: _Graph, kinds: tuple[str, ...], n_copies: int, offloaders: tuple[bool, ...],
              op_offload_min_batch: int) -> tuple[list[_T], list[int], list[_T], list[int]]:
    """Returns the scheduler's graph copy: nodes and leafs with the backend (buffer) each is allocated in."""
    cpu = len(kinds) - 1

    def get(t: _T | None) -> int:
        return -1 if t is None else t.bid

    def owner(t: _T) -> int:
        if t.home is not None:
            return t.home
        if t.view_src is not None and t.view_src.home is not None:
            return t.view_src.home
        return t.view_src.bid if t.bid == -1 and t.view_src is not None else t.bid

    def from_cur(t: _T) -> int:
        if t.home is not None:
            return t.home
        if t.view_src is not None and t.view_src.home is not None:
            return t.view_src.home
        if t.flags & INPUT:
            return cpu  # graph inputs are filled on the host
        if t.op in ("ROPE", "FLASH_ATTN_EXT"):
            return -1
        for src in t.src:
            if src.weight:
                assert src.home is not None
                # op_offload: a GPU that wants a large batch of this CPU-weight op takes it
                if src.host and any(offloaders) and _op_batch(t) >= op_offload_min_batch:
                    return offloaders.index(True)
                return src.home
        return -1

    # pass 1: pre-allocated tensors, inputs and ops with weights
    for t in g.leafs + g.nodes:
        if get(t) == -1:
            t.bid = from_cur(t)
    # pass 2: spread device assignments to neighbours (devices first, the CPU last)
    compute = [t for t in g.nodes if t.op not in _VIEW_OPS]
    for sequence, skip_cpu in ((compute, True), (compute[::-1], True), (compute, False), (compute[::-1], False)):
        cur = -1
        for t in sequence:
            x = get(t)
            if x != -1:
                cur = -1 if (skip_cpu and x == cpu) else x
            elif cur != -1:
                t.bid = cur
    # pass 3: unassigned nodes go to the backend holding most of their inputs
    for t in compute:
        if get(t) == -1:
            best, best_n = 0, -1
            for b in range(len(kinds)):
                n = sum(1 for s in t.src if (get(s) != -1 or get(s.view_src) != -1) and owner(s) == b)
                if n > best_n:
                    best, best_n = b, n
            t.bid = best
    # pass 4: views follow their source, sources follow their user
    for t in g.nodes:
        if t.view_src is not None and get(t) == -1:
            t.bid = get(t.view_src)
        for s in t.src:
            if get(s) == -1:
                s.bid = get(s.view_src) if s.view_src is not None else get(t)
        if get(t) == -1:
            t.bid = 0
    # pass 5: split where the backend changes; copy every input that lives elsewhere
    splits: list[_Split] = []
    copies: dict[tuple[int, int], list[_T]] = {}
    srcs = {id(t): list(t.src) for t in g.nodes}
    first = next((i for i, t in enumerate(g.nodes) if t.op not in _VIEW_OPS), 0)
    split = _Split(get(g.nodes[first]), 0)
    splits.append(split)
    for i in range(first, len(g.nodes)):
        t = g.nodes[i]
        if t.op in _VIEW_OPS:
            continue
        x = get(t)
        need_new = x == split.backend and bool(split.inputs) and any(
            s.weight and get(s) != split.backend and owner(s) != split.backend for s in t.src)
        if x != split.backend or need_new:
            split.end = i
            split = _Split(x, i)
            splits.append(split)
        node_srcs = srcs[id(t)]
        for j, s in enumerate(node_srcs):
            if get(s) != split.backend and owner(s) != split.backend:
                key = (id(s), split.backend)
                if key not in copies:
                    made = []
                    for _ in range(n_copies):
                        c = _T("NONE", s.type, s.ne, nb=s.nb, name=f"copy:{s.name}")
                        if n_copies > 1:
                            c.flags |= INPUT | OUTPUT  # each pipeline stage keeps its own live copy
                        made.append(c)
                    copies[key] = made
                    split.inputs.append(s)
                node_srcs[j] = copies[key][0]
    split.end = len(g.nodes)
    for t in g.nodes:
        t.src = tuple(srcs[id(t)])
    # pass 6 (pipeline parallelism): every graph input gets n_copies live copies on its backend
    graph_inputs: list[_T] = []
    if n_copies > 1:
        for leaf in g.leafs:
            if leaf.flags & INPUT:
                leaf.flags |= OUTPUT
                made = [leaf]
                for _ in range(n_copies - 1):
                    c = _T("NONE", leaf.type, leaf.ne, nb=leaf.nb)
                    c.flags |= INPUT | OUTPUT
                    made.append(c)
                copies[(id(leaf), get(leaf))] = made
                graph_inputs.append(leaf)
    # the graph copy: each split's inputs (a dependency on the source, then the copy) before its nodes
    nodes: list[_T] = []
    node_ids: list[int] = []
    for split in splits:
        for s in split.inputs:
            nodes.append(_T("NONE", s.type, s.ne, (s,), nb=s.nb, view_src=s))
            node_ids.append(get(s))
            nodes.append(copies[(id(s), split.backend)][0])
            node_ids.append(split.backend)
        for t in g.nodes[split.start:split.end]:
            nodes.append(t)
            node_ids.append(get(t))
    leafs: list[_T] = []
    leaf_ids: list[int] = []
    if n_copies > 1:
        for leaf in graph_inputs:
            leafs += copies[(id(leaf), get(leaf))]
            leaf_ids += [get(leaf)] * n_copies
        for split in splits:
            for s in split.inputs:
                leafs += copies[(id(s), split.backend)]
                leaf_ids += [split.backend] * n_copies
    leafs += g.leafs
    leaf_ids += [get(t) for t in g.leafs]
    return nodes, node_ids, leafs, leaf_ids


# ---------------------------------------------------------------------------------------------------------
# The graph allocator (ggml-alloc.c): best-fit free blocks, in-place reuse, free after the last use.
_HUGE = (1 << 64) // 4


class _Arena:
    """ggml_dyn_tallocr with one chunk: free blocks sorted by offset, the last one the open tail."""

    def __init__(self, alignment: int) -> None:
        self.alignment = alignment
        self.blocks: list[list[int]] = [[0, _HUGE]]
        self.max_size = 0

    def _align(self, size: int) -> int:
        return -(-size // self.alignment) * self.alignment

    def alloc(self, size: int) -> int:
        size = self._align(size)
        best, best_size = -1, _HUGE * 2
        for i in range(len(self.blocks) - 1):
            block_size = self.blocks[i][1]
            if size <= block_size <= best_size:
                best, best_size = i, block_size
        if best == -1:
            best = len(self.blocks) - 1
        block = self.blocks[best]
        offset = block[0]
        block[0] += size
        block[1] -= size
        if block[1] == 0:
            del self.blocks[best]
        self.max_size = max(self.max_size, offset + size)
        return offset

    def free(self, offset: int, size: int) -> None:
        size = self._align(size)
        blocks = self.blocks
        for i, block in enumerate(blocks):
            if block[0] + block[1] == offset:
                block[1] += size
                if i + 1 < len(blocks) and block[0] + block[1] == blocks[i + 1][0]:
                    block[1] += blocks[i + 1][1]
                    del blocks[i + 1]
                return
            if offset + size == block[0]:
                block[0] = offset
                block[1] += size
                if i > 0 and blocks[i - 1][0] + blocks[i - 1][1] == block[0]:
                    blocks[i - 1][1] += block[1]
                    del blocks[i]
                return
        pos = 0
        while pos < len(blocks) and blocks[pos][0] < offset:
            pos += 1
        blocks.insert(pos, [offset, size])


def _allocate(nodes: list[_T], node_ids: list[int], leafs: list[_T], leaf_ids: list[int],
              arenas: list[_Arena], alloc_size: Callable[[_T, int], int]) -> None:
    """ggml_gallocr_alloc_graph_impl: plans every tensor's offset; the arenas record the peaks."""

    def allocate(t: _T, backend: int) -> None:
        if t.allocated or t.home is not None or t.view_src is not None:
            return
        t.allocated = True
        if t.op in _INPLACE_OPS:
            for parent in t.src:
                if not parent.allocated or parent.flags & OUTPUT:
                    continue
                if parent.type != t.type or parent.ne != t.ne or parent.nb != t.nb:
                    continue
                if parent.n_children == 1 and parent.n_views == 0:
                    t.buf, t.offset, t.size = parent.buf, parent.offset, parent.size
                    parent.allocated = False  # the child now owns the memory
                    return
        t.buf = backend
        t.size = alloc_size(t, backend)
        t.offset = arenas[backend].alloc(t.size)

    def free(t: _T) -> None:
        if not t.flags & OUTPUT:
            arenas[t.buf].free(t.offset, t.size)
            t.allocated = False

    for leaf, backend in zip(leafs, leaf_ids, strict=True):
        allocate(leaf, backend)
    for t, backend in zip(nodes, node_ids, strict=True):
        if t.view_src is not None and t.op != "NONE":
            t.view_src.n_views += 1
        if t.flags & INPUT:
            allocate(t, backend)
        for src in t.src:
            src.n_children += 1
            if src.flags & INPUT:
                allocate(src, backend)
    for t, backend in zip(nodes, node_ids, strict=True):
        for parent in t.src:
            allocate(parent, backend)
        allocate(t, backend)
        for parent in t.src:
            parent.n_children -= 1
            if parent.n_children == 0 and parent.n_views == 0:
                if parent.view_src is not None:
                    vs = parent.view_src
                    vs.n_views -= 1
                    if vs.n_views == 0 and vs.n_children == 0 and vs.allocated:
                        free(vs)
                elif parent.allocated:
                    free(parent)


# ---------------------------------------------------------------------------------------------------------
# Putting it together.
_CPU_ALIGNMENT = 32  # TENSOR_ALIGNMENT: the CPU, CUDA_Host and CPU-backed RPC buffer types
_GGML_SCHED_MAX_COPIES = 4  # llama.cpp's default build: four pipeline stages in flight
_MATRIX_ROW_PADDING = 512  # ggml-cuda pads quantised rows so kernels may overrun them


def _cuda_alloc_size(t: _T, cuda: CudaCalibration) -> int:
    """ggml_backend_cuda_buffer_type_get_alloc_size."""
    size = t.nbytes
    if t.op == "FLASH_ATTN_EXT" and t.src[0].ne[1] >= cuda.fa_f16_kv_min_batch:
        k, v = t.src[1], t.src[2]
        for kv in (k, v):
            if kv.type != _F16:
                size = -(-size // 128) * 128 + kv.ne[0] * kv.ne[1] * kv.ne[2] * kv.ne[3] * 2
    if _quantized(t.type) and t.ne[0] % _MATRIX_ROW_PADDING:
        size += _row_bytes(t.type, _MATRIX_ROW_PADDING - t.ne[0] % _MATRIX_ROW_PADDING)
    return size


def _resolve(settings: RuntimeSettings, n_swa: int, tg: bool) -> _Run:
    """The reserve ubatch of llama_context::sched_reserve (pp graph) or its one-token-per-sequence twin."""
    n_seq = settings.n_seq_max
    n_ctx = -(-settings.n_ctx // 256) * 256
    n_batch = min(settings.n_ctx, settings.n_batch)  # causal models: a batch never exceeds the context
    n_ubatch = min(n_batch, settings.n_ubatch)
    n_ctx_seq = n_ctx if settings.kv_unified else -(-(n_ctx // n_seq) // 256) * 256
    n_swa_cells = -(-min(n_ctx_seq, n_swa * (n_seq if settings.kv_unified else 1) + n_ubatch) // 256) * 256
    if tg:
        n_tokens = n_outputs = n_seq
    else:
        n_tokens = min(n_ctx, n_ubatch)
        n_outputs = min(n_tokens, n_batch)
        n_tokens = -(-n_tokens // n_seq) * n_seq
    return _Run(
        n_tokens=n_tokens, n_outputs=n_outputs, n_seqs=n_seq, n_stream=1 if settings.kv_unified else n_seq,
        n_kv=n_ctx_seq, n_kv_swa=n_ctx_seq if settings.swa_full else n_swa_cells,
        flash_attn=settings.flash_attn, type_k=settings.type_k, type_v=settings.type_v,
    )


@lru_cache(maxsize=4096)
def _simulate(shape: _Shape, run: _Run, kinds: tuple[str, ...], plan: tuple[_Layer, ...], out_home: int,
              n_copies: int, full_offload: bool, offloaders: tuple[bool, ...],
              cuda: CudaCalibration) -> tuple[int, ...]:
    """Compute-buffer bytes of every backend (devices, then the host) for one reserve graph."""
    cpu = len(kinds) - 1
    decoder = _Decoder(shape, run, plan, out_home, cpu, pin_norms=full_offload or run.n_tokens < 32)
    graph = decoder.build()
    nodes, node_ids, leafs, leaf_ids = _schedule(graph, kinds, n_copies, offloaders, cuda.op_offload_min_batch)
    gpu = [k in ("cuda", "rocm") for k in kinds]
    arenas = [_Arena(cuda.alignment_bytes if g else _CPU_ALIGNMENT) for g in gpu]

    def alloc_size(t: _T, backend: int) -> int:
        return _cuda_alloc_size(t, cuda) if gpu[backend] else t.nbytes

    _allocate(nodes, node_ids, leafs, leaf_ids, arenas, alloc_size)
    return tuple(a.max_size + (cuda.extra_bytes if g and a.max_size else 0) for a, g in zip(arenas, gpu, strict=True))


# Graph compression: a run of equal blocks on one backend reaches its peak within its first blocks, so long
# runs are shortened before the replay (whole periods of the layer pattern are dropped from the middle).
# KEEP_PERIODS periods stay at each end of a run; tests/test_compute_model.py checks that the shortened
# replay equals the full one.
_KEEP_PERIODS = 2
_MAX_PERIOD = 12


@lru_cache(maxsize=64)
def _representatives(shape: _Shape, with_types: bool) -> tuple[int, ...]:
    """For every layer, the first layer with the same structure (and weight types when they matter)."""
    per_layer: list[list[tuple[str, str | None, tuple[int, ...]]]] = [[] for _ in range(shape.n_layer)]
    for name, type_, ne in shape.weights:
        if name.startswith("blk."):
            _, il, rest = name.split(".", 2)
            if int(il) < shape.n_layer:
                per_layer[int(il)].append((rest, type_ if with_types else None, ne))
    first: dict[tuple[object, ...], int] = {}
    reps = []
    for il in range(shape.n_layer):
        key = (shape.n_head[il], shape.n_head_kv[il], shape.n_ff[il], shape.swa[il], tuple(sorted(per_layer[il])))
        reps.append(first.setdefault(key, il))
    return tuple(reps)


def _compress(kinds: list[int]) -> list[int]:
    """Indices to keep from one run of blocks on the same backend."""
    n = len(kinds)
    best = (0, 0, 1)  # (length, start, period) of the longest periodic stretch
    for period in range(1, min(_MAX_PERIOD, n // 2) + 1):
        start = 0
        for j in range(n - period + 1):
            if j == n - period or kinds[j] != kinds[j + period]:
                length = j + period - start
                if length > best[0]:
                    best = (length, start, period)
                start = j + 1
    length, start, period = best
    drop = (length - 2 * _KEEP_PERIODS * period) // period * period
    if drop <= 0:
        return list(range(n))
    cut = start + _KEEP_PERIODS * period
    return [*range(cut), *range(cut + drop, n)]


def _plan(shape: _Shape, homes: list[int], cpu_types: bool, compress: bool) -> tuple[_Layer, ...]:
    """The blocks to rebuild; ``cpu_types``: CPU-resident blocks differ by weight type (op_offload copies)."""
    typed, plain = _representatives(shape, True), _representatives(shape, False)
    cpu = max(homes)
    reps = [typed[il] if cpu_types and homes[il] == cpu else plain[il] for il in range(shape.n_layer)]
    keep: list[int] = []
    start = 0
    for il in range(1, shape.n_layer + 1):
        if il == shape.n_layer or homes[il] != homes[start]:
            run = list(range(start, il))
            kept = _compress([reps[j] for j in run]) if compress else range(len(run))
            keep += [run[j] for j in kept]
            start = il
    return tuple(_Layer(reps[il], homes[il], il == shape.n_layer - 1) for il in keep)


_SHAPES: dict[int, tuple[ModelInfo, _Shape]] = {}


def _shape_of(model: ModelInfo) -> _Shape:
    cached = _SHAPES.get(id(model))
    if cached is None or cached[0] is not model:
        cached = (model, _Shape.of(model))
        if len(_SHAPES) > 64:
            _SHAPES.clear()
        _SHAPES[id(model)] = cached
    return cached[1]


def pipeline_parallel(layout: Layout) -> bool:
    """Whether llama.cpp turns on pipeline parallelism (GGML_SCHED_MAX_COPIES graph copies in flight).

    llama_context's rule: more than one device, every block and the output layer offloaded, split mode
    "layer", and every device able to run asynchronously with events (CUDA, HIP and RPC all can).
    """
    return len(layout.device_backends) > 1 and layout.all_offloaded and layout.split_mode == "layer"


def estimate_compute(model: ModelInfo, settings: RuntimeSettings, layout: Layout,
                     cuda: CudaCalibration = DEFAULT_CUDA, *,
                     remote: Sequence[bool] | None = None) -> ComputeBuffers:
    """llama.cpp's compute buffer per device and on the host, and its output (logits) buffer.

    Each buffer is the larger of the prompt-sized reserve graph (n_ubatch tokens) and the one-token-per-
    sequence graph, as llama.cpp reserves both and keeps the larger buffer. ``remote[d]`` marks RPC
    devices: they size tensors like their backend but never take op_offload work (no offload_op).
    """
    return _estimate(model, settings, layout, cuda, compress=True, remote=remote)


def _estimate(model: ModelInfo, settings: RuntimeSettings, layout: Layout, cuda: CudaCalibration,
              compress: bool, remote: Sequence[bool] | None = None) -> ComputeBuffers:
    shape = _shape_of(model)
    kinds = (*layout.device_backends, "cpu")
    cpu = len(kinds) - 1
    homes = []
    for il in range(model.n_layer + 1):
        device = layout.device_of_layer(il)
        if layout.split_mode == "row" and device is not None:
            device = layout.main_gpu  # row split: the main GPU runs everything but the split matmuls
        homes.append(cpu if device is None else device)
    # op_offload: the first local CUDA/ROCm device runs large matmuls of CPU weights (it copies them in,
    # so their types matter then)
    remote = tuple(remote) if remote is not None else (False,) * len(layout.device_backends)
    offloaders = tuple(settings.op_offload and k in ("cuda", "rocm") and not r
                       for k, r in zip(layout.device_backends, remote, strict=True))
    plan = _plan(shape, homes, any(offloaders), compress)
    n_copies = _GGML_SCHED_MAX_COPIES if pipeline_parallel(layout) else 1
    sizes = [0] * len(kinds)
    for tg in (False, True):
        run = _resolve(settings, model.n_swa, tg)
        sim = _simulate(shape, run, kinds, plan, homes[model.n_layer], n_copies, layout.all_offloaded,
                        offloaders, cuda)
        sizes = [max(a, b) for a, b in zip(sizes, sim, strict=True)]
    # output_reserve(n_seq_max): one row of logits per sequence, float32
    output_bytes = model.n_vocab * settings.n_seq_max * 4
    return ComputeBuffers(tuple(sizes[:cpu]), sizes[cpu], output_bytes)
