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

Tensor parallelism (split mode "tensor") reads every card's slice of every layer at the same time, then
all-reduces the partial results twice per layer (after attention and after the FFN) over the link between
the cards: ``ceil(log2 n)`` exchange steps of n_embd x tokens f32, each costing a latency plus bytes/bandwidth.

    t_token = max_devices(bytes_d / (bandwidth_d * efficiency)) + n_layers * (layer_overhead + 2 * allreduce)
              + cpu_bytes / (host_bandwidth * efficiency)                            (split mode tensor)

Batched throughput (prompt processing, n_ubatch tokens per micro-batch) is compute-bound: a card's FLOP/s is
taken as ``flops_per_byte`` x its bandwidth. Layer split pipelines micro-batches (llama.cpp's pipeline
parallelism, when every layer is on a device), so the slowest stage sets the rate; tensor split runs every
micro-batch on all cards at once but pays the all-reduces for all its tokens. Upstream's rule of thumb
follows: tensor minimises single-stream latency, layer maximises batch throughput.

The two constants were fitted to the decode speeds measured with llama.cpp (CUDA 13) on an H100 SXM
(3.35 TB/s): an 8B Q4_0 shape at 283.9 tokens/s (4.04 GB of GPU weights) and a 70B Q4_0 shape at 52.6 tokens/s
(38.7 GB). Two points, two unknowns: efficiency = 0.84 and layer_overhead = 65 us (see docs/TUNER.md).
"""

from __future__ import annotations

import math
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
    # Tensor split: one all-reduce exchange step between the cards. Assumed, not measured: PCIe 4.0 x16 without
    # peer-to-peer (through host memory, ~25 GB/s) and ~25 us per step for the copy, the add and the stream
    # synchronisation. NVLink is ~5 us and ~300 GB/s. ``calibrate_allreduce`` fits the latency to one run.
    allreduce_step_s: float = 25e-6
    link_bandwidth_bytes_per_s: float = 25e9
    # Compute-bound batches: dense FLOP/s per byte/s of memory bandwidth (RTX 4090: ~165 TFLOPS FP16 tensor /
    # 1 TB/s; llama.cpp's quantised matmuls reach about half of that).
    flops_per_byte: float = 80.0
    # A llama.cpp RPC device on another machine: per token, each remote device in the chain costs one round trip
    # (its input activations go out, it recomputes its cached graph, the result comes back) plus n_embd x 4 bytes,
    # and the logits (n_vocab x 4 bytes) travel back when it holds the output layer. Assumed, not measured: gigabit
    # Ethernet, ~0.2 ms round trip through two kernels' TCP stacks and a switch, ~117 MB/s of payload (940 Mbit/s).
    # 10 GbE is ~0.05 ms and ~1.2 GB/s. Calibrate with `ping -c 20 HOST` (the average) and iperf3.
    network_rtt_s: float = 0.2e-3
    network_bandwidth_bytes_per_s: float = 117e6


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


def network_token_time_s(
    device_remote: Sequence[bool],
    device_layers: Sequence[int],
    n_embd: int,
    n_vocab: int,
    model: SpeedModel = DEFAULT_SPEED_MODEL,
) -> float:
    """What the network adds to one decoded token in split mode layer, for devices on other machines (RPC).

    Each remote device that holds layers costs a round trip, the hidden state in (n_embd f32) and its result
    out: the hidden state again, or the logits (n_vocab f32) when it holds the output layer (the last one used).
    """
    used = [remote for remote, n_layers in zip(device_remote, device_layers, strict=True) if n_layers]
    bandwidth = model.network_bandwidth_bytes_per_s
    seconds = 0.0
    for position, remote in enumerate(used):
        if remote:
            out_bytes = n_vocab * 4 if position == len(used) - 1 else n_embd * 4
            seconds += model.network_rtt_s + (n_embd * 4 + out_bytes) / bandwidth
    return seconds


def is_remote_endpoint(endpoint: str | None) -> bool:
    """True for an RPC endpoint on another machine (its traffic crosses the network); loopback is local."""
    if not endpoint:
        return False
    host = endpoint.rpartition(":")[0].strip("[]").lower()
    return not (host == "localhost" or host.startswith("127.") or host == "::1")


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


def allreduce_s(n_devices: int, n_bytes: int, model: SpeedModel = DEFAULT_SPEED_MODEL) -> float:
    """One all-reduce of ``n_bytes`` across ``n_devices``: ceil(log2 n) exchange steps."""
    if n_devices < 2:
        return 0.0
    steps = math.ceil(math.log2(n_devices))
    return steps * (model.allreduce_step_s + n_bytes / model.link_bandwidth_bytes_per_s)


def tensor_split_token_time_s(
    device_read_bytes: Sequence[int],
    device_bandwidths: Sequence[float | None],
    n_device_layers: int,
    n_embd: int,
    host_read_bytes: int,
    host_layers: int,
    model: SpeedModel = DEFAULT_SPEED_MODEL,
) -> float:
    """Per-token decode time when every offloaded layer is cut across all devices (split mode "tensor")."""
    slowest = max(
        (
            read_bytes / ((bandwidth or model.default_device_bandwidth_bytes_per_s) * model.efficiency)
            for read_bytes, bandwidth in zip(device_read_bytes, device_bandwidths, strict=True)
        ),
        default=0.0,
    )
    reduce = 2 * allreduce_s(len(device_read_bytes), n_embd * 4, model) if n_device_layers else 0.0
    host = host_read_bytes / (model.host_bandwidth_bytes_per_s * model.efficiency)
    host += host_layers * model.layer_overhead_s
    hop = model.device_hop_s if host_layers and n_device_layers else 0.0
    return slowest + n_device_layers * (model.layer_overhead_s + reduce) + host + hop


def allreduce_steps_per_token(n_device_layers: int, n_devices: int) -> int:
    """Exchange steps one decoded token pays in split mode tensor: 2 all-reduces a layer, ceil(log2 n) each."""
    if n_devices < 2:
        return 0
    return 2 * n_device_layers * math.ceil(math.log2(n_devices))


def calibrate_allreduce(
    measured_tokens_per_s: float, predicted_without_latency_s: float, n_device_layers: int, n_devices: int
) -> float:
    """The all-reduce step latency that makes the tensor-split model reproduce one measured decode speed.

    ``predicted_without_latency_s`` is ``tensor_split_token_time_s`` with ``allreduce_step_s=0`` (the link's
    bytes/bandwidth term kept): the rest of the measured time per token is spread over the
    2 x n_layers x ceil(log2 n) exchange steps. Negative when the measured run is faster than the model allows
    even with free all-reduces (the devices' bandwidth or efficiency figures are too pessimistic); the caller
    decides what to make of that.
    """
    if measured_tokens_per_s <= 0:
        raise ValueError(f"a measured speed must be positive, got {measured_tokens_per_s}")
    steps = allreduce_steps_per_token(n_device_layers, n_devices)
    if steps == 0:
        raise ValueError("a run on one device, or with no layer on the devices, makes no all-reduce")
    return (1 / measured_tokens_per_s - predicted_without_latency_s) / steps


def layer_split_batch_tokens_per_s(
    device_flops: Sequence[float],
    device_bandwidths: Sequence[float | None],
    n_ubatch: int,
    pipelined: bool,
    host_flops: float = 0.0,
    model: SpeedModel = DEFAULT_SPEED_MODEL,
) -> float:
    """Prompt tokens/s with layer split: each stage computes its layers' FLOPs for a micro-batch; pipelined
    (every layer offloaded) the slowest stage sets the rate, otherwise the stages add up."""
    stages = [
        n_ubatch * flops / (model.flops_per_byte * (bandwidth or model.default_device_bandwidth_bytes_per_s))
        for flops, bandwidth in zip(device_flops, device_bandwidths, strict=True)
        if flops
    ]
    host = n_ubatch * host_flops / (model.flops_per_byte * model.host_bandwidth_bytes_per_s)
    total = (max(stages, default=0.0) if pipelined else sum(stages)) + host
    return n_ubatch / total if total else 0.0


def tensor_split_batch_tokens_per_s(
    device_flops: Sequence[float],
    device_bandwidths: Sequence[float | None],
    n_ubatch: int,
    n_device_layers: int,
    n_embd: int,
    host_flops: float = 0.0,
    model: SpeedModel = DEFAULT_SPEED_MODEL,
) -> float:
    """Prompt tokens/s with tensor split: all cards compute their slices at once, then 2 all-reduces per layer
    of the whole micro-batch's activations."""
    compute = max(
        (
            n_ubatch * flops / (model.flops_per_byte * (bandwidth or model.default_device_bandwidth_bytes_per_s))
            for flops, bandwidth in zip(device_flops, device_bandwidths, strict=True)
        ),
        default=0.0,
    )
    reduce = n_device_layers * 2 * allreduce_s(len(device_flops), n_embd * 4 * n_ubatch, model)
    host = n_ubatch * host_flops / (model.flops_per_byte * model.host_bandwidth_bytes_per_s)
    total = compute + reduce + host
    return n_ubatch / total if total else 0.0
