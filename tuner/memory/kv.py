"""KV-cache bytes per layer, as llama_kv_cache allocates them (src/llama-kv-cache.cpp, llama-kv-cache-iswa.cpp).

Per layer: K is ``n_embd_k_gqa x cells x n_stream`` and V ``n_embd_v_gqa x cells x n_stream`` in the cache
types. ``cells`` is the padded per-sequence context; sliding-window layers get
``pad256(min(cells, n_swa + n_ubatch))`` unless ``swa_full`` (llama-cpp-python's default) keeps them full.
Without flash attention V is stored transposed and, when layers differ in V width, padded to the widest.
The cache of a layer lives with the layer; layers kept on the CPU keep theirs in host RAM (tuner.memory.predict).
"""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tuner.errors import PlanRequestError
from tuner.layout import N_CTX_PAD, RuntimeSettings
from tuner.model import ModelInfo


def cache_type_row_bytes(type_name: str, n_elements: int) -> int:
    """ggml_row_size for a KV cache type given by its llama.cpp name (f16, q8_0, ...)."""
    try:
        quant_type = GGMLQuantizationType[type_name.upper()]
    except KeyError as exc:
        raise PlanRequestError(
            f"unknown KV cache type {type_name!r}; use one of f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1"
        ) from exc
    block_size, type_size = GGML_QUANT_SIZES[quant_type]
    if n_elements % block_size:
        raise PlanRequestError(
            f"KV cache type {type_name} needs rows that are multiples of {block_size}; "
            f"this model's K/V rows have {n_elements} elements — use f16 or q8_0"
        )
    return n_elements // block_size * type_size


def layer_cells(model: ModelInfo, settings: RuntimeSettings, il: int) -> int:
    """KV cells of layer ``il`` per stream."""
    cells = settings.n_ctx_seq
    if model.n_swa and model.swa_layers[il] and not settings.swa_full:
        window = model.n_swa * (settings.n_seq_max if settings.kv_unified else 1) + settings.n_ubatch
        cells = -(-min(cells, window) // N_CTX_PAD) * N_CTX_PAD
    return cells


def layer_kv_bytes(model: ModelInfo, settings: RuntimeSettings) -> list[int]:
    """KV bytes of every block; zero for the architectures llama.cpp runs without a cache (encoders)."""
    if not model.has_kv_cache:
        return [0] * model.n_layer
    v_transposed = not settings.flash_attn
    n_embd_v_max = max(model.n_embd_v_gqa(il) for il in range(model.n_layer))
    sizes = []
    for il in range(model.n_layer):
        cells = layer_cells(model, settings, il) * settings.n_stream
        n_embd_v = n_embd_v_max if v_transposed else model.n_embd_v_gqa(il)
        k_bytes = cache_type_row_bytes(settings.type_k, model.n_embd_k_gqa(il)) * cells
        v_bytes = cache_type_row_bytes(settings.type_v, n_embd_v) * cells
        sizes.append(k_bytes + v_bytes)
    return sizes
