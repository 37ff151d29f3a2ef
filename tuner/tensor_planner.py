"""Planning split mode "tensor": proportions and offloaded layers for llama.cpp's tensor parallelism.

Every offloaded layer is cut across all devices (tuner.memory.tensor_split), so a placement is a pair
(proportions, n_gpu_layers) rather than per-device layer counts. The steps:

  Step 1. Refuse what llama.cpp refuses or crashes on, each with a one-line reason: flash attention off, an
          architecture without tensor-split rules, a cut that ggml cannot represent (a KV slice that is not
          whole blocks of a quantised cache; a row of exactly one quantisation block cut with a device getting
          nothing, which aborts the load with "tensor write out of bounds").
  Step 2. For a given n_gpu_layers, each device's bytes are affine in its proportion p: a fixed part (mirrored
          tensors, the full-size compute buffer, the all-reduce scratch) plus p x the split tensors and cache.
          Two evaluations per device give both parts, hence the largest share each device can hold.
  Step 3. Proportions: "speed" gives each device a share proportional to its bandwidth (the slowest slice sets
          the pace) capped at what it holds (water-filling, bisection on the common rate); "balanced" gives
          shares proportional to what each holds (equal headroom). Rounded to tenths of a percent, evaluated
          exactly (granularity moves whole heads), and nudged by a percent at a time off a device that is over.
  Step 4. n_gpu_layers: the most entries whose proportions fit, by bisection (memory grows with the count).

A tensor_split or n_gpu_layers the user gave is evaluated as given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tuner.devices import Device
from tuner.errors import PlanRequestError
from tuner.layout import Layout
from tuner.memory.compute import ComputeBuffers, estimate_compute
from tuner.memory.predict import DeviceMemory, MemoryPrediction
from tuner.memory.tensor_split import (
    MIRRORED,
    TENSOR_UNSUPPORTED_ARCHITECTURES,
    TensorSplitModel,
    device_weight_bytes,
    meta_backend,
)
from tuner.model import ModelInfo
from tuner.plan import Plan, PlanRequest
from tuner.planner import Candidate, LayerPlanner, plan
from tuner.speed import (
    DEFAULT_SPEED_MODEL,
    SpeedModel,
    allreduce_steps_per_token,
    calibrate_allreduce,
    layer_split_batch_tokens_per_s,
    tensor_split_batch_tokens_per_s,
    tensor_split_token_time_s,
)

PROPORTION_STEP = 0.001  # proportions are rounded to tenths of a percent
NUDGE = 0.01  # what Step 3 moves off an overfull device per try


def check_tensor_request(planner: LayerPlanner) -> None:
    """Step 1, the settings part: raise PlanRequestError with llama.cpp's reason."""
    model = planner.model
    if model.architecture in TENSOR_UNSUPPORTED_ARCHITECTURES:
        raise PlanRequestError(
            f"split mode tensor is not implemented for architecture {model.architecture!r} in llama.cpp "
            '("LLAMA_SPLIT_MODE_TENSOR not implemented"); use --split-mode layer'
        )
    if not planner.settings.flash_attn:
        raise PlanRequestError(
            "split mode tensor needs flash attention, but it is off (llama.cpp refuses the context: "
            '"SPLIT_MODE_TENSOR requires flash_attn to be enabled"); use --flash-attn on or auto'
        )
    if not planner.devices:
        raise PlanRequestError("split mode tensor needs at least one GPU or RPC device; none was found")
    rotated = rotated_cache_parts(planner)
    if rotated and any(t.name.endswith(".attn_qkv.weight") for t in model.tensors):
        # Measured (bench/measure_tensor.py, OpenELM): the Hadamard rotation llama.cpp applies to K/V before a
        # quantised cache multiplies a mirrored matrix by a view of the fused QKV output, which the Meta backend
        # has no rule for: it aborts on the first graph.
        raise PlanRequestError(
            f"split mode tensor with a quantised {' and '.join(rotated)} cache aborts llama.cpp on this model "
            '(fused QKV: "unsupported mul_mat split states" in ggml-backend-meta.cpp); use an f16 cache, '
            "--split-mode layer, or LLAMA_ATTN_ROT_DISABLE=1"
        )


def rotated_cache_parts(planner: LayerPlanner) -> list[str]:
    """Which of K and V llama.cpp rotates before caching (llama_kv_cache: attn_rot_k/attn_rot_v): a quantised
    cache type and a head size that is a multiple of 64, unless LLAMA_ATTN_ROT_DISABLE is set."""
    import os

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    def quantised(type_name: str) -> bool:
        return GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]][0] > 1

    try:
        if int(os.environ.get("LLAMA_ATTN_ROT_DISABLE", "0")):
            return []
    except ValueError:
        pass  # llama.cpp's atoi reads a non-number as 0: rotation stays on
    settings, model = planner.settings, planner.model
    parts = []
    if quantised(settings.type_k) and model.n_embd_head_k and model.n_embd_head_k % 64 == 0:
        parts.append("K")
    if quantised(settings.type_v) and model.n_embd_head_v and model.n_embd_head_v % 64 == 0:
        parts.append("V")
    return parts


class TensorPlanner:
    """Evaluates and searches (proportions, n_gpu_layers) placements for split mode "tensor"."""

    def __init__(self, planner: LayerPlanner) -> None:
        self.base = planner
        self.model = planner.model
        self.devices = planner.devices
        self.n = len(planner.devices)
        self.split = TensorSplitModel(planner.model, self.n)
        self.backends = tuple(d.backend for d in planner.devices)
        self.meta = meta_backend(self.backends)
        self._cache: dict[tuple[tuple[float, ...] | None, int], Candidate] = {}
        self._kv: dict[tuple[tuple[float, ...] | None, int], list[int]] = {}
        self._compute: dict[int, ComputeBuffers] = {}

    def compute(self, meta_layout: Layout) -> ComputeBuffers:
        """The Meta device's compute buffer (what every device allocates) and the host's; one replay per count.
        The Meta backend has no offload_op, so it never takes op_offload work, like an RPC device."""
        cached = self._compute.get(meta_layout.n_gpu_layers)
        if cached is None:
            base = self.base
            cached = estimate_compute(base.model, base.settings, meta_layout, remote=(True,))
            self._compute[meta_layout.n_gpu_layers] = cached
        return cached

    # -- evaluation ----------------------------------------------------------------------------------------
    def layout(self, n_gpu_layers: int) -> Layout:
        """The Meta device as one device holding the last n_gpu_layers entries (what its compute graph sees)."""
        n_entries = self.model.n_layer + 1
        n_gpu_layers = min(n_gpu_layers, n_entries)
        start = n_entries - n_gpu_layers
        return Layout(
            n_layer=self.model.n_layer,
            split_mode="tensor",
            n_gpu_layers=n_gpu_layers,
            main_gpu=0,
            device_backends=(self.meta,),
            device_layers=((start, self.model.n_layer),) if n_gpu_layers else (None,),
        )

    def evaluate(self, proportions: Sequence[float] | None, n_gpu_layers: int) -> Candidate:
        key = (None if proportions is None else tuple(proportions), min(n_gpu_layers, self.model.n_layer + 1))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        candidate = self._evaluate(key[0], key[1])
        self._cache[key] = candidate
        return candidate

    def _evaluate(self, proportions: tuple[float, ...] | None, n_gpu_layers: int) -> Candidate:
        base, model = self.base, self.model
        meta_layout = self.layout(n_gpu_layers)
        start = meta_layout.i_gpu_start
        weights = [0] * self.n
        kv = [0] * self.n
        compute = [0] * self.n
        if n_gpu_layers:
            weights = device_weight_bytes(self.split, base.memory.groups, start, True, proportions, self.backends)
            kv = self._kv_bytes(proportions, start)
            meta_compute = self.compute(meta_layout).device_bytes[0] + self.split.reduce_buffer_bytes(base.settings)
            compute = [meta_compute] * self.n
        devices = tuple(
            DeviceMemory(weights[j], kv[j], compute[j], base.memory.overhead_bytes[j]) for j in range(self.n)
        )
        # The host side is layer mode's with nothing on the devices beyond the offloaded entries.
        host_entries = list(range(start))
        host_compute = self.compute(meta_layout)
        host_weights = base.memory._host_weight_bytes(host_entries)
        host_kv = sum(base.memory.kv_bytes[il] for il in host_entries)
        prediction = MemoryPrediction(
            devices, host_weights, host_kv, host_compute.host_bytes + host_compute.output_bytes
        )
        spent = [dm.total_bytes - dm.overhead_bytes for dm in devices]
        headroom = tuple(budget - used for budget, used in zip(base.budgets, spent, strict=True))
        host_fits = base.request.host_free_bytes is None or prediction.host_total_bytes <= base.request.host_free_bytes
        token_time = self.token_time_s(prediction, meta_layout)
        layers = tuple((start, model.n_layer) if n_gpu_layers else None for _ in range(self.n))
        layout = Layout(model.n_layer, "tensor", n_gpu_layers, 0, self.backends, layers)
        return Candidate(
            counts=tuple(n_gpu_layers for _ in range(self.n)),
            layout=layout,
            memory=prediction,
            fits=host_fits and min(headroom, default=0) >= 0,
            token_time_s=token_time,
            headroom=headroom,
            n_gpu_layers=n_gpu_layers,
            proportions=proportions,
        )

    def _kv_bytes(self, proportions: tuple[float, ...] | None, start: int) -> list[int]:
        key = (proportions, start)
        cached = self._kv.get(key)
        if cached is None:
            cached = [0] * self.n
            for il in range(start, self.model.n_layer):
                for j, size in enumerate(self.split.layer_kv_bytes(il, self.base.settings, proportions)):
                    cached[j] += size
            self._kv[key] = cached
        return cached

    def token_time_s(self, prediction: MemoryPrediction, meta_layout: Layout) -> float:
        """Single-stream decode time: each device reads its slices (MoE: the routed share) and half its KV."""
        memory = self.base.memory
        device_entries, host_bytes = memory.read_bytes_per_token(meta_layout)
        on_device = range(meta_layout.i_gpu_start, self.model.n_layer + 1)
        stored = sum(memory.entry_bytes["cpu"][il] for il in on_device) or 1
        active = sum(memory.active_entry_bytes[il] for il in on_device)
        ratio = active / stored
        reads = [int(dm.weights_bytes * ratio) + dm.kv_bytes // 2 for dm in prediction.devices]
        if not device_entries[0]:
            reads = [0] * self.n
        n_device_layers = min(meta_layout.n_gpu_layers, self.model.n_layer)
        return tensor_split_token_time_s(
            reads,
            [d.bandwidth_bytes_per_s for d in self.devices],
            n_device_layers,
            self.model.n_embd,
            host_bytes,
            meta_layout.i_gpu_start,
            self.base.speed,
        )

    def batch_tokens_per_s(self, candidate: Candidate) -> float:
        """Prompt throughput (n_ubatch-token micro-batches) of this tensor placement."""
        flops = self.flops_per_token()
        start = candidate.layout.i_gpu_start
        shares = self._shares(candidate)
        device_flops = [sum(flops[start:]) * share for share in shares]
        return tensor_split_batch_tokens_per_s(
            device_flops,
            [d.bandwidth_bytes_per_s for d in self.devices],
            self.base.settings.n_ubatch,
            min(candidate.layout.n_gpu_layers, self.model.n_layer),
            self.model.n_embd,
            sum(flops[:start]),
            self.base.speed,
        )

    def layer_batch_tokens_per_s(self, candidate: Candidate) -> float:
        """Prompt throughput of a layer-split placement, for the side-by-side comparison."""
        flops = self.flops_per_token()
        device_flops = []
        for layers in candidate.layout.device_layers:
            device_flops.append(0.0 if layers is None else sum(flops[layers[0] : layers[1] + 1]))
        host = sum(flops[: candidate.layout.i_gpu_start])
        return layer_split_batch_tokens_per_s(
            device_flops,
            [d.bandwidth_bytes_per_s for d in self.devices],
            self.base.settings.n_ubatch,
            candidate.layout.all_offloaded and self.n > 1,
            host,
            self.base.speed,
        )

    def flops_per_token(self) -> list[float]:
        """2 x active parameters per entry (blocks, then the output layer)."""
        fraction = self.model.n_expert_used / self.model.n_expert if self.model.n_expert else 1.0
        flops = []
        for block in (*self.base.memory.groups.blocks, self.base.memory.groups.output):
            params = 0.0
            for tensor in block:
                count = 1
                for n in tensor.shape:
                    count *= n
                params += count * (fraction if "_exps." in tensor.name else 1.0)
            flops.append(2 * params)
        return flops

    def _shares(self, candidate: Candidate) -> list[float]:
        split_bytes = [dm.weights_bytes for dm in candidate.memory.devices]
        total = sum(split_bytes) or 1
        return [b / total for b in split_bytes]

    # -- Step 1 (the placement part) ---------------------------------------------------------------------
    def crash_reason(self, proportions: Sequence[float] | None, n_gpu_layers: int) -> str | None:
        """Why llama.cpp would abort on this cut, or None."""
        if not n_gpu_layers:
            return None
        reason = self.split.kv_misaligned(self.base.settings, proportions)
        if reason:
            return f"split mode tensor cannot cut this cache: {reason}; use an f16 cache or other proportions"
        start = self.layout(n_gpu_layers).i_gpu_start
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        tensors = [t for block in self.base.memory.groups.blocks[start:] for t in block]
        for tensor in (*tensors, *self.base.memory.groups.output):
            axis, elements = self.split.split_elements(tensor.name, tensor.shape, proportions)
            if axis == MIRRORED or axis < 0 or 0 not in elements:
                continue
            block = GGML_QUANT_SIZES[GGMLQuantizationType(tensor.ggml_type)][0] if axis == 0 else 1
            if tensor.shape[axis] == block:
                return (
                    f"split mode tensor would abort llama.cpp while loading {tensor.name}: its rows are one "
                    f"quantisation block ({tensor.shape[0]} values) and device {elements.index(0)} gets none of "
                    'them (GGML_ASSERT "tensor write out of bounds"); use --split-mode layer'
                )
        return None

    # -- Steps 2 to 4 --------------------------------------------------------------------------------------
    def capacities(self, n_gpu_layers: int) -> tuple[list[float], list[float]]:
        """Step 2: per device, (fixed bytes, bytes of the whole split part): bytes_j(p) ~ fixed_j + p_j x split_j."""
        fixed, split = [], []
        for j in range(self.n):
            alone = [1.0 if k == j else 0.0 for k in range(self.n)]
            without = [0.0 if k == j else 1.0 for k in range(self.n)] if self.n > 1 else alone
            full = self.evaluate(alone, n_gpu_layers).memory.devices[j]
            none = self.evaluate(without, n_gpu_layers).memory.devices[j] if self.n > 1 else None
            used_full = full.total_bytes - full.overhead_bytes
            used_none = used_full if none is None else none.total_bytes - none.overhead_bytes
            fixed.append(float(used_none))
            split.append(float(max(used_full - used_none, 1)))
        return fixed, split

    def proportions_for(self, n_gpu_layers: int) -> tuple[float, ...] | None:
        """Step 3: the proportions for the objective at this count, or None when they cannot fit."""
        fixed, split = self.capacities(n_gpu_layers)
        budgets = self.base.budgets
        caps = [max((budgets[j] - fixed[j]) / split[j], 0.0) for j in range(self.n)]
        if sum(caps) < 1.0:
            return None
        if self.base.request.objective == "balanced":
            weights = caps
        else:
            bandwidths = [d.bandwidth_bytes_per_s or self.base.speed.default_device_bandwidth_bytes_per_s
                          for d in self.devices]  # fmt: skip
            # Water-filling: p_j = min(cap_j, rate x bandwidth_j), bisect the rate until the shares sum to 1.
            low, high = 0.0, 1.0 / min(bandwidths)
            for _ in range(60):
                rate = (low + high) / 2
                if sum(min(c, rate * b) for c, b in zip(caps, bandwidths, strict=True)) < 1.0:
                    low = rate
                else:
                    high = rate
            weights = [min(c, high * b) for c, b in zip(caps, bandwidths, strict=True)]
        total = sum(weights)
        proportions = [round(w / total / PROPORTION_STEP) * PROPORTION_STEP for w in weights]
        # Nudging: granularity can push a device over; move a percent from it to the roomiest, at most 100 times.
        for _ in range(100):
            candidate = self.evaluate(tuple(proportions), n_gpu_layers)
            if candidate.fits and self.crash_reason(proportions, n_gpu_layers) is None:
                return tuple(round(p, 3) for p in proportions)
            over = min(range(self.n), key=lambda j: candidate.headroom[j])
            roomy = max(range(self.n), key=lambda j: candidate.headroom[j])
            if over == roomy or proportions[over] < NUDGE:
                return None
            proportions[over] = round(proportions[over] - NUDGE, 3)
            proportions[roomy] = round(proportions[roomy] + NUDGE, 3)
        return None

    def search(self, n_gpu_layers: int | None, proportions: Sequence[float] | None) -> Candidate:
        """Step 4 (and the user's values): the placement for split mode tensor."""
        n_entries = self.model.n_layer + 1
        if proportions is not None and n_gpu_layers is not None:
            return self.evaluate(proportions, n_gpu_layers)
        if proportions is not None:

            def fits_given(count: int) -> bool:
                return self.evaluate(proportions, count).fits

            return self.evaluate(proportions, _largest(fits_given, n_entries))
        if n_gpu_layers is not None:
            found = self.proportions_for(n_gpu_layers)
            return self.evaluate(found if found is not None else self._by_budget(), n_gpu_layers)

        def fits(count: int) -> bool:
            return count == 0 or self.proportions_for(count) is not None

        best = _largest(fits, n_entries)
        found = self.proportions_for(best) if best else None
        return self.evaluate(found if found is not None else self._by_budget(), best)

    def _by_budget(self) -> tuple[float, ...]:
        budgets = [max(b, 0) for b in self.base.budgets]
        total = sum(budgets) or 1
        return tuple(round(b / total, 3) for b in budgets)


def _largest(fits: Callable[[int], bool], n_entries: int) -> int:
    """Bisection for the largest count in [0, n_entries] with fits(count); fits(0) is assumed."""
    if fits(n_entries):
        return n_entries
    low, high = 0, n_entries - 1
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


# Calibration ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AllreduceCalibration:
    """The all-reduce step latency fitted to one measured tensor-split run, and the figures it came from."""

    step_s: float
    measured_tokens_per_s: float
    without_latency_tokens_per_s: float  # the model's speed for that run with free exchange steps
    steps_per_token: int
    plan: Plan  # the run's plan, planned again with the fitted latency: it predicts the measured speed
    speed: SpeedModel

    def describe(self) -> str:
        return (
            f"all-reduce step calibrated to {self.step_s * 1e6:.1f} us from {self.measured_tokens_per_s:g} "
            f"tokens/s measured (the model predicts {self.without_latency_tokens_per_s:.1f} tokens/s with free "
            f"exchange steps; the difference is spread over {self.steps_per_token} steps a token); plan later "
            f"runs on these cards with --allreduce-step-us {self.step_s * 1e6:.1f}"
        )


def calibrate_allreduce_from_run(
    model: ModelInfo,
    devices: Sequence[Device],
    request: PlanRequest,
    measured_tokens_per_s: float,
    speed: SpeedModel = DEFAULT_SPEED_MODEL,
) -> AllreduceCalibration:
    """Fit ``speed.allreduce_step_s`` so that the plan of ``request`` (the measured run's settings, split mode
    tensor) predicts ``measured_tokens_per_s`` for one stream.

    Everything else in the speed model stays as assumed (device bandwidths, efficiency, per-layer overhead,
    link bandwidth): the whole gap between the run and the model without exchange latency is charged to it.
    """
    if request.split_mode != "tensor":
        raise PlanRequestError(
            "calibrating the all-reduce needs the measured run's settings with --split-mode tensor "
            "(and its --tensor-split and --n-gpu-layers)"
        )
    if not measured_tokens_per_s > 0:
        raise PlanRequestError(f"the measured speed must be a positive tokens/s figure, got {measured_tokens_per_s}")
    free_steps = dataclasses.replace(speed, allreduce_step_s=0.0)
    baseline = plan(model, devices, request, free_steps)
    steps = allreduce_steps_per_token(min(baseline.n_gpu_layers, model.n_layer), len(baseline.devices))
    if not steps or not baseline.predicted_tokens_per_s:
        raise PlanRequestError(
            "this run makes no all-reduce (one device, or no layer on the devices); nothing to calibrate"
        )
    step_s = calibrate_allreduce(
        measured_tokens_per_s, 1 / baseline.predicted_tokens_per_s, min(baseline.n_gpu_layers, model.n_layer),
        len(baseline.devices),
    )  # fmt: skip
    if step_s < 0:
        raise PlanRequestError(
            f"{measured_tokens_per_s:g} tokens/s is faster than the speed model allows for this run even with "
            f"free all-reduces ({baseline.predicted_tokens_per_s:.1f} tokens/s): its bandwidth figures for these "
            "devices are too low, so the all-reduce cannot be calibrated from it; check --gpus and the settings"
        )
    calibrated = dataclasses.replace(speed, allreduce_step_s=step_s)
    return AllreduceCalibration(
        step_s=step_s,
        measured_tokens_per_s=measured_tokens_per_s,
        without_latency_tokens_per_s=baseline.predicted_tokens_per_s,
        steps_per_token=steps,
        plan=plan(model, devices, request, calibrated),
        speed=calibrated,
    )
