"""llama.cpp's `--fit` (common/fit.cpp, on by default in llama-server), emulated for dense models in split mode
"layer", with our memory model standing in for the dry-run loads that fit.cpp measures.

    from bench.llama_fit import FitRequest, fit_params
    result = fit_params(read_model(path), devices, FitRequest(n_ctx=None))  # -c unset, as llama-server starts

Line numbers below are those of common/fit.cpp vendored in llama-cpp-python 0.3.36.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tuner.devices import Device
from tuner.errors import PlanRequestError
from tuner.memory.overhead import device_overhead_bytes
from tuner.memory.predict import MemoryModel, MemoryPrediction
from tuner.model import ModelInfo
from tuner.plan import FlashAttn, PlanRequest
from tuner.planner import resolve_settings
from tuner.split import layer_ranges

MiB = 1024 * 1024
GiB = 1024 * MiB
# common/common.h: fit_params_target (--fit-target, per device) and fit_params_min_ctx (--fit-ctx).
FIT_TARGET_BYTES = GiB
FIT_MIN_CTX = 4096
UINT32_MAX = 2**32 - 1
# llama_model_default_params().n_gpu_layers (src/llama-model.cpp): -1 = every layer plus the output layer.
DEFAULT_N_GPU_LAYERS = -1


class FitRequest(BaseModel):
    """What llama-server was started with. ``None`` = the flag was not given (llama.cpp's 0 / -1 sentinels)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_ctx: int | None = Field(default=None, ge=1, description="-c; None = 0 = the training context")
    n_gpu_layers: int | None = Field(default=None, ge=0, description="-ngl; None = -1 = all (fit may change it)")
    tensor_split: tuple[float, ...] | None = None
    target_bytes: int = Field(default=FIT_TARGET_BYTES, ge=0, description="--fit-target, one value broadcast")
    n_ctx_min: int = Field(default=FIT_MIN_CTX, ge=1, description="--fit-ctx")
    # Runtime settings the dry runs are made with; the defaults are the tuner's (llama-cpp-python's), see the
    # bench for why they give the same device bytes as llama-server's -np auto here.
    n_seq_max: int = Field(default=1, ge=1)
    kv_unified: bool = False
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: FlashAttn = "auto"
    n_batch: int | None = None
    n_ubatch: int = 512
    swa_full: bool = True


@dataclass(frozen=True)
class DryRun:
    """One ``common_get_device_memory_data_impl`` result: per device, free memory and the bytes of the
    model / context / compute buffers llama.cpp would allocate there (fit.cpp's ``llama_device_memory_data``)."""

    free_bytes: tuple[int, ...]
    model_bytes: tuple[int, ...]
    used_bytes: tuple[int, ...]  # mb.total() = model + context + compute
    counts: tuple[int, ...]  # entries (blocks + output layer) per device in this run
    prediction: MemoryPrediction


@dataclass(frozen=True)
class FitResult:
    """What --fit hands to the real load, and what our model predicts for it."""

    status: Literal["success", "failure"]  # COMMON_PARAMS_FIT_STATUS_*; a failure keeps the params as they are
    reason: str
    n_ctx: int
    n_gpu_layers: int  # resolved: -1 (left unset) becomes n_layer + 1
    n_gpu_layers_set: bool  # whether fit wrote n_gpu_layers (False: llama.cpp's default, every layer)
    tensor_split: tuple[float, ...] | None  # None: unset, llama.cpp splits by free memory
    counts: tuple[int, ...]  # entries per device in the final placement
    free_bytes: tuple[int, ...]  # per device, as llama.cpp reports it to fit.cpp
    used_bytes: tuple[int, ...]  # model + context + compute per device, final placement
    prediction: MemoryPrediction  # the final placement in full (weights / KV / compute / overhead, host)
    n_dry_runs: int
    trace: tuple[str, ...]  # fit.cpp's LOG_TRC lines, in MiB, for reading what it did

    @property
    def margin_bytes(self) -> tuple[int, ...]:
        """Free memory fit.cpp projects per device after the load (its "MiB free" log column)."""
        return tuple(f - u for f, u in zip(self.free_bytes, self.used_bytes, strict=True))


class _FitAbort(Exception):
    """fit.cpp's ``common_params_fit_exception``: fitting stops, the parameters set so far stay."""


def _cdiv(numerator: int, denominator: int) -> int:
    """C/C++ integer division (truncates toward zero; Python's // floors)."""
    quotient = abs(numerator) // abs(denominator)
    return quotient if (numerator >= 0) == (denominator > 0) else -quotient


class _Oracle:
    """Stands in for ``common_get_device_memory_data_impl`` (fit.cpp:30): a no-alloc load of the model and
    context, read back as bytes per device. Our memory model answers instead; it is exact to llama.cpp's
    buffers (tests/test_acceptance_rpc.py), which is what the dry run reports.

    Free memory: llama.cpp asks the device (``ggml_backend_dev_memory``, i.e. cudaMemGetInfo) after the CUDA
    context exists, so the context is already spent. A simulated card's ``free_bytes`` is memory before any
    process, so the device's fixed overhead (``device_overhead_bytes``: CUDA context plus cuBLAS) is taken off.
    That counts the cuBLAS workspace, created only at the first matmul, as spent at fit time: a few tens of
    MiB that the real fit would see as free. The choice keeps one accounting for both tools: what fit thinks
    is left equals our model's free - overhead - buffers.
    """

    def __init__(self, model: ModelInfo, devices: Sequence[Device], request: FitRequest) -> None:
        self.model = model
        self.devices = tuple(devices)
        self.request = request
        self.free_bytes = tuple(max(d.free_bytes - device_overhead_bytes(d), 0) for d in self.devices)
        self._models: dict[int, MemoryModel] = {}
        self.n_runs = 0

    def _memory(self, n_ctx: int) -> MemoryModel:
        if n_ctx not in self._models:
            r = self.request
            plan_request = PlanRequest(
                n_ctx=n_ctx, n_seq_max=r.n_seq_max, kv_unified=r.kv_unified, type_k=r.type_k, type_v=r.type_v,
                flash_attn=r.flash_attn, n_batch=r.n_batch, n_ubatch=r.n_ubatch, swa_full=r.swa_full,
            )
            settings = resolve_settings(self.model, self.devices, plan_request, n_ctx)
            self._models[n_ctx] = MemoryModel(self.model, self.devices, settings)
        return self._models[n_ctx]

    def counts(self, n_gpu_layers: int, tensor_split: Sequence[float] | None) -> tuple[int, ...]:
        """Entries per device as llama_model::load_tensors assigns them (src/llama-model.cpp)."""
        n_entries = self.model.n_layer + 1
        ngl = n_entries if n_gpu_layers < 0 else n_gpu_layers  # llama_model::n_gpu_layers()
        if ngl == 0 or not self.devices:
            return tuple(0 for _ in self.devices)
        splits: Sequence[float] = tensor_split or ()
        if not any(splits):  # all zero or unset: default split by free memory
            splits = [float(f) for f in self.free_bytes]
        ranges = layer_ranges(splits, self.model.n_layer, ngl)
        return tuple(0 if r is None else r[1] - r[0] + 1 for r in ranges)

    def measure(self, n_ctx: int, n_gpu_layers: int, tensor_split: Sequence[float] | None) -> DryRun:
        """One dry run. ``n_ctx`` 0 means the training context, as llama_context resolves it."""
        self.n_runs += 1
        memory = self._memory(n_ctx or self.model.n_ctx_train)
        counts = self.counts(n_gpu_layers, tensor_split)
        prediction = memory.predict(memory.layout(counts), exact=True)
        # The device overhead is not a llama.cpp buffer: the breakdown fit.cpp reads leaves it out.
        used = tuple(dm.weights_bytes + dm.kv_bytes + dm.compute_bytes for dm in prediction.devices)
        model_bytes = tuple(dm.weights_bytes for dm in prediction.devices)
        return DryRun(self.free_bytes, model_bytes, used, counts, prediction)


def fit_params(model: ModelInfo, devices: Sequence[Device], request: FitRequest) -> FitResult:
    """``common_fit_params`` (fit.cpp:879) around ``common_params_fit_impl`` (fit.cpp:179).

    Left out, because they cannot arise for a dense model in split mode "layer" on GPUs: the CPU-only branch
    (nd == 0, host memory), the MoE steps (all expert tensors to the CPU, fit.cpp:616-645; partial layers
    and overflow buffer types, step 4, fit.cpp:735-876), a second "extra" (draft/MTP) model, split modes row
    and tensor (fit.cpp aborts for them), user tensor overrides, and devices that report no memory.
    """
    if not devices:
        raise PlanRequestError("the --fit emulation needs at least one GPU; the CPU-only branch is not emulated")
    if model.n_expert > 0:
        raise PlanRequestError(
            f"{model.name} is a mixture-of-experts model ({model.n_expert} experts); the --fit emulation covers "
            "dense models only (fit.cpp's MoE steps move expert tensors, which our layer counts cannot express)"
        )
    state = _FitState(model, devices, request)
    try:
        reason = state.run()
        status: Literal["success", "failure"] = "success"
    except _FitAbort as exc:
        reason, status = str(exc), "failure"
        state.log(f"failed to fit params to free device memory: {exc}")
    return state.result(status, reason)


class _FitState:
    """The mutable mparams / cparams that common_params_fit_impl edits in place."""

    def __init__(self, model: ModelInfo, devices: Sequence[Device], request: FitRequest) -> None:
        self.model = model
        self.request = request
        self.oracle = _Oracle(model, devices, request)
        self.nd = len(devices)
        self.hp_ngl = model.n_layer
        self.hp_nct = model.n_ctx_train
        self.n_ctx = request.n_ctx or 0  # cparams->n_ctx
        self.n_gpu_layers = request.n_gpu_layers if request.n_gpu_layers is not None else DEFAULT_N_GPU_LAYERS
        self.tensor_split: tuple[float, ...] | None = request.tensor_split
        self.trace: list[str] = []
        self.layers_written = False  # step 3 ran to its end and wrote n_gpu_layers / tensor_split

    def log(self, line: str) -> None:
        self.trace.append(line)

    def run(self) -> str:
        nd, request = self.nd, self.request
        oracle = self.oracle
        # fit.cpp:197: non-unified KV gives each sequence its own stream, and n_ctx is the total over them.
        n_streams = 1 if request.kv_unified else max(1, request.n_seq_max)
        n_ctx_auto = self.n_ctx == 0

        # Step 1 (fit.cpp:261): measure the initial parameters; stop if every device keeps its margin.
        dmds_full = oracle.measure(self.n_ctx, self.n_gpu_layers, self.tensor_split)
        n_ctx_max = min(self.hp_nct * n_streams, UINT32_MAX)
        n_ctx_min_total = min(request.n_ctx_min * n_streams, UINT32_MAX)
        if n_ctx_auto:  # fit.cpp:271: resolve the context before measuring anything else
            self.n_ctx = n_ctx_max
            if n_streams > 1:
                dmds_full = oracle.measure(self.n_ctx, self.n_gpu_layers, self.tensor_split)
        margins = [request.target_bytes] * nd

        projected_free = [f - u for f, u in zip(dmds_full.free_bytes, dmds_full.used_bytes, strict=True)]
        sum_free = sum(dmds_full.free_bytes)
        sum_projected_used = sum(dmds_full.used_bytes)
        sum_projected_free = sum(projected_free)
        sum_projected_model = sum(dmds_full.model_bytes)
        for index in range(nd):
            self.log(f"device {index}: {dmds_full.free_bytes[index] // MiB} free, {dmds_full.used_bytes[index] // MiB}"
                     f" used, {projected_free[index] // MiB} projected free vs. target of {margins[index] // MiB} MiB")
        if all(projected_free[i] >= margins[i] for i in range(nd)):  # fit.cpp:352-370 (nd == 1 alike)
            self.log("targets for free memory can be met on all devices, no changes needed")
            return "no changes needed"

        # Step 2 (fit.cpp:373): if the devices are short in total, shrink the context, but only one the user did
        # not set, and never below --fit-ctx.
        global_surplus = sum_projected_free - sum(margins)
        if global_surplus < 0:
            self.log(f"cannot meet free memory targets on all devices, need to use {-global_surplus // MiB} MiB "
                     "less in total")
            if not n_ctx_auto:
                self.log(f"context size set by user to {self.n_ctx} -> no change")
            elif n_ctx_max <= n_ctx_min_total:
                self.log(f"default model context size is {n_ctx_max} which is <= the min. context size of "
                         f"{n_ctx_min_total} -> no change")
            else:
                sum_used_target = sum_free - sum(margins)
                if nd > 1:
                    # fit.cpp:403-411: only whole layers go to a device, so expect half a layer wasted per device
                    # (and one more); uint32(n_gpu_layers) makes the default -1 the largest value.
                    ngl_u32 = self.n_gpu_layers % 2**32
                    denominator = min(ngl_u32, self.hp_ngl)
                    if denominator == 0:
                        raise PlanRequestError("-ngl 0 makes fit.cpp divide by zero (fit.cpp:409); give -ngl >= 1")
                    model_per_layer = _cdiv(sum_projected_model, denominator)
                    sum_used_target -= _cdiv((nd + 1) * model_per_layer, 2)  # dense: /2 (MoE would be /6)
                self.n_ctx = n_ctx_min_total
                dmds_min_ctx = oracle.measure(self.n_ctx, self.n_gpu_layers, self.tensor_split)
                sum_used_min_ctx = sum(dmds_min_ctx.used_bytes)
                if sum_used_target > sum_used_min_ctx:
                    # fit.cpp:425: linear interpolation between the minimum and the maximum context, rounded
                    # down to a multiple of 256 per stream.
                    self.n_ctx += _cdiv(
                        (n_ctx_max - n_ctx_min_total) * (sum_used_target - sum_used_min_ctx),
                        sum_projected_used - sum_used_min_ctx,
                    )
                    self.n_ctx %= 2**32  # cparams->n_ctx is a uint32_t
                    align = 256 * n_streams
                    self.n_ctx = max(self.n_ctx - self.n_ctx % align, n_ctx_min_total)
                    self.log(f"context size reduced from {n_ctx_max} to {self.n_ctx}")
                    if nd <= 1:
                        self.log("entire model can be fit by reducing context")
                        return "fit by reducing the context"
                    self.log("entire model should be fit across devices by reducing context")
                else:
                    self.log(f"context size reduced from {n_ctx_max} to {self.n_ctx} -> need "
                             f"{(sum_projected_used - sum_used_min_ctx) // MiB} MiB less memory in total")

        # fit.cpp:463-486: the layer steps only change what the user left unset.
        if self.n_gpu_layers != DEFAULT_N_GPU_LAYERS:
            raise _FitAbort(f"n_gpu_layers already set by user to {self.n_gpu_layers}, abort")
        if nd > 1 and self.tensor_split is not None and any(v != 0.0 for v in self.tensor_split):
            raise _FitAbort("model_params::tensor_split already set by user, abort")

        # Step 3 (fit.cpp:488): fill the devices back to front with whole layers; the last device holds the
        # output layer. For a dense model this is the whole placement (fit.cpp:730 returns after it).
        targets = [dmds_full.free_bytes[i] - margins[i] for i in range(nd)]
        ngl_per_device = [0] * nd
        mem = self._memory_for_layers(ngl_per_device)
        for device in range(nd - 1, -1, -1):
            n_unassigned = self.hp_ngl + 1 - sum(ngl_per_device[device + 1 :])
            high = list(ngl_per_device)
            high[device] = n_unassigned
            if high[device] > 0:
                mem_high = self._memory_for_layers(high)
                if mem_high[device] > targets[device]:
                    # Method of false position (fit.cpp:663-716): the low bound fits, the high one does not;
                    # interpolate memory per layer linearly between them to guess where the target is met, test
                    # the guess, replace a bound. Stops when the bounds are one layer apart; keeps the low one.
                    delta = high[device] - ngl_per_device[device]
                    while delta > 1:
                        step = _cdiv(delta * (targets[device] - mem[device]), mem_high[device] - mem[device])
                        # uint32_t step_size: a negative guess (the device is over its target even with no
                        # layers) wraps to a huge value and is clamped to delta - 1.
                        step = min(max(step % 2**32, 1), delta - 1)
                        test = list(ngl_per_device)
                        test[device] += step
                        mem_test = self._memory_for_layers(test)
                        if mem_test[device] <= targets[device]:
                            ngl_per_device, mem = test, mem_test
                        else:
                            high, mem_high = test, mem_test
                        delta = high[device] - ngl_per_device[device]
                else:
                    ngl_per_device, mem = high, mem_high
            self.log(f"device {device}: {ngl_per_device[device]} layers, {mem[device] // MiB} MiB used, "
                     f"{(dmds_full.free_bytes[device] - mem[device]) // MiB} MiB free")
        self._set_ngl_tensor_split(ngl_per_device)
        return "fit by moving layers to the CPU" if sum(ngl_per_device) <= self.hp_ngl else "fit with every layer"

    def _set_ngl_tensor_split(self, ngl_per_device: Sequence[int]) -> None:
        """``set_ngl_tensor_split_tbo`` (fit.cpp:548) without overrides: tensor_split is the layer counts."""
        self.n_gpu_layers = sum(ngl_per_device)
        self.layers_written = True
        if self.nd > 1:
            self.tensor_split = tuple(float(n) for n in ngl_per_device)

    def _memory_for_layers(self, ngl_per_device: Sequence[int]) -> list[int]:
        """``get_memory_for_layers`` (fit.cpp:589): a dry run with these counts, bytes used per device."""
        n_gpu_layers = sum(ngl_per_device)
        tensor_split = tuple(float(n) for n in ngl_per_device) if self.nd > 1 else self.tensor_split
        return list(self.oracle.measure(self.n_ctx, n_gpu_layers, tensor_split).used_bytes)

    def result(self, status: Literal["success", "failure"], reason: str) -> FitResult:
        final = self.oracle.measure(self.n_ctx, self.n_gpu_layers, self.tensor_split)
        ngl = self.model.n_layer + 1 if self.n_gpu_layers < 0 else self.n_gpu_layers
        return FitResult(
            status=status,
            reason=reason,
            n_ctx=self.n_ctx or self.hp_nct,
            n_gpu_layers=ngl,
            n_gpu_layers_set=self.layers_written,
            tensor_split=self.tensor_split,
            counts=final.counts,
            free_bytes=final.free_bytes,
            used_bytes=final.used_bytes,
            prediction=final.prediction,
            n_dry_runs=self.oracle.n_runs - 1,  # the final measurement is ours, not fit.cpp's
            trace=tuple(self.trace),
        )
