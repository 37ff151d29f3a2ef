"""A miniature of ggml's graph API for the compute-buffer model: tensor records, views and expand order.

Tensors carry types, shapes, strides, sources and view links, plus the scheduler's and allocator's
bookkeeping; nothing is ever computed. Package-private: used by reserve_graph, ggml_sched and ggml_alloc.
"""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

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
        self.view_src: _T | None = view_src.view_src or view_src if view_src is not None else None
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

