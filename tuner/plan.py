"""The planner's input (PlanRequest) and output (Plan): the stable schema behind `tune-split --format json`.

Every byte figure is an exact integer; tables convert to MiB/GiB only for display. For every device
``total_bytes = weights_bytes + kv_bytes + compute_bytes + overhead_bytes`` and
``free_after_bytes = free_bytes - reserve_bytes - total_bytes``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tuner.devices import AllocatorBackend, DeviceKind

SplitMode = Literal["layer", "row", "none", "tensor"]
Objective = Literal["speed", "balanced", "latency", "throughput"]
FlashAttn = Literal["on", "off", "auto"]
PoolingType = Literal["unspecified", "none", "mean", "cls", "last", "rank"]  # llama.cpp's enum llama_pooling_type
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
    """How one split mode would do; the planner evaluates all four and picks one."""

    split_mode: SplitMode
    fits: bool
    predicted_tokens_per_s: float | None
    note: str
    # Prompt processing in n_ubatch micro-batches (compute-bound): where layer split's pipelining pays off.
    batch_tokens_per_s: float | None = None


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
    # An embedding model (BERT-family encoder): its context computes pooled embeddings, it has no KV cache and
    # no LM head; it serves /v1/embeddings, not chat.
    embeddings: bool = False
    objective: Objective
    fits: bool
    verdict: str
    host: HostUsage
    devices: list[DevicePlan]
    predicted_tokens_per_s: float | None = None
    alternatives: list[SplitEvaluation] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)

    @property
    def n_ctx_seq(self) -> int:
        """Tokens one sequence may hold: the whole (shared) context when unified, else its share of it."""
        return self.n_ctx if self.kv_unified else self.n_ctx // max(self.n_seq_max, 1)

    def load_settings(
        self,
        *,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        use_mmap: bool = True,
        repack: bool = True,
    ) -> LoadSettings:
        """What llama.cpp is opened with to allocate exactly this plan; the plan already holds every user value.

        The keyword arguments are the knobs that change speed, not the placement or its memory.
        """
        return LoadSettings(
            n_gpu_layers=self.n_gpu_layers,
            split_mode=self.split_mode,
            main_gpu=self.main_gpu,
            tensor_split=self.tensor_split if self.devices else None,
            n_ctx=self.n_ctx,
            n_seq_max=self.n_seq_max,
            n_batch=self.n_batch,
            n_ubatch=self.n_ubatch,
            type_k=self.type_k,
            type_v=self.type_v,
            # The plan resolved "auto" as llama.cpp will on these devices; pass the answer, not the question.
            flash_attn="on" if self.flash_attn else "off",
            kv_unified=self.kv_unified,
            swa_full=self.swa_full,
            embeddings=self.embeddings,
            n_threads=n_threads,
            n_threads_batch=n_threads_batch,
            use_mmap=use_mmap,
            repack=repack,
        )


class LoadSettings(BaseModel):
    """Everything llama.cpp's model and context parameters need: the one carrier from a plan to a load.

    ``Plan.load_settings()`` derives it; the engine, the dry run (``tune-split --measure``) and the test bed's
    loads all open llama.cpp through ``tuner.llamacpp.open_model`` with it. Defaults are llama.cpp's own.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_gpu_layers: int = -1  # -1: every layer (llama.cpp's "all")
    split_mode: SplitMode = "layer"
    main_gpu: int = Field(default=0, ge=0)
    tensor_split: tuple[float, ...] | None = None  # None: llama.cpp splits by free memory
    n_ctx: int = Field(default=4096, ge=0)
    n_seq_max: int = Field(default=1, ge=1, le=256)
    n_batch: int = Field(default=512, ge=1)
    n_ubatch: int = Field(default=512, ge=1)
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: FlashAttn = "auto"
    kv_unified: bool = False
    swa_full: bool = True
    # The context computes embeddings (llama_context_params.embeddings), pooled as ``pooling`` says;
    # "unspecified" takes the GGUF's {arch}.pooling_type, as llama.cpp does.
    embeddings: bool = False
    pooling: PoolingType = "unspecified"
    n_threads: int | None = Field(default=None, ge=1)  # None: every CPU this process may run on
    n_threads_batch: int | None = Field(default=None, ge=1)  # None: n_threads
    use_mmap: bool = True
    # llama-server's --no-repack is repack=False: CPU weights keep their file layout (no AMX/CPU_REPACK buffers).
    repack: bool = True
