"""Test-model kit: the real PyPI models (``models``) and a generator of synthetic GGUF files (``synth``)."""

from __future__ import annotations

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
    "TINY_LLAMA",
    "TINY_MOE",
    "TINY_PRESETS",
    "TINY_QWEN2",
    "WEIGHT_TYPES",
    "ModelShape",
    "TensorSpec",
    "TestModelMissing",
    "gemma3_path",
    "plan_tensors",
    "smollm2_path",
    "tensor_type",
    "write_gguf",
    "write_split_gguf",
]
