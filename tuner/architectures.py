"""What the tuner must know per architecture beyond the GGUF keys: which names llama.cpp 0.3.36 accepts, the
default sliding-window layer pattern, which ones keep a recurrent state instead of a plain KV cache, and which
ones (the BERT-family encoders) keep no cache at all.

The lists come from the vendored llama.cpp (src/llama-arch.cpp LLM_ARCH_NAMES, llm_arch_is_recurrent/hybrid,
llama_model::create_memory in src/llama-model.cpp and the `load_swa_pattern(ml, N, dense_first)` calls in
src/models/*.cpp).
"""

from __future__ import annotations

KNOWN_ARCHITECTURES = frozenset(
    """
    clip llama llama4 deci falcon grok gpt2 gptj gptneox mpt baichuan starcoder refact bert modern-bert
    nomic-bert nomic-bert-moe neo-bert jina-bert-v2 jina-bert-v3 eurobert bloom stablelm qwen qwen2 qwen2moe
    qwen2vl qwen3 qwen3moe qwen3next qwen3vl qwen3vlmoe qwen35 qwen35moe qwen4exp phi2 phi3 phimoe plamo plamo2
    plamo3 codeshell orion internlm2 minicpm minicpm3 gemma gemma2 gemma3 gemma3n gemma4 gemma4-assistant
    gemma-embedding starcoder2 mamba mamba2 maple jamba falcon-h1 xverse command-r cohere2 cohere2moe dbrx olmo
    olmo2 olmoe muse-glimmer openelm arctic deepseek deepseek2 deepseek2-ocr deepseek32 deepseek4 chatglm glm4
    glm4moe glm-dsa bitnet t5 t5encoder jais jais2 nemotron nemotron_h nemotron_h_moe exaone exaone4 exaone-moe
    rwkv6 rwkv6qwen2 rwkv7 arwkv7 granite granitemoe granitehybrid graniteswitch granite_swa chameleon
    wavtokenizer-dec plm bailingmoe bailingmoe2 bailingmoe3 dots1 dots3note arcee afmoe laguna ernie4_5
    ernie4_5-moe hunyuan-moe hunyuan-dense hunyuan_vl hy_v3 hy_v4 smollm3 gpt-oss lfm2 lfm2moe dream
    smallthinker llada llada-moe seed_oss grovemoe apertus minimax-01 hrm_text minimax-m2 minimax-m3 cogvlm rnd1
    pangu-embedded mistral3 eagle3 dflash mistral4 paddleocr mimo2 step35 spark2_5 llama-embed maincoder
    kimi-linear kimi-k3 glm5-next talkie mellum nanbeige qwen3tts pockettts
    """.split()
)

# Recurrent or hybrid state (mamba, rwkv, ...): their memory is not a KV cache the tuner models yet.
RECURRENT_ARCHITECTURES = frozenset(
    """
    mamba mamba2 rwkv6 rwkv6qwen2 rwkv7 arwkv7 jamba falcon-h1 plamo2 granitehybrid lfm2 lfm2moe nemotron_h
    nemotron_h_moe qwen3next kimi-linear bailingmoe3 kimi-k3 glm5-next qwen35 qwen35moe qwen4exp deepseek4
    minimax-01
    """.split()
)

# BERT-family encoders: no KV cache (llama_model::create_memory returns nullptr for them), attention over the
# batch's own tokens only (non-causal), and no language-model head (llama.cpp loads no output layer, so
# token_embd is never duplicated onto the output device). Their context computes pooled embeddings.
ENCODER_ARCHITECTURES = frozenset(
    "bert nomic-bert nomic-bert-moe jina-bert-v2 jina-bert-v3 neo-bert eurobert modern-bert".split()
)

# Every architecture llama.cpp runs without a KV cache: the encoders, gemma-embedding (a decoder's weights run
# non-causally for embeddings) and the diffusion models, which re-read the whole sequence at every step.
NO_KV_CACHE_ARCHITECTURES = ENCODER_ARCHITECTURES | frozenset(
    "gemma-embedding wavtokenizer-dec dream llada llada-moe rnd1".split()
)

# Models served for /v1/embeddings rather than chat: the context is created with embeddings on.
EMBEDDING_ARCHITECTURES = ENCODER_ARCHITECTURES | {"gemma-embedding"}

# Default sliding-window pattern when the GGUF has no `{arch}.attention.sliding_window_pattern`:
# (n_pattern, dense_first). With dense_first=False every n-th layer (il % n == n-1) is full attention.
SWA_PATTERNS: dict[str, tuple[int, bool]] = {
    "afmoe": (4, False),
    "cohere2": (4, False),
    "cohere2moe": (4, True),
    "exaone-moe": (4, False),
    "exaone4": (4, False),
    "gemma-embedding": (6, False),
    "gemma2": (2, False),
    "gemma3": (6, False),
    "gemma3n": (5, False),
    "laguna": (4, True),
    "llama4": (4, False),
    "mellum": (4, False),
    "modern-bert": (3, True),
    "muse-glimmer": (4, False),
    "olmo2": (4, False),
    "gpt-oss": (2, False),
    "plamo3": (8, False),
    "smallthinker": (4, True),
}


def swa_layers_from_pattern(n_layer: int, n_pattern: int, dense_first: bool) -> tuple[bool, ...]:
    """llama_hparams::set_swa_pattern: which layers use the sliding window."""
    if n_pattern == 0:
        return (True,) * n_layer
    if dense_first:
        return tuple(il % n_pattern != 0 for il in range(n_layer))
    return tuple(il % n_pattern < n_pattern - 1 for il in range(n_layer))
