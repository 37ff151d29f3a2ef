"""Predicts llama.cpp's compute buffers per device by replaying its graph allocator on a rebuilt graph.

llama.cpp sizes each backend's compute buffer at context creation: it builds the worst-case graph
(n_ubatch tokens attending to a full KV cache), lets ``ggml_backend_sched`` split it across backends, and
runs the graph allocator (``ggml-alloc.c``) over it without computing anything. This module does the same
in miniature for llama-style decoders: it rebuilds that graph from the model's shapes (the same ops, in the
same order), assigns backends with the scheduler's rules and replays the allocator's best-fit planning, so
peaks, in-place reuse, copies between devices and fragmentation come out as llama.cpp's do.
The pieces live beside it: ``ggml_graph`` (a miniature of ggml's tensors and graphs), ``reserve_graph``
(the decoder graph), ``ggml_sched`` (backend assignment) and ``ggml_alloc`` (the allocator replay); this
module runs them per reserve graph, shortens long runs of equal blocks first and caches the results.

What the replay finds, in words (T = n_ubatch tokens, n_kv = cells per sequence stream, f32 = 4 bytes):
- attention without flash attention peaks on KQ = n_kv x T x n_head f32 (softmax runs in place) next to
  the mask copy (n_kv x T f32) and a few n_embd x T activations; with flash attention the peak is its
  output (n_embd_head_v x n_head x T f32) and an F16 mask, and on CUDA with a quantised cache the F16
  copies of the layer's K and V views live inside the flash-attention output allocation;
- the feed-forward phase holds gate, up and the GLU result (3 x n_ff x T f32; MoE: n_ff_exp x n_expert_used);
- the output device holds the logits, n_vocab x T f32, beside result_norm;
- the host buffer holds the graph inputs (token ids, positions, KV row indices - n_embd_v_gqa x T int64
  without flash attention - and the masks), the unused inp_embd branch (n_embd x T f32, never freed), the
  token-embedding rows, and the activations of CPU-resident blocks;
- pipeline parallelism (several devices, everything offloaded) keeps 4 live copies of every stage input
  (masks, positions, indices, the incoming residual) on each device and of every graph input on the host;
- op_offload makes the first CUDA/ROCm device run large-batch matmuls of CPU-resident weights: those
  weights, and the KV views of CPU blocks, are copied into its compute buffer.
Fragmentation decides the rest (up to a few n_embd x T blocks), which is why this module replays rather
than sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field

from tuner.layout import Layout, RuntimeSettings
from tuner.memory.encoder_graph import _Encoder, _NoCacheDecoder
from tuner.memory.ggml_alloc import _allocate, _Arena
from tuner.memory.ggml_graph import _F16, _T, _quantized, _row_bytes
from tuner.memory.ggml_sched import _schedule
from tuner.memory.reserve_graph import _Decoder, _Layer, _Run, _Shape
from tuner.model import ModelInfo


@dataclass(frozen=True)
class ComputeBuffers:
    device_bytes: tuple[int, ...]  # compute buffer per device in Layout order (0 for a device with nothing)
    host_bytes: int  # CPU (or CUDA_Host pinned) compute buffer
    output_bytes: int  # the host output buffer (logits/embeddings), llama.cpp logs it separately


class CudaCalibration(BaseModel):
    """How a CUDA/ROCm backend sizes compute tensors. The defaults are ggml-cuda's own rules; with them the
    model reproduces seven H100 runs to the logged 0.01 MiB (tests/data/compute_measurements.json)."""

    model_config = ConfigDict(frozen=True)

    # ggml_backend_cuda_buffer_type_get_alignment
    alignment_bytes: int = Field(default=128, ge=1)
    # GGML_OP_OFFLOAD_MIN_BATCH: matmuls of CPU weights with at least this many rows run on GPU 0.
    op_offload_min_batch: int = Field(default=32, ge=1)
    # The MMA/tile flash-attention kernels convert a quantised K/V view to F16 inside their output allocation
    # (ggml_cuda_flash_attn_ext_get_alloc_size); Ada and newer take the vector kernel up to 2 query rows.
    fa_f16_kv_min_batch: int = Field(default=3, ge=1)
    # Added to every CUDA/ROCm compute buffer: a margin for kernels llama.cpp might pick differently.
    extra_bytes: int = Field(default=0, ge=0)


DEFAULT_CUDA = CudaCalibration()


# ---------------------------------------------------------------------------------------------------------
# Putting it together.
_CPU_ALIGNMENT = 32  # TENSOR_ALIGNMENT: the CPU, CUDA_Host and CPU-backed RPC buffer types
_GGML_SCHED_MAX_COPIES = 4  # llama.cpp's default build: four pipeline stages in flight
_MATRIX_ROW_PADDING = 512  # ggml-cuda pads quantised rows so kernels may overrun them


def _cuda_alloc_size(t: _T, cuda: CudaCalibration) -> int:
    """ggml_backend_cuda_buffer_type_get_alloc_size."""
    size = t.nbytes
    if t.op == "FLASH_ATTN_EXT" and t.src[0].ne[1] >= cuda.fa_f16_kv_min_batch:
        k, v = t.src[1], t.src[2]
        for kv in (k, v):
            if kv.type != _F16:
                size = -(-size // 128) * 128 + kv.ne[0] * kv.ne[1] * kv.ne[2] * kv.ne[3] * 2
    if _quantized(t.type) and t.ne[0] % _MATRIX_ROW_PADDING:
        size += _row_bytes(t.type, _MATRIX_ROW_PADDING - t.ne[0] % _MATRIX_ROW_PADDING)
    return size


def _resolve(settings: RuntimeSettings, n_swa: int, tg: bool, causal: bool = True) -> _Run:
    """The reserve ubatch of llama_context::sched_reserve (pp graph) or its one-token-per-sequence twin."""
    n_seq = settings.n_seq_max
    n_ctx = -(-settings.n_ctx // 256) * 256
    # causal models: a batch never exceeds the context; encoders keep the batch they are given
    n_batch = min(settings.n_ctx, settings.n_batch) if causal else settings.n_batch
    n_ubatch = min(n_batch, settings.n_ubatch)
    n_ctx_seq = n_ctx if settings.kv_unified else -(-(n_ctx // n_seq) // 256) * 256
    n_swa_cells = -(-min(n_ctx_seq, n_swa * (n_seq if settings.kv_unified else 1) + n_ubatch) // 256) * 256
    if tg:
        n_tokens = n_outputs = n_seq
    else:
        n_tokens = min(n_ctx, n_ubatch)
        n_outputs = min(n_tokens, n_batch)
        n_tokens = -(-n_tokens // n_seq) * n_seq
    return _Run(
        n_tokens=n_tokens, n_outputs=n_outputs, n_seqs=n_seq, n_stream=1 if settings.kv_unified else n_seq,
        n_kv=n_ctx_seq, n_kv_swa=n_ctx_seq if settings.swa_full else n_swa_cells,
        flash_attn=settings.flash_attn, type_k=settings.type_k, type_v=settings.type_v,
    )


@lru_cache(maxsize=4096)
def _simulate(shape: _Shape, run: _Run, kinds: tuple[str, ...], plan: tuple[_Layer, ...], out_home: int,
              n_copies: int, full_offload: bool, offloaders: tuple[bool, ...],
              cuda: CudaCalibration) -> tuple[int, ...]:
    """Compute-buffer bytes of every backend (devices, then the host) for one reserve graph."""
    cpu = len(kinds) - 1
    builder = _Encoder if shape.encoder else _NoCacheDecoder if shape.no_cache_decoder else _Decoder
    decoder = builder(shape, run, plan, out_home, cpu, pin_norms=full_offload or run.n_tokens < 32)
    graph = decoder.build()
    nodes, node_ids, leafs, leaf_ids = _schedule(graph, kinds, n_copies, offloaders, cuda.op_offload_min_batch)
    gpu = [k in ("cuda", "rocm") for k in kinds]
    arenas = [_Arena(cuda.alignment_bytes if g else _CPU_ALIGNMENT) for g in gpu]

    def alloc_size(t: _T, backend: int) -> int:
        return _cuda_alloc_size(t, cuda) if gpu[backend] else t.nbytes

    _allocate(nodes, node_ids, leafs, leaf_ids, arenas, alloc_size)
    return tuple(a.max_size + (cuda.extra_bytes if g and a.max_size else 0) for a, g in zip(arenas, gpu, strict=True))


# Graph compression: a run of equal blocks on one backend reaches its peak within its first blocks, so long
# runs are shortened before the replay (whole periods of the layer pattern are dropped from the middle).
# KEEP_PERIODS periods stay at each end of a run; tests/test_compute_model.py checks that the shortened
# replay equals the full one.
_KEEP_PERIODS = 2
_MAX_PERIOD = 12


@lru_cache(maxsize=64)
def _representatives(shape: _Shape, with_types: bool) -> tuple[int, ...]:
    """For every layer, the first layer with the same structure (and weight types when they matter)."""
    per_layer: list[list[tuple[str, str | None, tuple[int, ...]]]] = [[] for _ in range(shape.n_layer)]
    for name, type_, ne in shape.weights:
        if name.startswith("blk."):
            _, layer_text, rest = name.split(".", 2)
            if int(layer_text) < shape.n_layer:
                per_layer[int(layer_text)].append((rest, type_ if with_types else None, ne))
    first: dict[tuple[object, ...], int] = {}
    reps = []
    for il in range(shape.n_layer):
        key = (shape.n_head[il], shape.n_head_kv[il], shape.n_ff[il], shape.swa[il], tuple(sorted(per_layer[il])))
        reps.append(first.setdefault(key, il))
    return tuple(reps)


def _compress(kinds: list[int]) -> list[int]:
    """Indices to keep from one run of blocks on the same backend."""
    n = len(kinds)
    best = (0, 0, 1)  # (length, start, period) of the longest periodic stretch
    for period in range(1, min(_MAX_PERIOD, n // 2) + 1):
        start = 0
        for j in range(n - period + 1):
            if j == n - period or kinds[j] != kinds[j + period]:
                length = j + period - start
                if length > best[0]:
                    best = (length, start, period)
                start = j + 1
    length, start, period = best
    drop = (length - 2 * _KEEP_PERIODS * period) // period * period
    if drop <= 0:
        return list(range(n))
    cut = start + _KEEP_PERIODS * period
    return [*range(cut), *range(cut + drop, n)]


def _plan(shape: _Shape, homes: list[int], cpu_types: bool, compress: bool) -> tuple[_Layer, ...]:
    """The blocks to rebuild; ``cpu_types``: CPU-resident blocks differ by weight type (op_offload copies)."""
    typed, plain = _representatives(shape, True), _representatives(shape, False)
    cpu = max(homes)
    reps = [typed[il] if cpu_types and homes[il] == cpu else plain[il] for il in range(shape.n_layer)]
    keep: list[int] = []
    start = 0
    for il in range(1, shape.n_layer + 1):
        if il == shape.n_layer or homes[il] != homes[start]:
            run = list(range(start, il))
            kept = _compress([reps[j] for j in run]) if compress else range(len(run))
            keep += [run[j] for j in kept]
            start = il
    return tuple(_Layer(reps[il], homes[il], il == shape.n_layer - 1) for il in keep)


_SHAPES: dict[int, tuple[ModelInfo, _Shape]] = {}


def _shape_of(model: ModelInfo) -> _Shape:
    cached = _SHAPES.get(id(model))
    if cached is None or cached[0] is not model:
        cached = (model, _Shape.of(model))
        if len(_SHAPES) > 64:
            _SHAPES.clear()
        _SHAPES[id(model)] = cached
    return cached[1]


def pipeline_parallel(layout: Layout) -> bool:
    """Whether llama.cpp turns on pipeline parallelism (GGML_SCHED_MAX_COPIES graph copies in flight).

    llama_context's rule: more than one device, every block and the output layer offloaded, split mode
    "layer", and every device able to run asynchronously with events (CUDA, HIP and RPC all can).
    """
    return len(layout.device_backends) > 1 and layout.all_offloaded and layout.split_mode == "layer"


def estimate_compute(model: ModelInfo, settings: RuntimeSettings, layout: Layout,
                     cuda: CudaCalibration = DEFAULT_CUDA, *,
                     remote: Sequence[bool] | None = None) -> ComputeBuffers:
    """llama.cpp's compute buffer per device and on the host, and its output (logits) buffer.

    Each buffer is the larger of the prompt-sized reserve graph (n_ubatch tokens) and the one-token-per-
    sequence graph, as llama.cpp reserves both and keeps the larger buffer. ``remote[d]`` marks RPC
    devices: they size tensors like their backend but never take op_offload work (no offload_op).
    """
    return _estimate(model, settings, layout, cuda, compress=True, remote=remote)


def _estimate(model: ModelInfo, settings: RuntimeSettings, layout: Layout, cuda: CudaCalibration,
              compress: bool, remote: Sequence[bool] | None = None) -> ComputeBuffers:
    shape = _shape_of(model)
    kinds = (*layout.device_backends, "cpu")
    cpu = len(kinds) - 1
    homes = []
    for il in range(model.n_layer + 1):
        device = layout.device_of_layer(il)
        if layout.split_mode == "row" and device is not None:
            device = layout.main_gpu  # row split: the main GPU runs everything but the split matmuls
        homes.append(cpu if device is None else device)
    # op_offload: the first local CUDA/ROCm device runs large matmuls of CPU weights (it copies them in,
    # so their types matter then)
    remote = tuple(remote) if remote is not None else (False,) * len(layout.device_backends)
    offloaders = tuple(settings.op_offload and k in ("cuda", "rocm") and not r
                       for k, r in zip(layout.device_backends, remote, strict=True))
    plan = _plan(shape, homes, any(offloaders), compress)
    n_copies = _GGML_SCHED_MAX_COPIES if pipeline_parallel(layout) else 1
    sizes = [0] * len(kinds)
    for tg in (False, True):
        run = _resolve(settings, model.n_swa, tg, causal=not model.embeddings)
        sim = _simulate(shape, run, kinds, plan, homes[model.n_layer], n_copies, layout.all_offloaded,
                        offloaders, cuda)
        sizes = [max(a, b) for a, b in zip(sizes, sim, strict=True)]
    # output_reserve(n_seq_max): one row of logits per sequence, float32, and one embedding row each when the
    # context computes embeddings (llama.cpp reserves the logits even for a model without an output head)
    output_bytes = (model.n_vocab + (model.n_embd if model.embeddings else 0)) * settings.n_seq_max * 4
    return ComputeBuffers(tuple(sizes[:cpu]), sizes[cpu], output_bytes)
