"""The planner's input (PlanRequest) and output (Plan): the stable schema behind `tune-split --format json`.

Every byte figure is an exact integer; tables convert to MiB/GiB only for display. For every device
``total_bytes = weights_bytes + kv_bytes + compute_bytes + overhead_bytes`` and
``free_after_bytes = free_bytes - reserve_bytes - total_bytes``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tuner.devices import AllocatorBackend, DeviceKind

SplitMode = Literal["layer", "row", "none"]
Objective = Literal["speed", "balanced"]
FlashAttn = Literal["on", "off", "auto"]
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
MiB = 1024 * 1024


class PlanRequest(BaseModel):
    """What the user asks for. ``None`` means "the tuner chooses"; a value the user gives is never overridden."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_ctx: int | None = Field(default=None, ge=1, description="context size; None = 4096 capped at n_ctx_train")
    max_ctx: bool = Field(default=False, description="find the largest context that fits (up to n_ctx_train)")
    n_seq_max: int = Field(default=1, ge=1, le=256, description="parallel sequences (llama-server --parallel)")
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: FlashAttn = "auto"
    n_batch: int | None = Field(default=None, ge=1, description="logical batch; None = n_ubatch")
    n_ubatch: int = Field(default=512, ge=1)
    reserve_bytes: int = Field(default=512 * MiB, ge=0, description="headroom kept free on every GPU")
    objective: Objective = "speed"
    split_mode: SplitMode | None = None
    tensor_split: tuple[float, ...] | None = None
    n_gpu_layers: int | None = Field(default=None, ge=0)
    main_gpu: int | None = Field(default=None, ge=0)
    kv_unified: bool = False
    # llama-cpp-python's C-API default: sliding-window layers get a full-context cache.
    swa_full: bool = True
    host_free_bytes: int | None = Field(default=None, ge=0, description="RAM for CPU overflow; None = unchecked")


class HostUsage(BaseModel):
    """What stays in host RAM: CPU-resident weights (token_embd at least), their KV cache, CPU compute."""

    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    total_bytes: int
    layers: tuple[int, int] | None = None  # repeating blocks kept on the CPU, inclusive


class DevicePlan(BaseModel):
    index: int
    name: str
    kind: DeviceKind
    backend: AllocatorBackend
    free_bytes: int
    reserve_bytes: int
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    overhead_bytes: int
    total_bytes: int
    free_after_bytes: int
    layers: tuple[int, int] | None  # inclusive layer range; n_layer denotes the output layer
    n_layers: int  # count of entries in `layers` (blocks plus the output layer)
    holds_output: bool
    bandwidth_bytes_per_s: float | None = None
    actual_bytes: dict[str, int] | None = None  # filled by callers that loaded the model and measured it


class SplitEvaluation(BaseModel):
    """How one split mode would do; the planner evaluates all three and picks one."""

    split_mode: SplitMode
    fits: bool
    predicted_tokens_per_s: float | None
    note: str


class Plan(BaseModel):
    """A complete placement and its predicted memory per device. Serialised by ``--format json``."""

    schema_version: int = 1
    model_path: str
    model_name: str
    architecture: str
    n_layer: int
    split_mode: SplitMode
    tensor_split: tuple[float, ...]
    n_gpu_layers: int
    main_gpu: int
    n_ctx: int
    n_ctx_train: int
    n_seq_max: int
    n_batch: int
    n_ubatch: int
    type_k: str
    type_v: str
    flash_attn: bool
    kv_unified: bool
    swa_full: bool
    objective: Objective
    fits: bool
    verdict: str
    host: HostUsage
    devices: list[DevicePlan]
    predicted_tokens_per_s: float | None = None
    alternatives: list[SplitEvaluation] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
