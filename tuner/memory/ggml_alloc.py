"""Replays ggml-alloc.c's graph allocator over the scheduler's graph copy; the arenas record each buffer's peak.

Package-private.
"""

from __future__ import annotations

from collections.abc import Callable

from tuner.memory.ggml_graph import _INPLACE_OPS, _T, INPUT, OUTPUT

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

