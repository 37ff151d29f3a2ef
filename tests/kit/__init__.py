"""Test-model kit: the real PyPI models (``models``, ``minilm``) and generators of synthetic GGUF files (``synth``
for decoders, ``encoders`` for embedding models)."""

from __future__ import annotations

from tests.kit.encoders import (
    TINY_GEMMA_EMBEDDING,
    TINY_JINA_BERT_V2,
    TINY_NOMIC_BERT,
    EncoderShape,
    write_encoder_gguf,
)
from tests.kit.minilm import minilm_path
from tests.kit.models import TestModelMissing, gemma3_path, smollm2_path
from tests.kit.synth import (
    GEMMA3_270M,
    LLAMA_8B,
    LLAMA_70B,
    SMOLLM2_135M,
    TINY_GEMMA3,
    TINY_LLAMA,
    TINY_MOE,
    TINY_PRESETS,
    TINY_QWEN2,
    WEIGHT_TYPES,
    ModelShape,
    TensorSpec,
    plan_tensors,
    tensor_type,
    write_gguf,
    write_split_gguf,
)

__all__ = [
    "GEMMA3_270M",
    "LLAMA_8B",
    "LLAMA_70B",
    "SMOLLM2_135M",
    "TINY_GEMMA3",
    "TINY_GEMMA_EMBEDDING",
    "TINY_JINA_BERT_V2",
    "TINY_LLAMA",
    "TINY_MOE",
    "TINY_NOMIC_BERT",
    "TINY_PRESETS",
    "TINY_QWEN2",
    "WEIGHT_TYPES",
    "EncoderShape",
    "ModelShape",
    "TensorSpec",
    "TestModelMissing",
    "gemma3_path",
    "minilm_path",
    "plan_tensors",
    "smollm2_path",
    "tensor_type",
    "write_encoder_gguf",
    "write_gguf",
    "write_split_gguf",
]
