"""A concrete placement (which layers live on which device) and the resolved runtime settings.

These are the inputs of every memory formula. Layer indices follow llama.cpp: blocks are 0..n_layer-1 and
the output layer counts as index n_layer. Partial offload keeps the FIRST blocks on the CPU and puts the LAST
``n_gpu_layers`` entries (output layer included) on the devices.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuner.devices import AllocatorBackend
from tuner.plan import SplitMode

# llama.cpp rounds each sequence's share of the context up to a multiple of this (llama_context constructor).
N_CTX_PAD = 256


@dataclass(frozen=True)
class RuntimeSettings:
    """Context parameters with every "auto" already resolved."""

    n_ctx: int  # as requested (before padding)
    n_seq_max: int = 1
    n_batch: int = 512
    n_ubatch: int = 512
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = False
    kv_unified: bool = False
    swa_full: bool = True
    op_offload: bool = True

    @property
    def n_ctx_seq(self) -> int:
        """Cells per sequence after llama.cpp's padding (one stream per sequence unless kv_unified)."""
        n_ctx = _round_up(self.n_ctx, N_CTX_PAD)
        if self.kv_unified:
            return n_ctx
        return _round_up(n_ctx // self.n_seq_max, N_CTX_PAD)

    @property
    def n_ctx_padded(self) -> int:
        """Total KV cells llama.cpp allocates."""
        return self.n_ctx_seq if self.kv_unified else self.n_ctx_seq * self.n_seq_max

    @property
    def n_stream(self) -> int:
        return 1 if self.kv_unified else self.n_seq_max


@dataclass(frozen=True)
class Layout:
    """Where every layer lives. ``device_layers[d]`` is an inclusive range or None for an unused device."""

    n_layer: int
    split_mode: SplitMode
    n_gpu_layers: int
    main_gpu: int
    device_backends: tuple[AllocatorBackend, ...]
    device_layers: tuple[tuple[int, int] | None, ...]

    @property
    def i_gpu_start(self) -> int:
        """First block on a device; blocks below it stay on the CPU."""
        return max(self.n_layer + 1 - self.n_gpu_layers, 0)

    def device_of_layer(self, il: int) -> int | None:
        """Device holding block ``il`` (or the output layer at ``il == n_layer``); None = the CPU."""
        for index, layers in enumerate(self.device_layers):
            if layers is not None and layers[0] <= il <= layers[1]:
                return index
        return None

    @property
    def output_device(self) -> int | None:
        return self.device_of_layer(self.n_layer)

    @property
    def all_offloaded(self) -> bool:
        """Every block and the output layer on devices (the condition for pipeline parallelism)."""
        return self.n_gpu_layers > self.n_layer


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
