"""A model of single-stream decode time per token, used by the `speed` objective and the split-mode verdicts.

Decoding one token reads every active weight once, plus the KV cache of the tokens so far, so a device's share
of the time is its bytes over its memory bandwidth. Small models on fast cards are not bandwidth-bound: kernel
launches and synchronisation add a fixed cost per layer. With layers split across cards, each boundary adds a
hop (copy the hidden state, synchronise). Row split (tensor parallelism) reads each card's slice of every
matrix at the same time, then gathers the partial results on the main GPU twice per layer.

    t_token = sum_devices(bytes_d / (bandwidth_d * efficiency)) + n_layers * layer_overhead
              + hops * hop_cost + cpu_bytes / (host_bandwidth * efficiency)          (split mode layer)
    t_token = max_devices(bytes_d / (bandwidth_d * efficiency)) + n_layers * (layer_overhead + row_sync)
              + cpu_bytes / (host_bandwidth * efficiency)                            (split mode row)

The two constants were fitted to the decode speeds measured with llama.cpp (CUDA 13) on an H100 SXM
(3.35 TB/s): an 8B Q4_0 shape at 283.9 tokens/s (4.04 GB of GPU weights) and a 70B Q4_0 shape at 52.6 tokens/s
(38.7 GB). Two points, two unknowns: efficiency = 0.84 and layer_overhead = 65 us (see docs/TUNER.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SpeedModel:
    efficiency: float = 0.84  # fraction of peak bandwidth that decode kernels reach (fit, see above)
    layer_overhead_s: float = 65e-6  # fixed per-layer cost per token: launches, small kernels (fit, see above)
    # Hidden-state copy between cards plus a stream synchronisation, over PCIe: a few tens of microseconds.
    device_hop_s: float = 30e-6
    # Row split gathers partial matmul results on the main GPU twice per layer over PCIe (no NVLink assumed).
    row_sync_s_per_layer: float = 150e-6
    # Dual-channel DDR5-5600 peaks near 90 GB/s; desktop CPUs reach about two thirds of it in decode.
    host_bandwidth_bytes_per_s: float = 60e9
    # A card whose bandwidth is unknown (an RPC device) is assumed to be a mid-range GPU.
    default_device_bandwidth_bytes_per_s: float = 500e9


DEFAULT_SPEED_MODEL = SpeedModel()


def layer_split_token_time_s(
    device_read_bytes: Sequence[int],
    device_bandwidths: Sequence[float | None],
    device_layers: Sequence[int],
    host_read_bytes: int,
    host_layers: int,
    model: SpeedModel = DEFAULT_SPEED_MODEL,
) -> float:
    """Per-token decode time with contiguous layer ranges per device (llama.cpp split mode "layer")."""
    seconds = 0.0
    used_devices = 0
    for read_bytes, bandwidth, n_layers in zip(device_read_bytes, device_bandwidths, device_layers, strict=True):
        if n_layers == 0:
            continue
        used_devices += 1
        bandwidth = bandwidth or model.default_device_bandwidth_bytes_per_s
        seconds += read_bytes / (bandwidth * model.efficiency) + n_layers * model.layer_overhead_s
    seconds += host_read_bytes / (model.host_bandwidth_bytes_per_s * model.efficiency)
    seconds += host_layers * model.layer_overhead_s
    hops = max(used_devices - 1, 0) + (1 if host_layers and used_devices else 0)
    return seconds + hops * model.device_hop_s


def row_split_token_time_s(
    device_read_bytes: Sequence[int],
    device_bandwidths: Sequence[float | None],
    n_layers: int,
    host_read_bytes: int,
    model: SpeedModel = DEFAULT_SPEED_MODEL,
) -> float:
    """Per-token decode time when every matrix is split by rows across the devices (split mode "row")."""
    slowest = max(
        (
            read_bytes / ((bandwidth or model.default_device_bandwidth_bytes_per_s) * model.efficiency)
            for read_bytes, bandwidth in zip(device_read_bytes, device_bandwidths, strict=True)
            if read_bytes
        ),
        default=0.0,
    )
    sync = model.row_sync_s_per_layer if sum(1 for b in device_read_bytes if b) > 1 else 0.0
    host = host_read_bytes / (model.host_bandwidth_bytes_per_s * model.efficiency)
    return slowest + n_layers * (model.layer_overhead_s + sync) + host
