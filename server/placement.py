"""Where a model goes when it loads beside the models already resident, and which of them must make room.

Routers elsewhere evict by count; here every decision is a tuner plan against exact per-device bytes:

  Step 1: the memory left. Each device's free bytes (its inventory, capped by --device-limit) less what every
          resident model holds there: the larger of its prediction and what llama.cpp really allocated, so a
          load that came out larger than planned is counted as it is. Host RAM likewise.
  Step 2: the model whole on one device, without evicting anything: plan it on each device alone (the others
          offered no memory) and keep the one with the highest predicted tokens/s. Skipped when the user fixed
          the placement (tensor_split, main_gpu, n_gpu_layers or split_mode none).
  Step 3: the model across the devices, every layer on them, without evicting anything.
  Step 4: evict the least recently used idle models (never one with requests in flight, never a pinned one),
          one at a time, re-planning after each (Steps 2 and 3), until every layer fits: only as many as the
          plan says.
  Step 5: the best plan that fits with layers left in host RAM, without evicting anything.
  Step 6: nothing fits: NoRoomError with the tuner's numbers, and which models could not be evicted and why.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tuner import Device, DoesNotFitError, MiB, Plan, PlanRequest, TunerError, plan_model


class NoRoomError(Exception):
    """No placement fits, even after evicting every model that may be evicted."""


@dataclass(frozen=True)
class Resident:
    """A loaded model as placement sees it."""

    alias: str
    device_bytes: dict[int, int]  # device index -> bytes it holds there
    host_bytes: int
    idle: bool  # no request running or waiting
    pinned: bool
    last_used_s: float


@dataclass(frozen=True)
class Placement:
    plan: Plan
    evict: tuple[str, ...]  # resident models to unload first, least recently used first
    reason: str  # for the log: where it goes and why


def memory_left(
    devices: Sequence[Device], host_free_bytes: int | None, residents: Sequence[Resident]
) -> tuple[list[Device], int | None]:
    """Step 1: the devices with the residents' bytes taken off their free memory, and the host RAM left."""
    held = [0] * len(devices)
    host_held = 0
    for resident in residents:
        for index, n_bytes in resident.device_bytes.items():
            if 0 <= index < len(held):
                held[index] += n_bytes
        host_held += resident.host_bytes
    left = [d.model_copy(update={"free_bytes": max(0, d.free_bytes - held[i])}) for i, d in enumerate(devices)]
    host_left = None if host_free_bytes is None else max(0, host_free_bytes - host_held)
    return left, host_left


def place(
    path: str | os.PathLike[str],
    request: PlanRequest,
    devices: Sequence[Device],
    host_free_bytes: int | None,
    residents: Sequence[Resident],
) -> Placement:
    """The placement of ``path`` beside ``residents`` (Steps 1-6 of the module docstring)."""
    user_fixed = (
        request.tensor_split is not None
        or request.main_gpu is not None
        or request.n_gpu_layers is not None
        or request.split_mode == "none"
    )

    def best_full(left: Sequence[Device], host_left: int | None) -> tuple[Plan, str] | None:
        """Steps 2 and 3 on this much memory: the fastest plan with every layer on the devices."""
        request_here = request.model_copy(update={"host_free_bytes": host_left})
        whole: list[Plan] = []
        if not user_fixed and len(left) > 1:
            for index in range(len(left)):
                alone = [d if i == index else d.model_copy(update={"free_bytes": 0}) for i, d in enumerate(left)]
                candidate = _plan(path, request_here, alone)
                if candidate is not None and _all_layers_on_devices(candidate, request):
                    whole.append(candidate)
        if whole:
            fastest = max(whole, key=lambda p: p.predicted_tokens_per_s or 0.0)
            card = next(d.name for d in fastest.devices if d.n_layers)
            return fastest, f"whole on {card}, the fastest single device with room"
        spanning = _plan(path, request_here, left)
        if spanning is not None and _all_layers_on_devices(spanning, request):
            used = [d.name for d in spanning.devices if d.n_layers]
            where = f"across {', '.join(used)}" if len(used) > 1 else f"on {used[0]}" if used else "in host RAM"
            return spanning, where
        return None

    left, host_left = memory_left(devices, host_free_bytes, residents)
    found = best_full(left, host_left)
    if found is not None:
        return Placement(found[0], (), found[1])

    # Step 4: evict least recently used idle models, one at a time, until every layer fits.
    evictable = sorted((r for r in residents if r.idle and not r.pinned), key=lambda r: r.last_used_s)
    evicted: list[str] = []
    for victim in evictable:
        evicted.append(victim.alias)
        remaining = [r for r in residents if r.alias not in evicted]
        left_after, host_after = memory_left(devices, host_free_bytes, remaining)
        found = best_full(left_after, host_after)
        if found is not None:
            why = f"{found[1]}, after evicting {', '.join(evicted)} (idle, least recently used)"
            return Placement(found[0], tuple(evicted), why)

    # Step 5: layers in host RAM rather than evicting models that are busy or pinned.
    partial = _plan(path, request.model_copy(update={"host_free_bytes": host_left}), left)
    if partial is not None:
        why = f"{partial.n_gpu_layers} of {partial.n_layer + 1} layers on the devices, the rest in host RAM"
        return Placement(partial, (), why)

    # Step 6: say why.
    closest = plan_model(path, request.model_copy(update={"host_free_bytes": host_left}), left, strict=False)
    kept = [
        f"{r.alias} ({'pinned' if r.pinned else 'has requests in flight'})" for r in residents if not r.idle or r.pinned
    ]
    held = ", ".join(f"{r.alias} {sum(r.device_bytes.values()) / MiB:,.0f} MiB" for r in residents) or "none"
    message = f"no room for {Path(path).name}: {closest.verdict}; resident: {held}"
    if kept:
        message += f"; not evictable: {', '.join(kept)}"
    raise NoRoomError(message)


def _plan(path: str | os.PathLike[str], request: PlanRequest, devices: Sequence[Device]) -> Plan | None:
    try:
        plan = plan_model(path, request, devices, strict=False)
    except DoesNotFitError:
        return None
    except TunerError:
        raise
    return plan if plan.fits else None


def _all_layers_on_devices(plan: Plan, request: PlanRequest) -> bool:
    if request.n_gpu_layers is not None or not plan.devices:
        # The user chose how many layers (that is "all" for this model), or there is no device: host RAM only.
        return plan.fits
    return plan.n_gpu_layers >= plan.n_layer + 1
