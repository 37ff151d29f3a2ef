"""Per-device memory in split mode "tensor" (llama.cpp's tensor parallelism over a "Meta" device).

With ``-sm tensor`` llama.cpp wraps the devices in one Meta device (src/llama.cpp, llama_prepare_model_devices)
and asks ``llama_meta_device_get_split_state`` (src/llama-model.cpp) how to cut every tensor placed on it:

- Attention by heads: Q, K, V (and their biases, fused QKV) split along their output rows (axis 1), the output
  projection along its input columns (axis 0); the KV cache ``cache_k_l{il}``/``cache_v_l{il}`` along the row
  (axis 0), so each device caches its own KV heads.
- The feed-forward network by its hidden dimension: up/gate (and the MoE expert tensors) along axis 1, down
  along axis 0. The output matrix by vocabulary rows (axis 1).
- Everything else is MIRRORED, a full copy on every device: norms, the MoE router, shared experts, biases of
  the output projections, and the tied output layer of a model without ``output.weight`` (its copy of
  ``token_embd`` keeps the input layer's name, which matches no split rule).

How a dimension of ``ne`` elements is cut (Step 1-3 in ``split_elements``): the proportions are rotated by the
layer's index among layers of its kind (``il_eff % n_devices``, global tensors by ``n_layer % n_devices``) so
rounding does not always favour the same device; each boundary is ``ne x cumulative / total`` in float32,
rounded DOWN to a granularity (whole heads in quantisation blocks for attention, lcm(block, 128) for the FFN);
the last device takes the rest. A device whose share rounds to zero gets no slice of that tensor (with 3 KV
heads on 2 devices, each layer's cache goes whole to one device, alternating by layer).

Allocation (ggml/src/ggml-backend-meta.cpp): weights and the KV cache are allocated per device from its slices
(each slice padded to the backend's alignment, CUDA's quantised-row padding included). The compute buffer is
planned ONCE for the whole (unsplit) graph with the largest alloc size and alignment of the devices, and every
device allocates that full size: it equals split mode "none" on one device of that backend (no pipeline
parallelism, no op_offload: the Meta backend has none). On the first decode each device also allocates
``ceil(log2(n_devices))`` all-reduce buffers of the largest partial result (n_embd x n_ubatch f32; MoE:
x n_expert_used), reported here as part of compute.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tuner.devices import AllocatorBackend
from tuner.layout import RuntimeSettings
from tuner.memory.kv import cache_type_row_bytes, layer_cells
from tuner.memory.weights import BUFFER_ALIGNMENT, CUDA_MATRIX_ROW_PADDING, WeightGroups
from tuner.model import ModelInfo, TensorInfo

# Architectures llama.cpp refuses with "LLAMA_SPLIT_MODE_TENSOR not implemented for architecture"
# (src/llama-arch.cpp, llm_arch_supports_sm_tensor).
TENSOR_UNSUPPORTED_ARCHITECTURES = frozenset(
    """
    grok mpt plamo2 minicpm3 gemma3n mamba mamba2 jamba falcon-h1 olmo2 olmoe deepseek2 deepseek32 hy_v4
    dots3note glm-dsa bitnet t5 nemotron_h nemotron_h_moe granitehybrid minimax-01 minimax-m2 minimax-m3
    mistral4 kimi-linear bailingmoe3 kimi-k3 glm5-next qwen3tts qwen4exp
    """.split()
)
# Architectures whose split rules differ from the generic ones modelled here (Q-gate doubling, DeepSeek V4
# grouping, HRM's full mirroring, linear-attention granularity): planned with the generic rules, and said so.
TENSOR_APPROXIMATE_ARCHITECTURES = frozenset({"qwen3next", "qwen35", "qwen35moe", "deepseek4", "dflash", "hrm_text"})

MIRRORED = -1
PARTIAL = -2  # a full-size partial sum on every device (the MoE down-projection bias)

# std::regex_match patterns of llama_meta_device_get_split_state, verbatim (an unescaped "." matches any char).
_P = {
    "q_weight": r"blk\.\d*\.attn_q.weight",
    "kv_weight": r"blk\.\d*\.attn_(k|v).weight",
    "qkv_weight": r"blk\.\d*\.attn_qkv.weight",
    "q_bias": r"blk\.\d*\.attn_q\.bias",
    "kv_bias": r"blk\.\d*\.attn_(k|v)\.bias",
    "qkv_bias": r"blk\.\d*\.attn_qkv.bias",
    "qk_norm": r"blk\.\d*\.attn_(q|k)_norm\.weight",
    "kv_cache": r"cache_(k|v)_l\d*",
    "attn_sinks": r"blk\.\d*\.attn_sinks.weight",
    "attn_out_weight": r"blk\.\d*\.attn_output.weight",
    "attn_out_bias": r"blk\.\d*\.attn_output.bias",
    "attn_gate_weight": r"blk\.\d*\.attn_gate.weight",
    "ffn_up_weight": r"blk\.\d*\.ffn_up(_exps)?.weight",
    "ffn_up_bias": r"blk\.\d*\.ffn_up(_exps)?.bias",
    "ffn_gate_weight": r"blk\.\d*\.ffn_gate(_exps)?.weight",
    "ffn_gate_bias": r"blk\.\d*\.ffn_gate(_exps)?.bias",
    "ffn_gate_up_weight": r"blk\.\d*\.ffn_gate_up(_exps)?.weight",
    "ffn_down_weight": r"blk\.\d*\.ffn_down(_exps)?.weight",
    "ffn_down_bias": r"blk\.\d*\.ffn_down.bias",
    "ffn_down_exps_bias": r"blk\.\d*\.ffn_down_exps.bias",
    "output_weight": r"output\.weight",
    "output_bias": r"output\.bias",
}
_RE = {key: re.compile(pattern) for key, pattern in _P.items()}


def _is(key: str, name: str) -> bool:
    return _RE[key].fullmatch(name) is not None


@dataclass(frozen=True)
class SplitRule:
    """How one tensor is cut: the axis (or MIRRORED/PARTIAL), the tensor whose type sets the quantisation block
    of the granularity (``axis_tensor``), and the rotation of the proportions."""

    axis: int
    axis_tensor: str | None
    il: int
    rotation: int


class TensorSplitModel:
    """Cuts a model's tensors and KV cache across ``n_devices`` the way llama.cpp's Meta device does."""

    def __init__(self, model: ModelInfo, n_devices: int) -> None:
        self.model = model
        self.n_devices = n_devices
        self.types = {t.name: t.ggml_type for t in model.tensors}
        # Step 0: il_eff, the index of a layer among the earlier layers of its kind (sliding window or not).
        self.il_eff: list[int] = []
        seen: dict[bool, int] = {}
        for il in range(model.n_layer):
            kind = bool(model.swa_layers[il]) if model.swa_layers else False
            self.il_eff.append(seen.get(kind, 0))
            seen[kind] = seen.get(kind, 0) + 1

    # -- which axis -------------------------------------------------------------------------------------
    def rule(self, name: str, shape: Sequence[int]) -> SplitRule:
        """get_tensor_config for the generic (non-DeepSeek-V4, non-recurrent) case."""
        n = self.n_devices
        if name.startswith("blk."):
            il = int(name.split(".", 2)[1])
            rotation = self.il_eff[il] % n if il < len(self.il_eff) else 0
        elif name.startswith("cache_"):
            il = int(name.rsplit("_l", 1)[1])
            rotation = self.il_eff[il] % n
        else:
            il, rotation = 0, self.model.n_layer % n
        prefix = f"blk.{il}."

        def with_axis(axis: int, suffix: str = "", fallback: str = "") -> SplitRule:
            if not suffix:
                return SplitRule(axis, name, il, rotation)
            target = prefix + suffix
            if target not in self.types and fallback:
                target = prefix + fallback
            return SplitRule(axis, target, il, rotation)

        if self.model.architecture == "hrm_text":
            return SplitRule(MIRRORED, None, 0, 0)
        if _is("q_weight", name) or _is("kv_weight", name) or _is("qkv_weight", name):
            return with_axis(1, "attn_output.weight", "ssm_out.weight")
        if _is("q_bias", name) or _is("kv_bias", name) or _is("qkv_bias", name):
            return with_axis(0, "attn_output.weight", "ssm_out.weight")
        if _is("qk_norm", name):
            mirrored = len(shape) < 2 or shape[1] == 1
            return with_axis(MIRRORED if mirrored else 1, "attn_output.weight")
        if _is("kv_cache", name) or _is("attn_sinks", name):
            return with_axis(0, "attn_output.weight")
        if _is("attn_out_weight", name):
            return with_axis(0)
        if _is("attn_out_bias", name):
            return with_axis(MIRRORED)
        if _is("attn_gate_weight", name):
            return with_axis(1, "attn_output.weight", "ssm_out.weight")
        if _is("ffn_up_weight", name) or _is("ffn_gate_weight", name) or _is("ffn_gate_up_weight", name):
            return with_axis(1, "ffn_down.weight", "ffn_down_exps.weight")
        if _is("ffn_up_bias", name) or _is("ffn_gate_bias", name):
            return with_axis(0, "ffn_down.weight", "ffn_down_exps.weight")
        if _is("ffn_down_weight", name):
            return with_axis(0, "ffn_down.weight", "ffn_down_exps.weight")
        if _is("ffn_down_bias", name):
            return with_axis(MIRRORED)
        if _is("ffn_down_exps_bias", name):
            return with_axis(PARTIAL, "ffn_down_exps.weight")
        if _is("output_weight", name):
            return with_axis(1)
        if _is("output_bias", name):
            return with_axis(0)
        return with_axis(MIRRORED)

    # -- how finely -------------------------------------------------------------------------------------
    def segments(self, name: str, ne_axis: int, il: int) -> list[tuple[int, int]]:
        """get_split_segments: (elements, repeats) of the independently split parts of the axis."""
        model = self.model
        if _is("qkv_weight", name) or _is("qkv_bias", name):
            n_embd_q = model.n_head[il] * model.n_embd_head_k
            n_embd_k, n_embd_v = model.n_embd_k_gqa(il), model.n_embd_v_gqa(il)
            if n_embd_k == n_embd_v:
                return [(n_embd_q, 1), (n_embd_k, 2)]
            return [(n_embd_q, 1), (n_embd_k, 1), (n_embd_v, 1)]
        if (_is("ffn_up_weight", name) or _is("ffn_up_bias", name)) and ne_axis == 2 * model.n_ff[il]:
            return [(model.n_ff[il], 2)]  # fused up+gate named "up" (Phi-3)
        if _is("ffn_gate_up_weight", name):
            return [(model.n_ff_exp, 2)]
        return [(ne_axis, 1)]

    def granularity(self, name: str, block: int, il: int, n_segments: int) -> list[int]:
        """get_split_granularity for attention layers (not linear-attention ones)."""
        model = self.model
        n_head, n_head_kv = model.n_head[il], max(model.n_head_kv[il], 1)
        head_k, head_v = model.n_embd_head_k, model.n_embd_head_v
        n_gqa = max(n_head // n_head_kv, 1)
        n_embd_q = n_gqa * head_k
        # Step 1: grow the block while it keeps every device busy ("to handle head sizes like 80").
        block_perf = block
        while block_perf < 128 and block_perf * self.n_devices < n_embd_q:
            block_perf *= 2
        granularity_q = math.lcm(n_embd_q, block_perf)
        granularity_head = granularity_q // head_k
        if _is("attn_sinks", name):
            return [granularity_head]
        if _is("q_weight", name) or _is("q_bias", name):
            return [granularity_q]
        if _is("attn_out_weight", name):
            return [granularity_head * head_v]
        if _is("attn_gate_weight", name):
            return [granularity_head]
        granularity_kv = granularity_q // n_gqa
        granularity_v = granularity_kv // head_k * head_v
        if _is("kv_weight", name) or _is("kv_bias", name) or _is("kv_cache", name):
            is_v = "attn_v" in name or "cache_v" in name
            return [granularity_v if is_v else granularity_kv]
        if _is("qkv_weight", name) or _is("qkv_bias", name):
            if n_segments == 3:
                return [granularity_q, granularity_kv, granularity_v]
            return [granularity_q, granularity_kv]
        ffn = ("ffn_up_weight", "ffn_up_bias", "ffn_gate_weight", "ffn_gate_bias", "ffn_gate_up_weight",
               "ffn_down_weight")  # fmt: skip
        if any(_is(key, name) for key in ffn):
            return [math.lcm(block, 128)]
        return [1] * n_segments

    def split_elements(
        self, name: str, shape: Sequence[int], proportions: Sequence[float] | None
    ) -> tuple[int, list[int]]:
        """(axis, elements along it per device); axis MIRRORED/PARTIAL means a full copy everywhere."""
        rule = self.rule(name, shape)
        n = self.n_devices
        if rule.axis < 0 or rule.axis >= len(shape):
            return (MIRRORED if rule.axis != PARTIAL else PARTIAL), []
        type_id = self.types.get(rule.axis_tensor or name)
        block = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)][0] if type_id is not None else 1
        segments = self.segments(name, shape[rule.axis], rule.il)
        granularity = self.granularity(name, block, rule.il, len(segments))
        # Step 2: the proportions rotated for this layer, summed in float32 as llama.cpp does.
        values = [0.0 if proportions is None else float(proportions[(j + rule.rotation) % n]) for j in range(n)]
        scan = np.cumsum(np.asarray(values, dtype=np.float32), dtype=np.float32)
        per_device = [0] * n
        # Step 3: each boundary rounded down to the granularity; the last device takes the rest.
        for (ne_s, repeats), g_s in zip(segments, granularity, strict=True):
            low = 0
            for j in range(n - 1):
                if scan[-1] == 0.0:
                    high = ne_s * (j + 1) // n
                else:
                    high = int(np.float32(np.float32(ne_s) * scan[j]) / scan[-1])
                high -= high % g_s
                per_device[(j + rule.rotation) % n] += (high - low) * repeats
                low = high
            per_device[(n - 1 + rule.rotation) % n] += (ne_s - low) * repeats
        return rule.axis, per_device

    # -- bytes ------------------------------------------------------------------------------------------
    def tensor_bytes(
        self, tensor: TensorInfo, proportions: Sequence[float] | None, backends: Sequence[AllocatorBackend]
    ) -> list[int]:
        """Bytes each device allocates for its slice of one weight tensor."""
        axis, elements = self.split_elements(tensor.name, tensor.shape, proportions)
        sizes = []
        for j, backend in enumerate(backends):
            shape = list(tensor.shape)
            if axis >= 0:
                shape[axis] = elements[j]
            sizes.append(slice_alloc_bytes(tensor.ggml_type, shape, backend))
        return sizes

    def group_bytes(
        self, tensors: Sequence[TensorInfo], proportions: Sequence[float] | None, backends: Sequence[AllocatorBackend]
    ) -> list[int]:
        total = [0] * self.n_devices
        for tensor in tensors:
            for j, size in enumerate(self.tensor_bytes(tensor, proportions, backends)):
                total[j] += size
        return total

    def split_fraction_bytes(self, tensors: Sequence[TensorInfo]) -> tuple[int, int]:
        """(bytes that are split, bytes mirrored on every device) of a group of tensors."""
        split = mirrored = 0
        for tensor in tensors:
            axis = self.rule(tensor.name, tensor.shape).axis
            if 0 <= axis < len(tensor.shape):
                split += tensor.n_bytes
            else:
                mirrored += tensor.n_bytes
        return split, mirrored

    def layer_kv_bytes(
        self, il: int, settings: RuntimeSettings, proportions: Sequence[float] | None
    ) -> list[int]:
        """KV-cache bytes of layer ``il`` per device: K and V split by KV heads (flash attention: V untransposed)."""
        model = self.model
        cells = layer_cells(model, settings, il) * settings.n_stream
        sizes = [0] * self.n_devices
        for kind, width, type_name in (
            ("k", model.n_embd_k_gqa(il), settings.type_k),
            ("v", model.n_embd_v_gqa(il), settings.type_v),
        ):
            _, elements = self.split_elements(f"cache_{kind}_l{il}", (width, cells), proportions)
            for j, n_elements in enumerate(elements):
                sizes[j] += cache_type_row_bytes(type_name, n_elements) * cells if n_elements else 0
        return sizes

    def kv_misaligned(self, settings: RuntimeSettings, proportions: Sequence[float] | None) -> str | None:
        """A KV slice that is not whole quantisation blocks of the cache type (ggml cannot make such a tensor)."""
        for il in range(self.model.n_layer):
            for kind, width, type_name in (
                ("k", self.model.n_embd_k_gqa(il), settings.type_k),
                ("v", self.model.n_embd_v_gqa(il), settings.type_v),
            ):
                block = GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]][0]
                _, elements = self.split_elements(f"cache_{kind}_l{il}", (width, 1), proportions)
                bad = [e for e in elements if e % block]
                if bad:
                    return (
                        f"layer {il}'s {kind.upper()} cache would be cut into slices of {elements} values, not "
                        f"whole {type_name} blocks of {block}"
                    )
        return None

    def reduce_buffer_bytes(self, settings: RuntimeSettings) -> int:
        """All-reduce scratch per device: ceil(log2 n) buffers of the largest partial result (first decode)."""
        n_steps = math.ceil(math.log2(self.n_devices)) if self.n_devices > 1 else 0
        n_tokens = min(settings.n_ubatch, settings.n_batch, -(-settings.n_ctx // 256) * 256)
        n_tokens = -(-n_tokens // settings.n_seq_max) * settings.n_seq_max
        width = self.model.n_embd * (self.model.n_expert_used if self.model.n_expert else 1)
        return n_steps * width * n_tokens * 4


def slice_alloc_bytes(ggml_type: int, shape: Sequence[int], backend: AllocatorBackend) -> int:
    """A tensor's alloc size in a buffer of ``backend`` (ggml_nbytes, CUDA's row padding), padded to alignment."""
    if not shape or any(n <= 0 for n in shape):
        return 0
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    size = shape[0] // block * type_size
    for n in shape[1:]:
        size *= n
    if backend in ("cuda", "rocm") and block > 1 and shape[0] % CUDA_MATRIX_ROW_PADDING:
        size += (CUDA_MATRIX_ROW_PADDING - shape[0] % CUDA_MATRIX_ROW_PADDING) // block * type_size
    alignment = BUFFER_ALIGNMENT[backend]
    return -(-size // alignment) * alignment


def meta_backend(backends: Sequence[AllocatorBackend]) -> AllocatorBackend:
    """The backend whose alloc sizes the Meta device's compute buffer follows (the largest of its devices)."""
    if "cuda" in backends:
        return "cuda"
    if "rocm" in backends:
        return "rocm"
    return "cpu"


def device_weight_bytes(
    split: TensorSplitModel,
    groups: WeightGroups,
    first_block: int,
    with_output: bool,
    proportions: Sequence[float] | None,
    backends: Sequence[AllocatorBackend],
) -> list[int]:
    """Weights per device: the slices of every block from ``first_block`` on, and of the output layer."""
    total = [0] * split.n_devices
    for block in groups.blocks[first_block:]:
        for j, size in enumerate(split.group_bytes(block, proportions, backends)):
            total[j] += size
    if with_output:
        for j, size in enumerate(split.group_bytes(groups.output, proportions, backends)):
            total[j] += size
    return total
