"""Grammar-constrained sampling: llama.cpp's order against the grammar first, on the same generation.

The engine samples a request that has a grammar (a JSON schema, `grammar`, tool calls) in llama.cpp's own
order (common/sampling.cpp, server/engine/sampling.py's RequestSampler): the chain picks a token from the raw
logits, the grammar checks that one token, and only a token it refuses makes the grammar filter the whole
vocabulary before the chain picks again. The simple order puts the grammar in the chain, which filters the
whole vocabulary at every token. This bench decodes SmolLM2 under a JSON-schema grammar with each order and
times the sampling call alone (the decode is the same for both), greedy and at temperature 0.8:

    .venv/bin/python bench/bench_grammar_sampling.py [--tokens 96] [--repeats 3]

Greedy, both orders must produce the same tokens (the best token the grammar allows, either way); the bench
checks it. Results go to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string"},
        "hobbies": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "city", "hobbies"],
}
PROMPT = (
    "<|im_start|>user\nDescribe a made-up person as JSON with name, age, city and hobbies.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def run(llm: Any, request: Any, order: str, n_tokens: int) -> tuple[list[int], list[float]]:
    """Decode ``n_tokens`` under ``request``'s grammar; the tokens and the seconds each sampling call took."""
    import llama_cpp as lc

    from server.engine.sampling import RequestSampler, grammar_sampler, sampler_chain

    ctx, vocab, n_vocab = llm._ctx.ctx, lc.llama_model_get_vocab(llm._model.model), llm.n_vocab()
    if order == "llama.cpp":
        sampler = RequestSampler(lc, vocab, n_vocab, llm.n_ctx(), request)

        def sample() -> int:
            return sampler.sample(ctx, -1)

        free = sampler.free
    else:  # the grammar first, inside one chain: it filters the whole vocabulary at every token
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        lc.llama_sampler_chain_add(chain, grammar_sampler(lc, vocab, request))
        rest = sampler_chain(lc, n_vocab, llm.n_ctx(), request)
        for _ in range(lc.llama_sampler_chain_n(rest)):
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_chain_remove(rest, 0))
        lc.llama_sampler_free(rest)

        def sample() -> int:
            return int(lc.llama_sampler_sample(chain, ctx, -1))

        def free() -> None:
            lc.llama_sampler_free(chain)

    llm.reset()
    llm._ctx.kv_cache_clear()
    llm.eval(llm.tokenize(PROMPT.encode(), special=True))
    tokens: list[int] = []
    seconds: list[float] = []
    try:
        for _ in range(n_tokens):
            started = time.perf_counter()
            token = sample()
            seconds.append(time.perf_counter() - started)
            if lc.llama_vocab_is_eog(vocab, token):
                break
            tokens.append(token)
            llm.eval([token])
    finally:
        free()
    return tokens, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import llama_cpp
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    from server.engine.protocol import GenerationRequest, SamplingParams
    from tests.kit.models import smollm2_path

    llm = llama_cpp.Llama(str(smollm2_path()), n_ctx=1024, n_threads=args.threads, verbose=False)
    gbnf = json_schema_to_gbnf(json.dumps(SCHEMA))
    print(f"SmolLM2-135M-Instruct, vocabulary {llm.n_vocab():,}; {args.tokens} tokens, {args.repeats} repeats")
    for label, sampling in (
        ("greedy", SamplingParams(temperature=0.0)),
        ("temperature 0.8", SamplingParams(temperature=0.8, seed=7)),
    ):
        request = GenerationRequest(prompt_tokens=(), max_tokens=args.tokens, sampling=sampling, grammar=gbnf)
        medians: dict[str, float] = {}
        outputs: dict[str, list[int]] = {}
        for order in ("grammar first", "llama.cpp"):
            per_run = []
            for _ in range(args.repeats):
                tokens, seconds = run(llm, request, order, args.tokens)
                per_run.append(statistics.median(seconds))
                outputs.setdefault(order, tokens)
            medians[order] = statistics.median(per_run)
        same = outputs["grammar first"] == outputs["llama.cpp"]
        text = llm.detokenize(outputs["llama.cpp"]).decode(errors="replace")
        json.loads(text) if len(outputs["llama.cpp"]) < args.tokens else None  # a whole answer must be JSON
        print(
            f"{label}: grammar first {medians['grammar first'] * 1e3:.2f} ms/token, llama.cpp's order "
            f"{medians['llama.cpp'] * 1e3:.3f} ms/token ({medians['grammar first'] / medians['llama.cpp']:.0f}x); "
            f"same tokens: {same}"
        )
        if label == "greedy" and not same:
            raise SystemExit("greedy answers differ between the two orders: the engine's sampler is wrong")


if __name__ == "__main__":
    main()
