"""The planner: choose a placement that fits every device and decodes fastest (or keeps equal headroom).

The algorithm, step by step (docs/TUNER.md tells it with a worked 4090 + 4080 example):

  Step 1. Resolve the runtime settings: context (the user's, or 4096 capped at the training context), batch
          sizes, flash attention ("auto" resolves to on, as llama.cpp does on CPU, RPC, CUDA and HIP), cache
          types (a quantised V cache needs flash attention).
  Step 2. Budget per device: free memory minus the reserve, minus the fixed overhead llama.cpp does not see
          (CUDA context, cuBLAS). Everything else — weights, KV, compute buffers — is predicted exactly for
          each candidate layout by tuner.memory.
  Step 3. Place layers (split mode "layer"). llama.cpp gives the LAST n_gpu_layers entries (blocks plus the
          output layer) to the devices in device order, contiguously. The planner therefore searches over
          per-device entry COUNTS: it adds entries one at a time, each to the device where it costs least under
          the objective while every device still fits, and stops when no device can take another. A local
          search then moves single entries between devices while that improves the objective.
  Step 4. Context: with --max-ctx, bisect the largest context (a multiple of 256, up to the training context)
          at which every entry still fits on the devices.
  Step 5. Evaluate the other split modes for the verdict: "none" (everything on one device), "tensor" (every
          layer cut across all devices: tuner.tensor_planner) and "row" (not available in this llama.cpp on any
          device kind: rated so, with the reason). The "latency" and "throughput" objectives pick between
          layer and tensor by predicted single-stream speed or batched (prompt) throughput.
  Step 6. Express the counts as tensor_split proportions that reproduce them under llama.cpp's rounding.

A placement the user gave (tensor_split, n_gpu_layers, split mode, context) is evaluated, never changed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tuner.devices import Device
from tuner.errors import PlanRequestError
from tuner.layout import N_CTX_PAD, Layout, RuntimeSettings
from tuner.memory.kv import cache_type_row_bytes
from tuner.memory.predict import MemoryModel, MemoryPrediction
from tuner.model import ModelInfo
from tuner.plan import DevicePlan, HostUsage, Plan, PlanRequest, SplitEvaluation
from tuner.speed import (
    DEFAULT_SPEED_MODEL,
    SpeedModel,
    is_remote_endpoint,
    layer_split_token_time_s,
    network_token_time_s,
)
from tuner.split import layer_ranges, tensor_split_for_counts

GiB = 1024**3
DEFAULT_N_CTX = 4096
UNQUANTISED_CACHE_TYPES = ("f32", "f16", "bf16")


@dataclass(frozen=True)
class Candidate:
    """One evaluated placement."""

    counts: tuple[int, ...]
    layout: Layout
    memory: MemoryPrediction
    fits: bool
    token_time_s: float
    headroom: tuple[int, ...]  # budget - total per device (negative = over)
    # Split mode "tensor": every device holds a slice of the same n_gpu_layers entries, cut in these proportions.
    n_gpu_layers: int | None = None
    proportions: tuple[float, ...] | None = None

    @property
    def entries(self) -> int:
        """Entries (blocks plus the output layer) on the devices."""
        return self.n_gpu_layers if self.n_gpu_layers is not None else sum(self.counts)


# Step 1 ------------------------------------------------------------------------------------------------------


def resolve_settings(
    model: ModelInfo, devices: Sequence[Device], request: PlanRequest, n_ctx: int | None = None
) -> RuntimeSettings:
    # Unset, every sequence gets the default context (4096, or the training context if smaller) at once. An
    # embedding model keeps no cache: its context is the tokens of one encode (all sequences of a batch
    # together), by default one training context's worth.
    default_ctx = min(DEFAULT_N_CTX, model.n_ctx_train or DEFAULT_N_CTX)
    n_ctx = n_ctx or request.n_ctx or (default_ctx if model.embeddings else default_ctx * request.n_seq_max)
    # "auto": llama.cpp probes the fused op on each layer's device and enables it when every device runs it;
    # the CPU, RPC (CPU-backed), CUDA and HIP backends all do.
    flash_attn = request.flash_attn != "off"
    for type_name in (request.type_k, request.type_v):
        cache_type_row_bytes(type_name, model.n_embd_head_k)  # raises PlanRequestError for unknown types
    if request.type_v not in UNQUANTISED_CACHE_TYPES and not flash_attn:
        raise PlanRequestError(
            f"a quantised V cache ({request.type_v}) needs flash attention, but it is off; "
            "use --flash-attn on or --cache-type-v f16"
        )
    n_ubatch = request.n_ubatch
    n_batch = request.n_batch or n_ubatch
    if model.embeddings:
        # Non-causal attention cannot be cut into micro-batches: llama.cpp encodes a whole batch in one ubatch
        # (encode(): "encoder requires n_ubatch >= n_tokens"), so both default to the context.
        n_batch = request.n_batch or n_ctx
        n_ubatch = request.n_ubatch if "n_ubatch" in request.model_fields_set else n_batch
    if n_ubatch > n_batch:
        raise PlanRequestError(f"--ubatch {n_ubatch} is larger than the batch {n_batch}; llama.cpp caps it")
    return RuntimeSettings(
        n_ctx=n_ctx,
        n_seq_max=request.n_seq_max,
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        type_k=request.type_k,
        type_v=request.type_v,
        flash_attn=flash_attn,
        kv_unified=request.kv_unified,
        swa_full=request.swa_full,
    )


# Steps 2 and 3 -----------------------------------------------------------------------------------------------


class LayerPlanner:
    """Searches per-device entry counts for split mode "layer" at fixed runtime settings."""

    def __init__(
        self,
        model: ModelInfo,
        devices: Sequence[Device],
        settings: RuntimeSettings,
        request: PlanRequest,
        speed: SpeedModel = DEFAULT_SPEED_MODEL,
        exact: bool = False,
    ) -> None:
        self.exact = exact
        self.model = model
        self.devices = tuple(devices)
        self.settings = settings
        self.request = request
        self.speed = speed
        self.memory = MemoryModel(model, devices, settings)
        # Step 2: what each device may spend on llama.cpp's own buffers.
        self.budgets = tuple(
            d.free_bytes - request.reserve_bytes - self.memory.overhead_bytes[i] for i, d in enumerate(devices)
        )
        self._cache: dict[tuple[int, ...], Candidate] = {}

    def evaluate(self, counts: Sequence[int]) -> Candidate:
        key = tuple(counts)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        layout = self.memory.layout(key)
        prediction = self.memory.predict(layout, exact=self.exact)
        spent = [dm.total_bytes - dm.overhead_bytes for dm in prediction.devices]
        headroom = tuple(budget - used for budget, used in zip(self.budgets, spent, strict=True))
        host_fits = (
            self.request.host_free_bytes is None or prediction.host_total_bytes <= self.request.host_free_bytes
        )
        device_bytes, host_bytes = self.memory.read_bytes_per_token(layout)
        token_time = layer_split_token_time_s(
            device_bytes,
            [d.bandwidth_bytes_per_s for d in self.devices],
            list(key),
            host_bytes,
            self.model.n_layer + 1 - sum(key),
            self.speed,
        )
        # RPC devices on other machines: a round trip and the activations over the network per token.
        remote = [d.kind == "rpc" and is_remote_endpoint(d.endpoint) for d in self.devices]
        token_time += network_token_time_s(remote, list(key), self.model.n_embd, self.model.n_vocab, self.speed)
        fits = host_fits and min(headroom, default=0) >= 0
        candidate = Candidate(key, layout, prediction, fits, token_time, headroom)
        self._cache[key] = candidate
        return candidate

    def score(self, candidate: Candidate) -> tuple[float, ...]:
        """Lower is better: fitting first, then the most entries on devices (CPU layers are slowest), then the
        objective (predicted token time, or the smallest headroom fraction for `balanced`)."""
        overflow = -sum(min(h, 0) for h in candidate.headroom)
        on_devices = -sum(candidate.counts)
        pairs = zip(candidate.headroom, self.budgets, strict=True)
        least_headroom = -min((h / b if b > 0 else -1.0 for h, b in pairs), default=1.0)
        if self.request.objective == "balanced":
            return (overflow, on_devices, least_headroom, candidate.token_time_s)
        return (overflow, on_devices, round(candidate.token_time_s, 7), least_headroom)

    def search(self, n_gpu_layers: int | None = None) -> Candidate:
        """Step 3: the most entries that fit (first-fit fills, bisected over the count), then local moves.

        Method: ``first_fit(g)`` succeeding is monotone in g — fewer entries on the devices never need more
        memory on any of them — so a bisection over g finds the largest count that fits in log2(n_layer) fills.
        A count the user fixed is filled directly; if it cannot fit, the closest (proportional) placement is
        returned so that the verdict can say by how much each device is short.
        """
        n_entries = self.model.n_layer + 1
        if n_gpu_layers is not None:
            target = min(n_gpu_layers, n_entries)
            counts = self.first_fit(target)
            return self.improve(self.evaluate(counts if counts is not None else self.proportional(target)))
        best_counts = self.first_fit(n_entries)
        if best_counts is None:
            low, high = 0, n_entries - 1  # invariant: first_fit(low) fits (zero entries always does)
            best_counts = [0] * len(self.devices)
            while low < high:
                middle = (low + high + 1) // 2
                counts = self.first_fit(middle)
                if counts is not None:
                    low, best_counts = middle, counts
                else:
                    high = middle - 1
        return self.improve(self.evaluate(best_counts))

    def first_fit(self, n_on_devices: int) -> list[int] | None:
        """Fill the devices in llama.cpp's order, each with as many of the remaining entries as it holds (a
        bisection per device: its memory grows with its count); the last device takes the rest, output layer
        included. None when that does not fit."""
        n_devices = len(self.devices)
        counts = [0] * n_devices
        remaining = n_on_devices
        for device in range(n_devices - 1):
            low, high = 0, remaining
            while low < high:
                middle = (low + high + 1) // 2
                # The rest goes provisionally to the last device, so that the output layer lands where it will.
                trial = [*counts[:device], middle, *([0] * (n_devices - device - 2)), remaining - middle]
                if self.evaluate(trial).headroom[device] >= 0:
                    low = middle
                else:
                    high = middle - 1
            counts[device] = low
            remaining -= low
        if n_devices:
            counts[-1] = remaining
        return counts if self.evaluate(counts).fits else None

    def proportional(self, n_on_devices: int) -> list[int]:
        """Entries in proportion to each device's budget (largest remainders), for an infeasible fixed count."""
        budgets = [max(b, 0) for b in self.budgets]
        total = sum(budgets) or 1
        shares = [n_on_devices * b / total for b in budgets]
        counts = [int(share) for share in shares]
        by_remainder = sorted(range(len(shares)), key=lambda i: shares[i] - counts[i], reverse=True)
        for index in by_remainder[: n_on_devices - sum(counts)]:
            counts[index] += 1
        return counts

    def improve(self, start: Candidate) -> Candidate:
        """Local search: move one entry between two devices while the score improves (a strict decrease, so it
        terminates); at most n_entries rounds."""
        best = start
        for _ in range(self.model.n_layer + 1):
            improved = False
            for source in range(len(self.devices)):
                if best.counts[source] == 0:
                    continue
                for target in range(len(self.devices)):
                    if target == source:
                        continue
                    trial = list(best.counts)
                    trial[source] -= 1
                    trial[target] += 1
                    candidate = self.evaluate(trial)
                    if (candidate.fits or not best.fits) and self.score(candidate) < self.score(best):
                        best, improved = candidate, True
            if not improved:
                break
        return best

    def exact_twin(self) -> LayerPlanner:
        """The same planner with every compute buffer replayed exactly (no signature sharing)."""
        if self.exact:
            return self
        return LayerPlanner(self.model, self.devices, self.settings, self.request, self.speed, exact=True)

    def from_tensor_split(self, tensor_split: Sequence[float], n_gpu_layers: int) -> Candidate:
        if len(tensor_split) != len(self.devices):
            raise PlanRequestError(
                f"tensor_split has {len(tensor_split)} entries but there are {len(self.devices)} devices"
            )
        ranges = layer_ranges(tensor_split, self.model.n_layer, n_gpu_layers)
        return self.evaluate([0 if r is None else r[1] - r[0] + 1 for r in ranges])


# Step 5 ------------------------------------------------------------------------------------------------------


def evaluate_single_device(planner: LayerPlanner, device: int, n_gpu_layers: int | None = None) -> Candidate:
    """Split mode "none": every entry (or the last ``n_gpu_layers``) on one device."""
    counts = [0] * len(planner.devices)
    n_entries = planner.model.n_layer + 1
    counts[device] = n_entries if n_gpu_layers is None else min(n_gpu_layers, n_entries)
    return planner.evaluate(counts)


# llama.cpp 0.3.36 removed ggml_backend_split_buffer_type from ggml-cuda (and so HIP); RPC and CPU never had one.
ROW_UNAVAILABLE = (
    "split mode row is not available on CUDA, ROCm, RPC or CPU devices: this llama.cpp (llama-cpp-python 0.3.36) "
    "has no split buffer type for them (\"does not support split buffers\"); use --split-mode tensor or layer"
)


# The whole plan ----------------------------------------------------------------------------------------------


def plan(
    model: ModelInfo,
    devices: Sequence[Device],
    request: PlanRequest,
    speed: SpeedModel = DEFAULT_SPEED_MODEL,
) -> Plan:
    """Plan (or, with a user placement, evaluate) how to load ``model`` on ``devices``."""
    from tuner.tensor_planner import TensorPlanner, check_tensor_request  # it imports this module

    _check_request(model, devices, request)
    n_entries = model.n_layer + 1
    n_ctx = request.n_ctx
    warnings: list[str] = []
    # (An embedding model's context is the tokens of one batch of inputs, each held to the training context.)
    if n_ctx and model.n_ctx_train and n_ctx > model.n_ctx_train and not model.embeddings:
        warnings.append(f"context {n_ctx} exceeds the training context {model.n_ctx_train}; quality may suffer")

    def planner_for(ctx: int | None) -> LayerPlanner:
        return LayerPlanner(model, devices, resolve_settings(model, devices, request, ctx), request, speed)

    # Step 4: the largest context that keeps every entry on the devices.
    if request.max_ctx and request.n_ctx is None:
        n_ctx = _max_context(model, request, planner_for, warnings)
    planner = planner_for(n_ctx)
    split_mode = request.split_mode or ("layer" if len(devices) > 1 else "none")
    main_gpu = request.main_gpu if request.main_gpu is not None else _fastest_device(devices)
    if split_mode == "tensor":
        check_tensor_request(planner)

    chosen = _choose(planner, request, split_mode, main_gpu)
    # The search shares compute buffers between layouts of the same signature; the answer is replayed exactly,
    # and where that disagrees on fitting the choice is made again with exact replays throughout (slower).
    exact = planner.exact_twin()
    final = _choose(exact, request, split_mode, main_gpu, known=chosen)
    if final.fits != chosen.fits:
        final = _choose(exact, request, split_mode, main_gpu)
    alternatives, tensor_choice = _alternatives(exact, main_gpu) if devices else ([], None)
    planner, chosen = exact, final
    # Step 5: "latency" and "throughput" pick layer or tensor split, when the user left the mode open.
    picks = request.split_mode is None and request.objective in ("latency", "throughput")
    if picks and tensor_choice is not None and _prefer_tensor(alternatives, chosen, tensor_choice, request.objective):
        split_mode, chosen = "tensor", tensor_choice
    if not devices and request.n_gpu_layers:
        warnings.append(f"no GPU or RPC device was found: --n-gpu-layers {request.n_gpu_layers} has no effect")
    if not devices:
        split_mode = "none"
    user_placement = request.tensor_split is not None or request.n_gpu_layers is not None
    fits, token_time = chosen.fits, chosen.token_time_s
    if fits and chosen.entries < n_entries and devices:
        warnings.append(f"{n_entries - chosen.entries} of {n_entries} layers stay on the CPU; decoding will be slow")
    if split_mode == "tensor" and fits:
        reason = TensorPlanner(planner).crash_reason(chosen.proportions, chosen.entries)
        if reason is not None:
            raise PlanRequestError(reason)
    tensor = next((a for a in alternatives if a.split_mode == "tensor"), None)
    rate = 1 / token_time if token_time else 0.0
    if split_mode == "layer" and tensor and tensor.fits and (tensor.predicted_tokens_per_s or 0) > 1.1 * rate:
        warnings.append(
            f"tensor split is predicted faster for a single stream here ({tensor.predicted_tokens_per_s:.0f} vs "
            f"{rate:.0f} tokens/s); try --split-mode tensor, or --objective latency to let the planner pick it"
        )
    verdict = _verdict(planner, chosen, fits, user_placement)
    if request.tensor_split is not None:
        tensor_split = tuple(request.tensor_split)
    elif split_mode == "layer":
        tensor_split = tensor_split_for_counts(chosen.counts, model.n_layer)
    elif split_mode == "tensor":
        tensor_split = chosen.proportions or tuple(1.0 for _ in devices)
    else:
        tensor_split = tuple(1.0 if i == main_gpu else 0.0 for i in range(len(devices)))
    return _build_plan(
        model, planner, chosen, request, split_mode, main_gpu, tensor_split, fits, verdict, token_time,
        alternatives, warnings,
    )


def _prefer_tensor(
    alternatives: Sequence[SplitEvaluation], layer: Candidate, tensor: Candidate, objective: str
) -> bool:
    """Tensor split wins when it fits, keeps at least as many entries on the devices, and beats layer split on
    the objective's measure (single-stream tokens/s for "latency", batched tokens/s for "throughput")."""
    if not tensor.fits or tensor.entries < layer.entries or (layer.fits and not tensor.fits):
        return False
    by_mode = {a.split_mode: a for a in alternatives}
    if "layer" not in by_mode or "tensor" not in by_mode:
        return False
    if objective == "latency":
        return (by_mode["tensor"].predicted_tokens_per_s or 0) > (by_mode["layer"].predicted_tokens_per_s or 0)
    return (by_mode["tensor"].batch_tokens_per_s or 0) > (by_mode["layer"].batch_tokens_per_s or 0)


def _choose(
    planner: LayerPlanner, request: PlanRequest, split_mode: str, main_gpu: int, known: Candidate | None = None
) -> Candidate:
    """The placement for the split mode: the user's, or the search's; ``known`` re-evaluates a chosen one."""
    from tuner.tensor_planner import TensorPlanner  # it imports this module

    n_entries = planner.model.n_layer + 1
    if split_mode == "tensor":
        tensor = TensorPlanner(planner)
        if known is not None:
            return tensor.evaluate(known.proportions, known.entries)
        return tensor.search(request.n_gpu_layers, request.tensor_split)
    if known is not None:
        return planner.evaluate(known.counts)
    if not planner.devices:
        return planner.evaluate([])
    if split_mode == "none":
        counts = [0] * len(planner.devices)
        counts[main_gpu] = n_entries if request.n_gpu_layers is None else min(request.n_gpu_layers, n_entries)
        return planner.evaluate(counts)
    if request.tensor_split is not None:
        n_gpu_layers = request.n_gpu_layers if request.n_gpu_layers is not None else n_entries
        return planner.from_tensor_split(request.tensor_split, n_gpu_layers)
    return planner.search(request.n_gpu_layers)


def _check_request(model: ModelInfo, devices: Sequence[Device], request: PlanRequest) -> None:
    if request.main_gpu is not None and request.main_gpu >= max(len(devices), 1):
        raise PlanRequestError(f"--main-gpu {request.main_gpu} is out of range: there are {len(devices)} devices")
    if request.split_mode == "row":
        raise PlanRequestError(ROW_UNAVAILABLE)
    if request.tensor_split is not None and len(request.tensor_split) != len(devices):
        raise PlanRequestError(
            f"--tensor-split has {len(request.tensor_split)} entries for {len(devices)} devices; give one per device"
        )


def _fastest_device(devices: Sequence[Device]) -> int:
    if not devices:
        return 0
    return max(range(len(devices)), key=lambda i: (devices[i].bandwidth_bytes_per_s or 0, devices[i].free_bytes))


def _max_context(
    model: ModelInfo, request: PlanRequest, planner_for: Callable[[int | None], LayerPlanner], warnings: list[str]
) -> int:
    """Bisection over multiples of 256: fits(ctx) is monotone (more context never needs less memory)."""
    from tuner.tensor_planner import TensorPlanner, check_tensor_request  # it imports this module

    n_entries = model.n_layer + 1
    ceiling = model.n_ctx_train or 131072

    def fits(ctx: int) -> bool:
        planner = planner_for(ctx)
        target = request.n_gpu_layers if request.n_gpu_layers is not None else n_entries
        if request.split_mode == "tensor":
            check_tensor_request(planner)
            tensor = TensorPlanner(planner).search(target, request.tensor_split)
            return tensor.fits and tensor.entries >= min(target, n_entries)
        if request.tensor_split is not None:
            return planner.from_tensor_split(request.tensor_split, target).fits
        candidate = planner.search(target)
        return candidate.fits and sum(candidate.counts) >= min(target, n_entries)

    low, high = 0, ceiling // N_CTX_PAD
    if not fits(N_CTX_PAD * request.n_seq_max):
        warnings.append("even the smallest context does not fit with every layer on the devices")
        return min(DEFAULT_N_CTX, ceiling)
    low = request.n_seq_max
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle * N_CTX_PAD):
            low = middle
        else:
            high = middle - 1
    return low * N_CTX_PAD


def _alternatives(planner: LayerPlanner, main_gpu: int) -> tuple[list[SplitEvaluation], Candidate | None]:
    """Every split mode's verdict, single-stream and batched speeds side by side; and the tensor placement."""
    from tuner.tensor_planner import TensorPlanner, check_tensor_request  # it imports this module

    n_entries = planner.model.n_layer + 1
    request = planner.request
    layer = planner.search(request.n_gpu_layers)
    single = evaluate_single_device(planner, main_gpu, request.n_gpu_layers)
    tensor_planner = TensorPlanner(planner)
    tensor: Candidate | None = None
    tensor_note = ""
    try:
        check_tensor_request(planner)
        tensor = tensor_planner.search(request.n_gpu_layers, None)
        reason = tensor_planner.crash_reason(tensor.proportions, tensor.entries)
        if reason is not None:
            tensor, tensor_note = None, reason
    except PlanRequestError as exc:
        tensor_note = str(exc)

    def rate(candidate: Candidate) -> float | None:
        return 1 / candidate.token_time_s if candidate.token_time_s else None

    evaluations = [
        SplitEvaluation(
            split_mode="layer",
            fits=layer.fits,
            predicted_tokens_per_s=rate(layer),
            batch_tokens_per_s=tensor_planner.layer_batch_tokens_per_s(layer),
            note=f"{layer.entries} of {n_entries} layers on the devices, pipelined by layer",
        ),
        SplitEvaluation(
            split_mode="none",
            fits=single.fits,
            predicted_tokens_per_s=rate(single),
            batch_tokens_per_s=tensor_planner.layer_batch_tokens_per_s(single),
            note=f"everything on {planner.devices[main_gpu].name} (device {main_gpu})",
        ),
    ]
    if tensor is not None:
        shares = ",".join(f"{p:g}" for p in tensor.proportions or ())
        evaluations.append(
            SplitEvaluation(
                split_mode="tensor",
                fits=tensor.fits,
                predicted_tokens_per_s=rate(tensor),
                batch_tokens_per_s=tensor_planner.batch_tokens_per_s(tensor),
                note=f"{tensor.entries} of {n_entries} layers cut across all devices ({shares}), 2 all-reduces a layer",
            )
        )
    else:
        evaluations.append(
            SplitEvaluation(split_mode="tensor", fits=False, predicted_tokens_per_s=None, note=tensor_note)
        )
    evaluations.append(
        SplitEvaluation(
            split_mode="row", fits=False, predicted_tokens_per_s=None, note="not available: " + ROW_UNAVAILABLE
        )
    )
    return evaluations, tensor


def _verdict(planner: LayerPlanner, chosen: Candidate, fits: bool, user_placement: bool) -> str:
    if fits and not planner.devices:
        return "fits in host RAM: no GPU or RPC device was found, so every layer runs on the CPU"
    if fits:
        what = "the given placement fits" if user_placement else "fits"
        return f"{what}: {chosen.entries} of {planner.model.n_layer + 1} layers on the devices"
    return explain_shortfall(planner, chosen)


def explain_shortfall(planner: LayerPlanner, chosen: Candidate) -> str:
    """Which device (or the host) is short by how much, and what each usual remedy would save there."""
    parts = []
    short_devices = [i for i, headroom in enumerate(chosen.headroom) if headroom < 0]
    for index in short_devices:
        device = planner.devices[index]
        parts.append(f"{device.name} (device {index}) is {-chosen.headroom[index] / GiB:.2f} GiB short")
    host_free = planner.request.host_free_bytes
    host_short = host_free is not None and chosen.memory.host_total_bytes > host_free
    if host_short and host_free is not None:
        need = chosen.memory.host_total_bytes
        parts.append(f"host RAM needs {need / GiB:.2f} GiB but {host_free / GiB:.2f} GiB are free")
    # KV bytes where memory is short: the short devices' caches, or the CPU layers' caches in host RAM.
    kv_short = sum(chosen.memory.devices[i].kv_bytes for i in short_devices)
    if host_short:
        kv_short += chosen.memory.host_kv_bytes
    remedies = []
    settings = planner.settings
    if settings.n_ctx > N_CTX_PAD and kv_short:
        remedies.append(f"a context of {settings.n_ctx // 2} saves {kv_short / 2 / GiB:.2f} GiB of KV cache")
    if settings.type_k == "f16" and settings.type_v == "f16" and kv_short:
        # q8_0 stores 32 values in 34 bytes instead of 64: 47% less.
        remedies.append(f"--cache-type-k q8_0 --cache-type-v q8_0 saves {kv_short * 30 / 64 / GiB:.2f} GiB")
    if short_devices and chosen.entries:
        remedies.append(f"fewer layers on the GPUs (--n-gpu-layers below {chosen.entries}) spills to the CPU")
    if host_short and not short_devices and chosen.layout.i_gpu_start > 0 and planner.devices:
        remedies.append("more layers on the GPUs (a higher --n-gpu-layers) takes them out of host RAM")
    return "does not fit: " + "; ".join(parts) + (". What would help: " + "; ".join(remedies) if remedies else "")


def _build_plan(
    model: ModelInfo,
    planner: LayerPlanner,
    chosen: Candidate,
    request: PlanRequest,
    split_mode: str,
    main_gpu: int,
    tensor_split: tuple[float, ...],
    fits: bool,
    verdict: str,
    token_time_s: float | None,
    alternatives: list[SplitEvaluation],
    warnings: list[str],
) -> Plan:
    settings = planner.settings
    memory = chosen.memory
    devices = []
    for index, device in enumerate(planner.devices):
        dm = memory.devices[index]
        layers = chosen.layout.device_layers[index]
        reserve = request.reserve_bytes
        devices.append(
            DevicePlan(
                index=index,
                name=device.name,
                kind=device.kind,
                backend=device.backend,
                free_bytes=device.free_bytes,
                reserve_bytes=reserve,
                weights_bytes=dm.weights_bytes,
                kv_bytes=dm.kv_bytes,
                compute_bytes=dm.compute_bytes,
                overhead_bytes=dm.overhead_bytes,
                total_bytes=dm.total_bytes,
                free_after_bytes=device.free_bytes - reserve - dm.total_bytes,
                layers=layers,
                n_layers=chosen.counts[index],
                holds_output=layers is not None and layers[1] == model.n_layer,
                bandwidth_bytes_per_s=device.bandwidth_bytes_per_s,
            )
        )
    host_layers = min(chosen.layout.i_gpu_start, model.n_layer)  # blocks kept on the CPU
    host = HostUsage(
        weights_bytes=memory.host_weights_bytes,
        kv_bytes=memory.host_kv_bytes,
        compute_bytes=memory.host_compute_bytes,
        total_bytes=memory.host_total_bytes,
        layers=(0, host_layers - 1) if host_layers > 0 else None,
    )
    return Plan(
        model_path=model.path,
        model_name=model.name,
        architecture=model.architecture,
        n_layer=model.n_layer,
        split_mode=split_mode,  # type: ignore[arg-type]
        tensor_split=tensor_split,
        n_gpu_layers=chosen.entries,
        main_gpu=main_gpu,
        n_ctx=settings.n_ctx,
        n_ctx_train=model.n_ctx_train,
        n_seq_max=settings.n_seq_max,
        n_batch=settings.n_batch,
        n_ubatch=settings.n_ubatch,
        type_k=settings.type_k,
        type_v=settings.type_v,
        flash_attn=settings.flash_attn,
        kv_unified=settings.kv_unified,
        swa_full=settings.swa_full,
        embeddings=model.embeddings,
        objective=request.objective,
        fits=fits,
        verdict=verdict,
        host=host,
        devices=devices,
        predicted_tokens_per_s=1 / token_time_s if token_time_s else None,
        alternatives=alternatives,
        warnings=warnings,
    )
