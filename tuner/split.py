"""llama.cpp's tensor_split rule, simulated bit for bit, and its inverse.

llama.cpp (src/llama-model.cpp, load_tensors) turns ``tensor_split`` into cumulative fractions in float32 and
gives entry ``il`` (block, or the output layer at ``il == n_layer``) to the first device whose cumulative
fraction is greater than ``(il - i_gpu_start) / act_gpu_layers`` (std::upper_bound). Proportions are of layer
COUNT, not bytes, and the rounding can move a layer to a neighbour; the planner therefore thinks in layer
counts and converts them back with ``tensor_split_for_counts``, checked against the simulation.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

import numpy as np

from tuner.errors import PlanRequestError


def layer_counts(tensor_split: Sequence[float], n_layer: int, n_gpu_layers: int) -> list[int]:
    """How many entries (blocks + output layer) llama.cpp gives each device for this split."""
    ranges = layer_ranges(tensor_split, n_layer, n_gpu_layers)
    return [0 if r is None else r[1] - r[0] + 1 for r in ranges]


def layer_ranges(
    tensor_split: Sequence[float], n_layer: int, n_gpu_layers: int
) -> list[tuple[int, int] | None]:
    """Inclusive entry range per device; index ``n_layer`` is the output layer."""
    n_devices = len(tensor_split)
    if n_devices == 0:
        raise PlanRequestError("tensor_split is empty; give one proportion per device")
    if any(not np.isfinite(v) or v < 0 for v in tensor_split):
        raise PlanRequestError(f"tensor_split {list(tensor_split)} has a negative or non-finite entry")
    splits = np.asarray(tensor_split, dtype=np.float32)
    if not splits.any():
        raise PlanRequestError("tensor_split is all zeros; llama.cpp would split by free memory instead")
    # float32 running sum then division, as llama.cpp does (split_sum is a float).
    cumulative = np.cumsum(splits, dtype=np.float32)
    cumulative = (cumulative / cumulative[-1]).astype(np.float32).tolist()

    i_gpu_start = max(n_layer + 1 - n_gpu_layers, 0)
    act_gpu_layers = min(n_gpu_layers, n_layer + 1)
    ranges: list[tuple[int, int] | None] = [None] * n_devices
    for il in range(i_gpu_start, n_layer + 1):
        position = float(np.float32(il - i_gpu_start) / np.float32(act_gpu_layers))
        device = min(bisect_right(cumulative, position), n_devices - 1)
        current = ranges[device]
        ranges[device] = (il, il) if current is None else (current[0], il)
    return ranges


def tensor_split_for_counts(counts: Sequence[int], n_layer: int) -> tuple[float, ...]:
    """Proportions that make llama.cpp place exactly ``counts`` entries on each device.

    The counts themselves are the natural proportions; float32 rounding could still shift a boundary, so the
    result is verified against the simulation and nudged (by a hundredth of a layer) where needed.
    """
    n_gpu_layers = sum(counts)
    if n_gpu_layers == 0:
        return tuple(0.0 for _ in counts)
    proportions = [float(c) for c in counts]
    for _ in range(4 * len(counts) + 1):
        got = layer_counts(proportions, n_layer, n_gpu_layers)
        if got == list(counts):
            return tuple(proportions)
        # Search method: move the first wrong boundary by a small step towards the wanted count; stops when
        # the simulation agrees (at most a few steps: the error is one layer at a float32 tie).
        for index, (want, have) in enumerate(zip(counts, got, strict=True)):
            if want != have:
                proportions[index] += 0.01 if want > have else -0.01
                break
    raise PlanRequestError(f"cannot express layer counts {list(counts)} as a llama.cpp tensor_split")
