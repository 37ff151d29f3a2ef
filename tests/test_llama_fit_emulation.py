"""The --fit emulation (bench/llama_fit.py) on cases whose answer can be reasoned by hand from fit.cpp.

Every byte figure comes from our memory model, recomputed here independently of the emulation's oracle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from bench.llama_fit import FIT_MIN_CTX, FitRequest, FitResult, fit_params
from tuner.devices import Device
from tuner.errors import PlanRequestError
from tuner.gguf import read_model
from tuner.inventory import discover_devices
from tuner.memory.overhead import device_overhead_bytes
from tuner.memory.predict import MemoryModel
from tuner.model import ModelInfo
from tuner.plan import PlanRequest
from tuner.planner import resolve_settings
from tuner.split import layer_counts

GiB = 1024**3


def used_bytes(model: ModelInfo, devices: Sequence[Device], n_ctx: int, counts: Sequence[int]) -> list[int]:
    """llama.cpp's buffers per device (weights + KV + compute, no CUDA context) for this placement."""
    memory = MemoryModel(model, devices, resolve_settings(model, devices, PlanRequest(n_ctx=n_ctx)))
    prediction = memory.predict(memory.layout(counts), exact=True)
    return [dm.total_bytes - dm.overhead_bytes for dm in prediction.devices]


def free_as_llama_sees_it(devices: Sequence[Device]) -> list[int]:
    return [d.free_bytes - device_overhead_bytes(d) for d in devices]


def margins(model: ModelInfo, devices: Sequence[Device], result: FitResult) -> list[int]:
    used = used_bytes(model, devices, result.n_ctx, result.counts)
    return [free - u for free, u in zip(free_as_llama_sees_it(devices), used, strict=True)]


@pytest.fixture(scope="module")
def llama_70b(synth_model: Callable[[str], Path]) -> ModelInfo:
    return read_model(synth_model("llama-70b-q4_k_m"))


@pytest.fixture(scope="module")
def llama_8b(synth_model: Callable[[str], Path]) -> ModelInfo:
    return read_model(synth_model("llama-8b-q4_0"))


@pytest.mark.parametrize("n_ctx", [None, 1024], ids=["ctx-unset", "ctx-1024"])
def test_fit_changes_nothing_when_the_model_fits(synth_model: Callable[[str], Path], n_ctx: int | None) -> None:
    model = read_model(synth_model("tiny-llama-q4_0"))
    devices = discover_devices(gpus="24GiB,16GiB")
    result = fit_params(model, devices, FitRequest(n_ctx=n_ctx))
    assert result.status == "success"
    assert result.n_dry_runs == 1  # step 1 only
    assert result.n_ctx == (n_ctx or model.n_ctx_train)  # -c unset: the training context, untouched
    assert result.n_gpu_layers == model.n_layer + 1 and not result.n_gpu_layers_set
    assert result.tensor_split is None  # left to llama.cpp's split by free memory
    assert sum(result.counts) == model.n_layer + 1


def test_fit_with_ctx_unset_drops_to_the_min_context_before_moving_layers(llama_70b: ModelInfo) -> None:
    devices = discover_devices(gpus="24GiB,16GiB")
    free = free_as_llama_sees_it(devices)
    n_entries = llama_70b.n_layer + 1
    # By hand: even at 4096 the whole model overflows the two cards' budgets, so the context stops at the floor.
    default_counts = layer_counts(free, llama_70b.n_layer, n_entries)  # llama.cpp's split by free memory
    assert sum(used_bytes(llama_70b, devices, FIT_MIN_CTX, default_counts)) > sum(free) - 2 * GiB

    result = fit_params(llama_70b, devices, FitRequest())
    assert result.status == "success"
    assert result.n_ctx == FIT_MIN_CTX
    assert result.n_gpu_layers < n_entries and result.n_gpu_layers_set
    assert result.tensor_split == tuple(float(c) for c in result.counts)
    # Back to front, each card holds as many whole layers as keep its 1 GiB: one more breaks its target,
    # measured as fit.cpp measured it (the card in front still empty while the last card was filled).
    last, first = result.counts[1], result.counts[0]
    assert used_bytes(llama_70b, devices, FIT_MIN_CTX, [0, last + 1])[1] > free[1] - GiB
    assert used_bytes(llama_70b, devices, FIT_MIN_CTX, [first + 1, last])[0] > free[0] - GiB


@pytest.mark.parametrize("target_gib", [1, 2])
@pytest.mark.parametrize("n_ctx", [None, 8192], ids=["ctx-unset", "ctx-8192"])
def test_fit_keeps_its_margin_on_every_card_when_layers_stay_on_the_cpu(
    llama_70b: ModelInfo, n_ctx: int | None, target_gib: int
) -> None:
    devices = discover_devices(gpus="RTX 4090,RTX 4080")
    result = fit_params(llama_70b, devices, FitRequest(n_ctx=n_ctx, target_bytes=target_gib * GiB))
    assert result.n_gpu_layers < llama_70b.n_layer + 1
    if n_ctx is not None:
        assert result.n_ctx == n_ctx  # a context the user set is never changed
    assert all(m >= target_gib * GiB for m in margins(llama_70b, devices, result))
    assert result.margin_bytes == tuple(margins(llama_70b, devices, result))


def test_fit_on_one_card_interpolates_the_context_and_keeps_every_layer(llama_8b: ModelInfo) -> None:
    devices = discover_devices(gpus="16GiB")
    result = fit_params(llama_8b, devices, FitRequest())
    # 8B Q4_0 is 4.3 GiB and its f16 cache 16 GiB at 131072: the context alone can make room.
    assert FIT_MIN_CTX < result.n_ctx < llama_8b.n_ctx_train
    assert result.n_ctx % 256 == 0
    assert result.reason == "fit by reducing the context" and not result.n_gpu_layers_set
    assert result.counts == (llama_8b.n_layer + 1,)
    assert margins(llama_8b, devices, result)[0] >= GiB


def test_fit_checks_only_the_card_it_fills_so_pipeline_buffers_can_eat_the_last_cards_margin(
    llama_8b: ModelInfo,
) -> None:
    """fit.cpp compares a dry run with the target of the card being filled only. When the first card takes
    the last CPU layer, llama.cpp turns on pipeline parallelism and every card's compute buffer grows; the
    last card, filled earlier, is not measured again and ends below its 1 GiB."""
    devices = discover_devices(gpus="12GiB,8GiB")
    result = fit_params(llama_8b, devices, FitRequest())
    assert result.n_gpu_layers == llama_8b.n_layer + 1  # every layer on the cards
    last = result.counts[1]
    free = free_as_llama_sees_it(devices)
    assert used_bytes(llama_8b, devices, result.n_ctx, [0, last])[1] <= free[1] - GiB  # when it was filled
    final = margins(llama_8b, devices, result)
    assert final[0] >= GiB
    assert 0 < final[1] < GiB


def test_fit_refuses_to_move_layers_the_user_placed_but_keeps_the_shorter_context(llama_8b: ModelInfo) -> None:
    devices = discover_devices(gpus="6GiB,4GiB")
    result = fit_params(llama_8b, devices, FitRequest(n_gpu_layers=llama_8b.n_layer + 1))
    assert result.status == "failure"
    assert "n_gpu_layers already set by user" in result.reason
    assert FIT_MIN_CTX <= result.n_ctx < llama_8b.n_ctx_train  # step 2 ran before the abort
    assert result.tensor_split is None and result.n_gpu_layers == llama_8b.n_layer + 1


def test_fit_emulation_refuses_mixture_of_experts_models(synth_model: Callable[[str], Path]) -> None:
    model = read_model(synth_model("tiny-moe-q5_k_m"))
    with pytest.raises(PlanRequestError, match="dense models only"):
        fit_params(model, discover_devices(gpus="24GiB,16GiB"), FitRequest())
