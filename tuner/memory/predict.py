"""Per-device memory for a placement: weights + KV cache + compute buffers + fixed overhead.

``MemoryModel`` precomputes what does not depend on the placement (tensor groups, KV bytes per layer) so the
planner can evaluate thousands of candidate layouts while it searches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tuner.devices import AllocatorBackend, Device
from tuner.layout import Layout, RuntimeSettings
from tuner.memory.compute import ComputeBuffers, estimate_compute
from tuner.memory.kv import layer_kv_bytes
from tuner.memory.overhead import device_overhead_bytes
from tuner.memory.weights import file_spans, group_bytes, group_tensors, mapped_bytes
from tuner.model import ModelInfo


@dataclass(frozen=True)
class DeviceMemory:
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    overhead_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes + self.overhead_bytes


@dataclass(frozen=True)
class MemoryPrediction:
    devices: tuple[DeviceMemory, ...]
    host_weights_bytes: int
    host_kv_bytes: int
    host_compute_bytes: int  # the host compute buffer plus the output (logits) buffer

    @property
    def host_total_bytes(self) -> int:
        return self.host_weights_bytes + self.host_kv_bytes + self.host_compute_bytes


class MemoryModel:
    """Predicts llama.cpp's allocations for one model, device list and runtime settings."""

    def __init__(self, model: ModelInfo, devices: Sequence[Device], settings: RuntimeSettings) -> None:
        self.model = model
        self.devices = tuple(devices)
        self.settings = settings
        self.groups = group_tensors(model)
        cpu: AllocatorBackend = "cpu"
        backends = {d.backend for d in self.devices} | {cpu}
        # Bytes of each entry (blocks, then the output layer) per allocator backend, and KV per block.
        self.entry_bytes = {
            backend: [group_bytes(block, backend) for block in self.groups.blocks]
            + [group_bytes(self.groups.output, backend)]
            for backend in backends
        }
        self.kv_bytes = [*layer_kv_bytes(model, settings), 0]  # the output layer has no cache
        # Where each entry's tensors sit in the files, for the host's mapped range.
        self.host_spans = file_spans(self.groups.host)
        self.entry_spans = [file_spans(block) for block in (*self.groups.blocks, self.groups.output)]
        self.overhead_bytes = tuple(device_overhead_bytes(d) for d in self.devices)
        # RPC devices size tensors like their backend but never take op_offload work from the CPU.
        self.remote = tuple(d.kind == "rpc" for d in self.devices)
        self.active_entry_bytes = self._active_entry_bytes()
        self.block_kinds = self._block_kinds()
        self._compute_by_signature: dict[tuple[object, ...], ComputeBuffers] = {}

    def layout(self, counts: Sequence[int], split_mode: str = "layer", main_gpu: int = 0) -> Layout:
        """The layout llama.cpp produces when device d gets ``counts[d]`` entries (the last ones first)."""
        n_entries = self.model.n_layer + 1
        n_gpu_layers = sum(counts)
        start = n_entries - n_gpu_layers
        ranges: list[tuple[int, int] | None] = []
        for count in counts:
            ranges.append((start, start + count - 1) if count else None)
            start += count
        return Layout(
            n_layer=self.model.n_layer,
            split_mode=split_mode,  # type: ignore[arg-type]
            n_gpu_layers=n_gpu_layers,
            main_gpu=main_gpu,
            device_backends=tuple(d.backend for d in self.devices),
            device_layers=tuple(ranges),
        )

    def predict(self, layout: Layout, exact: bool = True) -> MemoryPrediction:
        """Bytes per device and on the host. ``exact=False`` reuses the compute buffers of an earlier layout
        with the same signature (see ``compute_signature``): the planner's search evaluates hundreds of
        layouts, and replaying llama.cpp's allocator for each would take seconds."""
        n_entries = self.model.n_layer + 1
        weights = [0] * len(self.devices)
        kv = [0] * len(self.devices)
        for device_index, layers in enumerate(layout.device_layers):
            if layers is None:
                continue
            backend = self.devices[device_index].backend
            entry_bytes = self.entry_bytes[backend]
            weights[device_index] = sum(entry_bytes[layers[0] : layers[1] + 1])
            kv[device_index] = sum(self.kv_bytes[layers[0] : layers[1] + 1])
        on_device = {il for r in layout.device_layers if r is not None for il in range(r[0], r[1] + 1)}
        host_entries = [il for il in range(n_entries) if il not in on_device]
        compute = self.compute(layout) if not exact else self._exact_compute(layout)
        devices = tuple(
            DeviceMemory(weights[d], kv[d], compute.device_bytes[d], self.overhead_bytes[d])
            for d in range(len(self.devices))
        )
        host_weights = self._host_weight_bytes(host_entries)
        host_kv = sum(self.kv_bytes[il] for il in host_entries)
        return MemoryPrediction(devices, host_weights, host_kv, compute.host_bytes + compute.output_bytes)

    def _exact_compute(self, layout: Layout) -> ComputeBuffers:
        return estimate_compute(self.model, self.settings, layout, remote=self.remote)

    def compute(self, layout: Layout) -> ComputeBuffers:
        """Compute buffers, shared between layouts with the same signature."""
        signature = self.compute_signature(layout)
        cached = self._compute_by_signature.get(signature)
        if cached is None:
            cached = self._compute_by_signature[signature] = self._exact_compute(layout)
        return cached

    def compute_signature(self, layout: Layout) -> tuple[object, ...]:
        """What a compute buffer depends on: which kinds of blocks each backend runs, where the output layer
        is, and whether pipeline parallelism is on — not how many blocks of a kind there are, because the
        allocator's peak over a run of identical blocks is reached within the first few of them."""
        last_block = self.model.n_layer - 1
        per_device = tuple(
            None if r is None else frozenset(self.block_kinds[il] for il in range(r[0], min(r[1], last_block) + 1))
            for r in layout.device_layers
        )
        cpu_kinds = frozenset(self.block_kinds[il] for il in range(min(layout.i_gpu_start, self.model.n_layer)))
        return (per_device, layout.output_device, layout.all_offloaded, layout.split_mode, cpu_kinds)

    def _block_kinds(self) -> list[int]:
        """An id per block: equal ids for blocks with the same shapes, weight types and attention kind."""
        ids: dict[tuple[object, ...], int] = {}
        kinds = []
        for il, block in enumerate(self.groups.blocks):
            key = (
                self.model.swa_layers[il], self.model.n_head[il], self.model.n_head_kv[il], self.model.n_ff[il],
                tuple(sorted((_role(t.name), t.ggml_type, t.shape) for t in block)),
            )
            kinds.append(ids.setdefault(key, len(ids)))
        return kinds

    def _host_weight_bytes(self, host_entries: Sequence[int]) -> int:
        """Host weights: the input layer plus every entry kept on the CPU, as the file range llama.cpp maps."""
        return mapped_bytes([self.host_spans, *(self.entry_spans[il] for il in host_entries)])

    def read_bytes_per_token(self, layout: Layout) -> tuple[list[int], int]:
        """Bytes each device (and the host) reads per decoded token: active weights plus half the KV cache.

        Half the cache: a conversation's context fills from empty to full, so on average half of it is read.
        Mixture-of-experts blocks read only the routed experts' share of the expert tensors.
        """
        active = self.active_entry_bytes
        device_bytes = [0] * len(self.devices)
        host_bytes = 0
        for il in range(self.model.n_layer + 1):
            n_bytes = active[il] + self.kv_bytes[il] // 2
            device = layout.device_of_layer(il)
            if device is None:
                host_bytes += n_bytes
            else:
                device_bytes[device] += n_bytes
        return device_bytes, host_bytes

    def _active_entry_bytes(self) -> list[int]:
        fraction = self.model.n_expert_used / self.model.n_expert if self.model.n_expert else 1.0
        active = []
        for block in (*self.groups.blocks, self.groups.output):
            total = 0
            for tensor in block:
                is_expert = "_exps." in tensor.name
                total += int(tensor.n_bytes * fraction) if is_expert else tensor.n_bytes
            active.append(total)
        return active


def _role(name: str) -> str:
    """A block tensor's name without its block ("blk.3.attn_q.weight" -> "attn_q.weight"); tensors filed under a
    block without being named for it (an encoder's token_embd_norm, in block 0) keep their name."""
    return name.split(".", 2)[2] if name.startswith("blk.") else name
