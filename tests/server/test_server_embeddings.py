"""/v1/embeddings with a real embedding model: all-MiniLM-L6-v2 (BERT, mean pooling) converted from PyPI.

A real server on loopback serves the embedding model beside SmolLM2 (a chat model, never loaded here: the
refusals come before any load). Every vector is compared with llama.cpp's own for the same input:
llama-cpp-python's ``Llama(embedding=True).embed(..., normalize=True)``, run in a child process.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.kit.encoders import TINY_GEMMA_EMBEDDING, TINY_NOMIC_BERT, write_encoder_gguf
from tests.kit.minilm import minilm_path
from tests.server.support import LiveServer, make_settings, metric_value, serve_cli, served, wait_for

pytestmark = pytest.mark.llama

EMBEDDER = "minilm"
CHAT = "smollm2"
NO_POOLING = "no-pooling"
TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "Split a 70B model across an RTX 4090 and an RTX 4080.",
]
# float32 vectors of unit length from two runs of the same kernels: batch composition may reorder sums.
ATOL = 2e-6

_REFERENCE = textwrap.dedent(
    """
    import json, sys
    import llama_cpp
    path, texts, flash_attn = json.load(sys.stdin)
    llm = llama_cpp.Llama(
        path, embedding=True, n_ctx=512, n_batch=512, n_ubatch=512, flash_attn=flash_attn, n_threads=1, verbose=False
    )
    vectors = llm.embed(texts, normalize=True)
    tokens = [llm.tokenize(t.encode("utf-8")) for t in texts]
    json.dump({"vectors": vectors, "tokens": tokens, "n_embd": llm.n_embd()}, sys.stdout)
    """
)


@pytest.fixture(scope="module")
def minilm() -> Path:
    return minilm_path()


def llama_cpp_embeddings(path: Path, texts: list[str], flash_attn: bool) -> dict[str, Any]:
    """llama-cpp-python's own normalised embeddings of ``texts`` (and their tokens), in a child process."""
    done = subprocess.run(
        [sys.executable, "-c", _REFERENCE],
        input=json.dumps([str(path), texts, flash_attn]),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture(scope="module")
def server_flash_attn(embed_server: LiveServer) -> bool:
    """Whether the server opened the embedding model with flash attention (then K and V are cast to F16, and
    the vectors differ from the unfused kernel's by ~1e-4): the reference must use the same."""
    plan = httpx.get(f"{embed_server.url}/v1/plan", timeout=30).json()["data"][0]
    assert plan["model"] == EMBEDDER and plan["load_settings"]["embeddings"]
    return bool(plan["load_settings"]["flash_attn"] == "on")


@pytest.fixture(scope="module")
def reference(minilm: Path, server_flash_attn: bool) -> dict[str, Any]:
    """llama.cpp's own embeddings of TEXTS, with the server's flash-attention setting."""
    return llama_cpp_embeddings(minilm, TEXTS, server_flash_attn)


@pytest.fixture(scope="module")
def embed_server(minilm: Path, smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # An encoder whose GGUF pools as "none": one vector per token, nothing OpenAI's embeddings can return.
    no_pooling = write_encoder_gguf(
        tmp_path_factory.mktemp("encoders") / "no-pooling.gguf", TINY_NOMIC_BERT.replace(pooling="NONE")
    )
    settings = make_settings(
        models=[
            {"path": str(minilm), "alias": EMBEDDER},
            {"path": str(smollm2), "alias": CHAT},
            {"path": str(no_pooling), "alias": NO_POOLING},
        ],
        parallel=4,
        threads=1,
        preload=[EMBEDDER],
    )
    with served(settings) as server:
        yield server


@pytest.fixture
def client(embed_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{embed_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def http(embed_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=embed_server.url, timeout=120) as c:
        yield c


def assert_same_vectors(got: Any, expected: Any) -> None:
    got_array, expected_array = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert got_array.shape == expected_array.shape
    np.testing.assert_allclose(got_array, expected_array, rtol=0, atol=ATOL)
    assert np.allclose(np.linalg.norm(got_array, axis=-1), 1.0, atol=1e-6)


def test_a_batch_of_texts_equals_llama_cpp(client: openai.OpenAI, reference: dict[str, Any]) -> None:
    result = client.embeddings.create(model=EMBEDDER, input=TEXTS, encoding_format="float")
    assert [item.index for item in result.data] == list(range(len(TEXTS)))
    assert_same_vectors([item.embedding for item in result.data], reference["vectors"])
    assert len(result.data[0].embedding) == reference["n_embd"] == 384
    n_tokens = sum(len(t) for t in reference["tokens"])  # [CLS] ... [SEP] each
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (n_tokens, n_tokens)
    assert result.model == EMBEDDER and result.object == "list"


def test_one_string_gives_one_vector(client: openai.OpenAI, http: httpx.Client, reference: dict[str, Any]) -> None:
    before = metric_value(http.get("/metrics").text, "llamasplit_prompt_tokens_total", model=EMBEDDER) or 0.0
    result = client.embeddings.create(model=EMBEDDER, input=TEXTS[2], encoding_format="float")
    assert len(result.data) == 1
    assert_same_vectors(result.data[0].embedding, reference["vectors"][2])
    assert result.usage.prompt_tokens == len(reference["tokens"][2])
    after = metric_value(http.get("/metrics").text, "llamasplit_prompt_tokens_total", model=EMBEDDER)
    assert after == before + len(reference["tokens"][2])  # embedded tokens count as prompt tokens in /metrics


def test_base64_is_little_endian_float32_of_the_same_vectors(
    client: openai.OpenAI, http: httpx.Client, reference: dict[str, Any]
) -> None:
    raw = http.post("/v1/embeddings", json={"model": EMBEDDER, "input": TEXTS, "encoding_format": "base64"})
    assert raw.status_code == 200, raw.text
    floats = http.post("/v1/embeddings", json={"model": EMBEDDER, "input": TEXTS}).json()  # "float" by default
    for item, as_float in zip(raw.json()["data"], floats["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
        assert decoded.tolist() == as_float["embedding"]  # the same float32 values, bit for bit
    # The openai SDK asks for base64 by default and decodes it itself.
    result = client.embeddings.create(model=EMBEDDER, input=TEXTS)
    assert_same_vectors([item.embedding for item in result.data], reference["vectors"])


def test_token_arrays_embed_like_their_text(client: openai.OpenAI, reference: dict[str, Any]) -> None:
    tokens = reference["tokens"]
    many = client.embeddings.create(model=EMBEDDER, input=tokens, encoding_format="float")
    assert_same_vectors([item.embedding for item in many.data], reference["vectors"])
    one = client.embeddings.create(model=EMBEDDER, input=tokens[1], encoding_format="float")
    assert_same_vectors(one.data[0].embedding, reference["vectors"][1])
    assert one.usage.prompt_tokens == len(tokens[1])


def test_concurrent_requests_are_encoded_together_correctly(client: openai.OpenAI, reference: dict[str, Any]) -> None:
    def embed(index: int) -> list[list[float]]:
        # Each request a different slice, so that a vector handed to the wrong request would show.
        texts = TEXTS[index:] + TEXTS[:index]
        result = client.embeddings.create(model=EMBEDDER, input=texts, encoding_format="float")
        return [item.embedding for item in result.data]

    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(embed, range(4)))
    for index, vectors in enumerate(answers):
        expected = reference["vectors"][index:] + reference["vectors"][:index]
        assert_same_vectors(vectors, expected)


def test_inputs_past_one_batch_are_packed_into_several(
    client: openai.OpenAI, minilm: Path, server_flash_attn: bool
) -> None:
    """Twelve inputs of ~150 tokens: three fill the 512-token batch, so the engine encodes four batches, packed
    as llama-cpp-python's embed() packs them (in order, up to n_batch tokens), and gets its vectors. (With flash
    attention llama.cpp's own vector of an input moves by ~5e-5 with its batch-mates, so the same packing is
    what makes them comparable to 2e-6.)"""
    texts = [f"{n} " + " ".join(TEXTS) * 3 for n in range(12)]
    together = client.embeddings.create(model=EMBEDDER, input=texts, encoding_format="float")
    expected = llama_cpp_embeddings(minilm, texts, server_flash_attn)
    assert together.usage.prompt_tokens == sum(len(t) for t in expected["tokens"])
    assert all(len(t) > 128 for t in expected["tokens"])  # at most three per batch
    assert_same_vectors([item.embedding for item in together.data], expected["vectors"])
    assert not np.allclose(expected["vectors"][0], expected["vectors"][1], atol=1e-3)  # each input its own


def test_dimensions_is_refused_unless_it_is_the_models_width(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=EMBEDDER, input="hello", dimensions=128)
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "dimensions"
    assert "dimensions=128" in error["message"] and "384" in error["message"]
    same = client.embeddings.create(model=EMBEDDER, input="hello", dimensions=384, encoding_format="float")
    assert len(same.data[0].embedding) == 384


def test_an_input_longer_than_the_context_is_a_400(http: httpx.Client) -> None:
    long_text = " ".join(["word"] * 600)  # 600 word pieces plus [CLS] and [SEP], past 512 positions
    reply = http.post("/v1/embeddings", json={"model": EMBEDDER, "input": ["short", long_text]})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "input"
    assert error["message"].startswith("input[1] is 602 tokens") and "512" in error["message"]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": ""}, "input", "non-empty string"),
        ({"input": []}, "input", "non-empty string"),
        ({"input": [[101, 99999, 102]]}, "input", "token id 99999"),
        ({"input": "hi", "encoding_format": "float16"}, "encoding_format", "float"),
        ({"input": "hi", "truncate": True}, "truncate", "unrecognized request argument"),
    ],
    ids=["empty-string", "empty-list", "unknown-token-id", "bad-encoding", "unknown-field"],
)
def test_malformed_requests_are_400s_naming_the_parameter(
    http: httpx.Client, body: dict[str, Any], param: str, words: str
) -> None:
    reply = http.post("/v1/embeddings", json={"model": EMBEDDER, **body})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"]


def test_a_chat_model_asked_for_embeddings_says_why(http: httpx.Client, embed_server: LiveServer) -> None:
    reply = http.post("/v1/embeddings", json={"model": CHAT, "input": "hello"})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert (error["code"], error["param"]) == ("model_not_embedding", "model")
    assert "text-generation model (llama)" in error["message"]
    registry = embed_server.app.state.llamasplit.registry
    assert registry.find(CHAT).state == "unloaded"  # refused before anything was loaded


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_an_embedding_model_asked_to_generate_says_why(http: httpx.Client, path: str) -> None:
    body: dict[str, Any] = {"model": EMBEDDER, "max_tokens": 4}
    body.update({"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path else {"prompt": "Hi"})
    reply = http.post(path, json=body)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert (error["code"], error["param"]) == ("model_is_embedding", "model")
    assert "embedding model (bert)" in error["message"] and "/v1/embeddings" in error["message"]


def test_the_model_card_of_an_embedding_model(http: httpx.Client) -> None:
    card = http.get(f"/v1/models/{EMBEDDER}").json()
    assert card["status"] == "ready" and card["chat_template"] is None
    assert card["embedding"] is True  # the web page's chat leaves it out of its model picker
    assert card["n_ctx_per_seq"] == 512  # the longest input: BERT's training context


def test_a_model_that_pools_nothing_fails_to_load_saying_why(http: httpx.Client) -> None:
    reply = http.post("/v1/embeddings", json={"model": NO_POOLING, "input": "the man is eating"})
    assert reply.status_code == 503
    error = reply.json()["error"]
    assert error["code"] == "model_failed"
    assert "pools its embeddings as 'none'" in error["message"] and "mean, cls, last" in error["message"]


def test_a_gemma_embedding_model_serves_llama_cpps_vectors(tmp_path: Path) -> None:
    """The other kind of embedding model: gemma3 blocks run without a cache, pooled, then sentence-transformers'
    dense projections (a synthetic one with random weights; its vectors mean nothing but must be llama.cpp's)."""
    path = write_encoder_gguf(tmp_path / "gemma-embedding.gguf", TINY_GEMMA_EMBEDDING)
    # eight sequences: the five inputs share one batch, as in llama-cpp-python's embed() (flash attention makes
    # a vector depend on its batch-mates by ~5e-5)
    settings = make_settings(models=[{"path": str(path), "alias": "gemma-embed"}], parallel=8, threads=1)
    with served(settings) as server:
        plan = httpx.get(f"{server.url}/v1/plan", timeout=30).json()["data"][0]
        reply = httpx.post(f"{server.url}/v1/embeddings", json={"model": "gemma-embed", "input": TEXTS}, timeout=120)
        chat = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"model": "gemma-embed", "messages": [{"role": "user", "content": "Hi"}]},
            timeout=30,
        )
    assert plan["plan"]["embeddings"] and plan["plan"]["architecture"] == "gemma-embedding"
    assert reply.status_code == 200, reply.text
    expected = llama_cpp_embeddings(path, TEXTS, plan["load_settings"]["flash_attn"] == "on")
    assert_same_vectors([item["embedding"] for item in reply.json()["data"]], expected["vectors"])
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "model_is_embedding"


def test_served_over_two_rpc_devices_as_planned(minilm: Path, reference: dict[str, Any], tmp_path: Path) -> None:
    """Through `llamasplit serve --rpc`: the tuner's plan puts half the blocks on each of two llama.cpp RPC
    devices, llama.cpp allocates exactly what it predicted there, and the vectors are the same."""
    from tests.kit.rpcbed import rpc_servers

    args = ["--model", f"{EMBEDDER}={minilm}", "--tensor-split", "1,1", "--threads", "1"]
    with rpc_servers(2) as endpoints, serve_cli([*args, "--rpc", ",".join(endpoints)], tmp_path / "serve.log") as url:
        entry = httpx.get(url + "/v1/plan", timeout=30).json()["data"][0]
        reply = httpx.post(url + "/v1/embeddings", json={"model": EMBEDDER, "input": TEXTS}, timeout=120)
    assert reply.status_code == 200, reply.text
    assert_same_vectors([item["embedding"] for item in reply.json()["data"]], reference["vectors"])
    memory = entry["memory"]
    assert memory["exact"] and entry["plan"]["embeddings"]
    placed = [d for d in memory["devices"] if d["predicted_weights_bytes"]]
    assert len(placed) == 2
    for device in placed:
        actual = device["actual"]
        assert actual["model_bytes"] == device["predicted_weights_bytes"], device
        assert actual["kv_bytes"] == device["predicted_kv_bytes"] == 0, device
        assert actual["compute_bytes"] == device["predicted_compute_bytes"], device


def test_a_killed_embedding_engine_fails_requests_and_the_model_loads_again(
    http: httpx.Client, embed_server: LiveServer, reference: dict[str, Any]
) -> None:
    """Like any other model: its engine process dying turns it "failed" (a 503 naming why) and
    POST /models/load brings it back. (Last in this file: it kills the module's embedding engine.)"""
    registry = embed_server.app.state.llamasplit.registry
    worker = registry.worker_of(EMBEDDER)
    assert worker is not None
    worker.kill(signal.SIGKILL)
    wait_for(lambda: registry.find(EMBEDDER).state == "failed", 30)
    refused = http.post("/v1/embeddings", json={"model": EMBEDDER, "input": TEXTS})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "model_failed" and "engine process died" in refused.text
    assert http.post("/models/load", json={"model": EMBEDDER}).json()["status"] == "ready"
    again = http.post("/v1/embeddings", json={"model": EMBEDDER, "input": TEXTS})
    assert again.status_code == 200
    assert_same_vectors([item["embedding"] for item in again.json()["data"]], reference["vectors"])
