"""GET /v1/plan and the memory metrics: the tuner's prediction beside what llama.cpp really allocated."""

from __future__ import annotations

import httpx
import pytest

from tests.server.support import ALIAS, CTX, metric_value

pytestmark = pytest.mark.llama

# SmolLM2-135M: 30 layers, 3 KV heads of 64 dims. An f16 cache holds K and V for every cell of every layer.
N_LAYER, N_EMBD_KV, F16_BYTES = 30, 3 * 64, 2
KV_BYTES = CTX * N_LAYER * 2 * N_EMBD_KV * F16_BYTES


def test_plan_endpoint_has_the_plan_and_what_llama_cpp_allocated(http: httpx.Client) -> None:
    (entry,) = http.get("/v1/plan").json()["data"]
    assert entry["model"] == ALIAS and entry["status"] == "ready" and entry["error"] is None
    plan = entry["plan"]
    assert plan["n_ctx"] == CTX and plan["n_seq_max"] == 1 and plan["n_layer"] == N_LAYER
    assert entry["load_settings"]["n_ctx"] == CTX
    assert entry["load_settings"]["n_gpu_layers"] == plan["n_gpu_layers"]
    memory = entry["memory"]
    buffers = memory["buffers"]
    # llama.cpp's own report: the KV cache it allocated is exactly what the hyper-parameters say.
    assert sum(b["kv_bytes"] for b in buffers.values()) == KV_BYTES
    assert plan["host"]["kv_bytes"] + sum(d["kv_bytes"] for d in plan["devices"]) == KV_BYTES
    # Host totals: predicted from the plan, actual = the sum of llama.cpp's host buffers.
    host_actual = sum(b["model_bytes"] + b["kv_bytes"] + b["compute_bytes"] + b["output_bytes"]
                      for b in buffers.values() if b["host"])  # fmt: skip
    assert memory["host"]["predicted_bytes"] == plan["host"]["total_bytes"]
    assert memory["host"]["actual_bytes"] == host_actual
    assert len(memory["devices"]) == len(plan["devices"])


def test_metrics_expose_requests_tokens_latency_queue_and_memory(http: httpx.Client) -> None:
    http.post("/v1/completions", json={"model": ALIAS, "prompt": "Hi", "max_tokens": 3, "temperature": 0})
    http.post("/v1/completions", json={"model": ALIAS, "prompt": "Hi", "max_tokens": 0})  # a 400
    text = http.get("/metrics").text
    ok = metric_value(text, "llamasplit_requests_total", route="/v1/completions", method="POST", status="200")
    bad = metric_value(text, "llamasplit_requests_total", route="/v1/completions", method="POST", status="400")
    assert ok is not None and ok >= 1 and bad is not None and bad >= 1
    assert (metric_value(text, "llamasplit_prompt_tokens_total", model=ALIAS) or 0) >= 1
    assert (metric_value(text, "llamasplit_generated_tokens_total", model=ALIAS) or 0) >= 1
    assert (metric_value(text, "llamasplit_time_to_first_token_seconds_count", model=ALIAS) or 0) >= 1
    assert (metric_value(text, "llamasplit_inter_token_latency_seconds_count", model=ALIAS) or 0) >= 1
    assert metric_value(text, "llamasplit_queue_depth", model=ALIAS) == 0
    assert metric_value(text, "llamasplit_model_ready", model=ALIAS) == 1
    plan = http.get("/v1/plan").json()["data"][0]
    predicted = metric_value(text, "llamasplit_device_memory_predicted_bytes", model=ALIAS, device="host")
    actual = metric_value(text, "llamasplit_device_memory_actual_bytes", model=ALIAS, device="host", source="llama.cpp")
    assert predicted == plan["plan"]["host"]["total_bytes"]
    assert actual == plan["memory"]["host"]["actual_bytes"]
