"""Replays ggml_backend_sched's backend assignment for a rebuilt graph (ggml-backend.cpp).

Assigns every node a backend, splits the graph where the backend changes and adds the copies of inputs
that live elsewhere (4 live copies each under pipeline parallelism). Package-private.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tuner.memory.ggml_graph import _T, _VIEW_OPS, INPUT, OUTPUT, _Graph


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

