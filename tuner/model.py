"""What the tuner knows about a GGUF model: hyper-parameters and tensor sizes, nothing else.

Produced by ``tuner.gguf.read_model`` (a lazy header reader); consumed by the memory model and the planner.
Per-layer values are tuples because some architectures vary them by layer (Gemma 3's sliding-window layers,
OpenELM's head counts, MoE models with dense leading layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # GGUF order: ne[0] (the contiguous row) first
    n_bytes: int
    offset: int  # absolute offset of the data in its file
    file_index: int = 0  # which file of a split GGUF holds it

    @property
    def layer(self) -> int | None:
        """Block index for ``blk.N.*`` tensors, else None."""
        if self.name.startswith("blk."):
            return int(self.name.split(".", 2)[1])
        return None


@dataclass(frozen=True)
class ModelInfo:
    paths: tuple[str, ...]  # every file of a split model, in order
    architecture: str
    name: str
    file_type: int | None
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    n_head: tuple[int, ...]  # per layer
    n_head_kv: tuple[int, ...]  # per layer
    n_ff: tuple[int, ...]  # per layer (0 where a layer has no dense FFN)
    n_embd_head_k: int
    n_embd_head_v: int
    n_swa: int  # sliding-window size; 0 = no sliding window
    swa_layers: tuple[bool, ...]  # per layer: does this layer use the sliding window
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    tensors: tuple[TensorInfo, ...]
    chat_template: str | None = None
    metadata: dict[str, object] = field(default_factory=dict)  # scalar keys only (arrays are skipped)

    @property
    def path(self) -> str:
        return self.paths[0]

    def n_embd_k_gqa(self, il: int) -> int:
        return self.n_embd_head_k * self.n_head_kv[il]

    def n_embd_v_gqa(self, il: int) -> int:
        return self.n_embd_head_v * self.n_head_kv[il]

    @property
    def has_kv_cache(self) -> bool:
        """False for the architectures llama.cpp runs without a KV cache (BERT-family encoders and the like)."""
        from tuner.architectures import NO_KV_CACHE_ARCHITECTURES

        return self.architecture not in NO_KV_CACHE_ARCHITECTURES

    @property
    def is_encoder(self) -> bool:
        """A BERT-family encoder: no KV cache, non-causal attention, no output (LM) head."""
        from tuner.architectures import ENCODER_ARCHITECTURES

        return self.architecture in ENCODER_ARCHITECTURES

    @property
    def embeddings(self) -> bool:
        """An embedding model: served for embeddings, its context computes them (and pools them)."""
        from tuner.architectures import EMBEDDING_ARCHITECTURES

        return self.architecture in EMBEDDING_ARCHITECTURES

    @property
    def pooling_type(self) -> int:
        """``{arch}.pooling_type`` (llama_pooling_type: 0 none, 1 mean, 2 CLS, 3 last, 4 rank); 0 when absent."""
        value = self.metadata.get(f"{self.architecture}.pooling_type", 0)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    @property
    def file_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)
