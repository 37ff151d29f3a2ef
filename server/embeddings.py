"""/v1/embeddings: OpenAI embedding requests in, engine calls out, vectors back as floats or base64.

Knows the OpenAI protocol and the engine client, neither FastAPI nor llama.cpp. Every check that needs the
model (is it an embedding model, ``dimensions``, each input against the context, token ids against the
vocabulary) is a 400 before the request takes a slot. Vectors come back L2-normalised as OpenAI's and
llama-server's /v1/embeddings return them; base64 is the little-endian float32 bytes OpenAI's clients decode.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import numpy as np
from starlette.concurrency import run_in_threadpool

from server.errors import ContextLengthError, InvalidRequestError, ModelNotReadyError
from server.protocol import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from server.registry import ServedModel

FLOAT32_LE = np.dtype("<f4")


def refuse_unless_embedding_model(model: ServedModel) -> None:
    """An embeddings request for a chat model: 400 naming why, before the model is loaded for nothing."""
    if not model.plan.embeddings:
        raise InvalidRequestError(
            f"the model {model.alias!r} is a text-generation model ({model.plan.architecture}) with no pooled "
            "embeddings; send embeddings requests to an embedding model (a BERT-family GGUF such as "
            "all-MiniLM-L6-v2, bge or nomic-embed)",
            param="model",
            code="model_not_embedding",
        )


def refuse_embedding_model(model: ServedModel, endpoint: str) -> None:
    """A chat or completion request for an embedding model: 400 naming why."""
    if model.plan.embeddings:
        raise InvalidRequestError(
            f"the model {model.alias!r} is an embedding model ({model.plan.architecture}): it has no language-model "
            f"head and cannot generate text, so {endpoint} cannot use it; send its inputs to /v1/embeddings",
            param="model",
            code="model_is_embedding",
        )


def tokenize_inputs(request: EmbeddingRequest, model: ServedModel) -> list[list[int]]:
    """Every input as token ids, checked against the model's vocabulary and its per-input limit."""
    engine = model.engine
    if engine is None:  # it died or was unloaded after the registry handed the model out
        raise ModelNotReadyError(f"the model {model.alias!r} is not loaded: {model.error or 'unloaded'}")
    facts = engine.facts
    if request.dimensions is not None and request.dimensions != facts.n_embd:
        raise InvalidRequestError(
            f"dimensions={request.dimensions} is not supported by {model.alias!r}: it computes {facts.n_embd}-"
            "dimensional embeddings and nothing in its GGUF says it was trained to be shortened (Matryoshka); "
            f"leave dimensions out or set it to {facts.n_embd}",
            param="dimensions",
        )
    tokens = [engine.encode_text(item) if isinstance(item, str) else list(item) for item in request.inputs()]
    for index, ids in enumerate(tokens):
        if not ids:
            raise InvalidRequestError(f"input[{index}] tokenizes to nothing; send some text", param="input")
        if len(ids) > facts.n_ctx_seq:
            raise ContextLengthError(
                f"input[{index}] is {len(ids):,} tokens; {model.alias} embeds at most {facts.n_ctx_seq:,} tokens "
                "per input (its training context, or the batch it was started with if smaller); shorten or "
                "split it",
                param="input",
            )
        bad = next((t for t in ids if not 0 <= t < facts.n_vocab), None)
        if bad is not None:
            raise InvalidRequestError(
                f"input[{index}] holds token id {bad}, but this model's ids run from 0 to {facts.n_vocab - 1}",
                param="input",
            )
    return tokens


def normalized(vector: bytes) -> np.ndarray:
    """The engine's pooled float32 vector scaled to unit length (in float64, as llama.cpp's
    common_embd_normalize sums), back in float32; a zero vector stays zero."""
    values = np.frombuffer(vector, dtype=FLOAT32_LE).astype(np.float64)
    norm = float(np.linalg.norm(values))
    return (values / norm if norm > 0 else values).astype(FLOAT32_LE)


def response(
    request: EmbeddingRequest, model: ServedModel, tokens: Sequence[Sequence[int]], vectors: Sequence[bytes]
) -> EmbeddingList:
    data = []
    for index, vector in enumerate(vectors):
        unit = normalized(vector)
        value: list[float] | str = (
            base64.b64encode(unit.tobytes()).decode("ascii") if request.encoding_format == "base64" else unit.tolist()
        )
        data.append(Embedding(index=index, embedding=value))
    n_tokens = sum(len(ids) for ids in tokens)
    return EmbeddingList(
        data=data, model=model.alias, usage=EmbeddingUsage(prompt_tokens=n_tokens, total_tokens=n_tokens)
    )


async def create_embeddings(request: EmbeddingRequest, model: ServedModel) -> EmbeddingList:
    """Tokenize (off the event loop), wait for a slot of the model's queue, embed, normalise and encode."""
    tokens = await run_in_threadpool(tokenize_inputs, request, model)
    engine = model.engine
    if engine is None or model.queue is None:
        raise ModelNotReadyError(f"the model {model.alias!r} is not loaded: {model.error or 'unloaded'}")
    admission = model.queue.reserve()
    try:
        async with admission:
            vectors = await engine.embed(tokens)
    finally:
        admission.release()
    return await run_in_threadpool(response, request, model, tokens, vectors)
