"""llama.cpp's tensor_split rounding, simulated, and its inverse."""

from __future__ import annotations

import random

import pytest

from tuner.errors import PlanRequestError
from tuner.split import layer_counts, layer_ranges, tensor_split_for_counts


def test_matches_what_llama_cpp_logged_for_smollm2() -> None:
    # llama.cpp put 19 entries on RPC0 and 12 on RPC1 for -ts 0.6,0.4 (see shared notes).
    assert layer_counts([0.6, 0.4], n_layer=30, n_gpu_layers=99) == [19, 12]


def test_output_layer_lands_on_the_last_device() -> None:
    ranges = layer_ranges([1, 1, 1], n_layer=10, n_gpu_layers=99)
    assert ranges[-1] is not None and ranges[-1][1] == 10


def test_partial_offload_keeps_first_layers_on_cpu() -> None:
    ranges = layer_ranges([1, 1], n_layer=32, n_gpu_layers=16)
    assert ranges == [(17, 24), (25, 32)]


def test_zero_share_device_gets_nothing() -> None:
    assert layer_ranges([1, 0, 1], n_layer=8, n_gpu_layers=99)[1] is None


def test_proportions_are_of_layer_count_not_bytes() -> None:
    assert layer_counts([24, 16], n_layer=80, n_gpu_layers=99) == [49, 32]


@pytest.mark.parametrize("seed", range(5))
def test_inverse_reproduces_counts_exactly(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(300):
        n_layer = rng.randint(1, 126)
        counts = [rng.randint(0, n_layer + 1) for _ in range(rng.randint(1, 4))]
        if not 0 < sum(counts) <= n_layer + 1:
            continue
        split = tensor_split_for_counts(counts, n_layer)
        assert layer_counts(split, n_layer, sum(counts)) == counts


@pytest.mark.parametrize("bad", [[], [0, 0], [-1, 2], [float("nan"), 1]])
def test_bad_splits_are_refused(bad: list[float]) -> None:
    with pytest.raises(PlanRequestError):
        layer_ranges(bad, n_layer=4, n_gpu_layers=5)
