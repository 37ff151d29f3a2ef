"""Weight bytes per device, exactly as llama.cpp's loader places and allocates them.

Placement (src/llama-model.cpp, load_tensors): ``blk.N.*`` tensors live with block N, and so does the embedding
norm ``token_embd_norm.*`` with block 0; ``output.*``, ``output_norm.*`` and a classifier head ``cls.*`` with the
output layer; everything else (token_embd, position and token-type rows) stays on the host. A model
without ``output.weight`` ties its output to ``token_embd``: llama.cpp loads a second copy of it as the output
layer (TENSOR_DUPLICATED), so the output device pays for it too; an encoder (BERT) has no output head to tie.

Allocation: each tensor takes its backend's alloc size (CUDA/HIP pad quantised rows to 512 elements) rounded
up to the buffer alignment (32 bytes on CPU and RPC-CPU, 128 on CUDA/HIP).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tuner.devices import AllocatorBackend
from tuner.model import ModelInfo, TensorInfo

# ggml-cuda/common.cuh MATRIX_ROW_PADDING: the last row of a quantised matrix is padded to this many elements.
CUDA_MATRIX_ROW_PADDING = 512
BUFFER_ALIGNMENT: dict[AllocatorBackend, int] = {"cpu": 32, "cuda": 128, "rocm": 128}
# cls.*: a classifier head; dense_2/dense_3: sentence-transformers' projections after pooling (LAYER_OUTPUT)
OUTPUT_TENSOR_PREFIXES = ("output.", "output_norm.", "cls.", "dense_2.", "dense_3.")
# Input-side tensors llama-arch.cpp files under LLM_TENSOR_LAYER_REPEATING: they live with block 0.
FIRST_BLOCK_PREFIXES = ("token_embd_norm.",)


@dataclass(frozen=True)
class WeightGroups:
    """The model's tensors grouped by the llama.cpp layer that owns them."""

    blocks: tuple[tuple[TensorInfo, ...], ...]  # per block
    output: tuple[TensorInfo, ...]  # output layer (incl. the tied-embedding copy)
    host: tuple[TensorInfo, ...]  # input layer: always on the CPU
    tied_output: bool


def group_tensors(model: ModelInfo) -> WeightGroups:
    blocks: list[list[TensorInfo]] = [[] for _ in range(model.n_layer)]
    output: list[TensorInfo] = []
    host: list[TensorInfo] = []
    for tensor in model.tensors:
        layer = tensor.layer
        if tensor.name.startswith(FIRST_BLOCK_PREFIXES) and model.n_layer:
            layer = 0  # llama-arch.cpp: "do the norms on the first layer (not the input layer)"
        if layer is not None and layer < model.n_layer:
            blocks[layer].append(tensor)
        elif tensor.name.startswith(OUTPUT_TENSOR_PREFIXES):
            output.append(tensor)
        else:
            host.append(tensor)
    # Encoders have no language-model head: nothing to tie, llama.cpp loads no copy of token_embd.
    tied = not model.is_encoder and not any(t.name == "output.weight" for t in output)
    if tied:
        output.extend(t for t in host if t.name == "token_embd.weight")
    return WeightGroups(tuple(tuple(b) for b in blocks), tuple(output), tuple(host), tied)


def tensor_alloc_bytes(tensor: TensorInfo, backend: AllocatorBackend) -> int:
    """Bytes one weight tensor takes in a buffer of ``backend`` (alloc size rounded to the alignment)."""
    size = tensor.n_bytes
    if backend in ("cuda", "rocm") and tensor.shape:
        quant_type = GGMLQuantizationType(tensor.ggml_type)
        block_size, type_size = GGML_QUANT_SIZES[quant_type]
        is_quantized = block_size > 1
        remainder = tensor.shape[0] % CUDA_MATRIX_ROW_PADDING
        if is_quantized and remainder:
            size += (CUDA_MATRIX_ROW_PADDING - remainder) // block_size * type_size
    alignment = BUFFER_ALIGNMENT[backend]
    return -(-size // alignment) * alignment


def group_bytes(tensors: Sequence[TensorInfo], backend: AllocatorBackend) -> int:
    return sum(tensor_alloc_bytes(t, backend) for t in tensors)


Spans = dict[int, tuple[int, int]]  # file index -> (first byte, end byte) of a group of tensors


def file_spans(tensors: Sequence[TensorInfo]) -> Spans:
    """Per file, the byte range a group of tensors occupies."""
    spans: Spans = {}
    for tensor in tensors:
        first, last = spans.get(tensor.file_index, (tensor.offset, tensor.offset + tensor.n_bytes))
        spans[tensor.file_index] = (min(first, tensor.offset), max(last, tensor.offset + tensor.n_bytes))
    return spans


def mapped_bytes(groups: Sequence[Spans]) -> int:
    """Host weights are mmap'd: llama.cpp maps, per file, the range from the first to the last host tensor.
    A tensor listed twice (the tied output copy of token_embd) maps the same bytes, so it costs nothing more."""
    merged: Spans = {}
    for spans in groups:
        for file_index, (first, last) in spans.items():
            have = merged.get(file_index, (first, last))
            merged[file_index] = (min(have[0], first), max(have[1], last))
    return sum(last - first for first, last in merged.values())
