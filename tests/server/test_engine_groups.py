"""Which devices a model is opened with: only the RPC workers its plan gives a share, with the per-device
settings re-indexed to that shorter list (the tuner's real plans for SmolLM2, on a made-up inventory)."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from server.allocation import build_memory_report
from server.app import create_app
from server.engine_groups import select_devices
from tests.kit.rpcbed import rpc_servers
from tests.server.support import LiveServer, make_settings, wait_for
from tuner import Device, PlanRequest, plan_model
from tuner.inventory import simulated_devices
from tuner.llamacpp import BufferReport, BufferSizes

GiB = 1024**3
W1, W2 = "127.0.0.1:50061", "127.0.0.1:50062"
NO_EOS = {"0": -100, "2": -100}  # SmolLM2's end-of-text tokens: keep a stream going


def rpc_device(endpoint: str) -> Device:
    return Device(
        name=f"RPC0[{endpoint}]", kind="rpc", backend="cuda", total_bytes=8 * GiB, free_bytes=6 * GiB, endpoint=endpoint
    )


def inventory() -> list[Device]:
    """Two RPC workers first (llama.cpp's order), then a local card."""
    return [rpc_device(W1), rpc_device(W2), *simulated_devices("8GiB")]


def test_a_model_kept_in_host_ram_is_opened_without_any_rpc_worker(smollm2: Path) -> None:
    devices = inventory()
    plan = plan_model(smollm2, PlanRequest(n_ctx=2048, n_gpu_layers=0), devices)

    selection = select_devices(plan, devices)
    settings = selection.load_settings(plan.load_settings())

    assert selection.endpoints == ()
    assert selection.indices == (2,)  # the local card stays: llama.cpp lists this machine's GPUs anyway
    assert settings.tensor_split == (plan.tensor_split[2],) and settings.n_gpu_layers == 0


def test_a_model_on_one_worker_is_opened_with_that_worker_alone_and_its_split_reindexed(smollm2: Path) -> None:
    devices = inventory()
    plan = plan_model(smollm2, PlanRequest(n_ctx=2048, tensor_split=(0.0, 1.0, 1.0), main_gpu=2), devices)
    assert plan.devices[0].n_layers == 0 and all(d.n_layers > 0 for d in plan.devices[1:])

    selection = select_devices(plan, devices)
    settings = selection.load_settings(plan.load_settings())

    assert selection.endpoints == (W2,)
    assert selection.indices == (1, 2)  # device_list([W2]): W2's devices, then the local card
    assert settings.tensor_split == (1.0, 1.0)
    assert settings.main_gpu == 1  # the local card, now second in the list
    assert settings.model_dump(exclude={"tensor_split", "main_gpu"}) == plan.load_settings().model_dump(
        exclude={"tensor_split", "main_gpu"}
    )


def test_a_model_across_both_workers_keeps_the_whole_list_unchanged(smollm2: Path) -> None:
    devices = inventory()
    plan = plan_model(smollm2, PlanRequest(n_ctx=2048, tensor_split=(1.0, 1.0, 1.0)), devices)

    selection = select_devices(plan, devices)

    assert selection.endpoints == (W1, W2) and selection.indices == (0, 1, 2) and not selection.narrowed
    assert selection.load_settings(plan.load_settings()) == plan.load_settings()


def test_without_rpc_workers_nothing_is_left_out(smollm2: Path) -> None:
    devices = simulated_devices("8GiB,8GiB")
    plan = plan_model(smollm2, PlanRequest(n_ctx=2048), devices)

    selection = select_devices(plan, devices)

    assert selection.endpoints == () and selection.indices == (0, 1)
    assert selection.load_settings(plan.load_settings()) == plan.load_settings()


def test_the_memory_report_pairs_buffers_with_the_devices_the_model_was_opened_with(smollm2: Path) -> None:
    # Opened without W1: llama.cpp's first device is now W2's, its second the local card (CUDA0).
    devices = inventory()
    plan = plan_model(smollm2, PlanRequest(n_ctx=2048, tensor_split=(0.0, 1.0, 1.0)), devices)
    selection = select_devices(plan, devices)
    report = BufferReport.model_validate(
        {
            "devices": [
                {"name": "RPC0", "description": W2, "free_bytes": 6 * GiB},
                {"name": "CUDA0", "description": "simulated", "free_bytes": 8 * GiB},
            ],
            "buffers": {
                f"RPC0[{W2}]": BufferSizes(model_bytes=40 << 20).model_dump(),
                "CUDA0": BufferSizes(model_bytes=30 << 20).model_dump(),
            },
        }
    )

    memory = build_memory_report(plan, report, devices=devices, opened_with=selection.indices)

    assert [(row.name, row.buffer_name, row.actual_bytes) for row in memory.devices] == [
        (f"RPC0[{W1}]", None, None),
        (f"RPC0[{W2}]", f"RPC0[{W2}]", 40 << 20),
        (plan.devices[2].name, "CUDA0", 30 << 20),
    ]


# -- engine processes over two real RPC servers, the server in this process (its registry is looked at) --


def start_three_models(smollm2: Path, endpoints: list[str]) -> LiveServer:
    """Model a whole on the first RPC server, b whole on the second (both loaded), c across both (on demand)."""
    models = [
        {"path": str(smollm2), "alias": "a", "tensor_split": "1,0"},
        {"path": str(smollm2), "alias": "b", "tensor_split": "0,1"},
        {"path": str(smollm2), "alias": "c", "tensor_split": "1,1"},
    ]
    settings = make_settings(
        models=models, rpc=",".join(endpoints), ctx=512, parallel=1, threads=1, preload=("a", "b"), max_queue=8
    )
    return LiveServer(create_app(settings)).start()


def chat(http: httpx.Client, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0,
            "logit_bias": NO_EOS}  # fmt: skip
    return http.post("/v1/chat/completions", json=body)


@pytest.mark.llama
def test_a_model_across_two_workers_merges_their_engine_processes_once_the_movers_are_idle(
    smollm2: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llamasplit.registry")
    with rpc_servers(2) as endpoints:
        server = start_three_models(smollm2, endpoints)
        registry = server.app.state.llamasplit.registry
        try:
            with httpx.Client(base_url=server.url, timeout=120) as http:
                # One engine process per worker: a dead worker would take down only its own model.
                worker_a, worker_b = registry.worker_of("a"), registry.worker_of("b")
                assert worker_a is not None and worker_b is not None and worker_a.pid != worker_b.pid
                assert registry.held_rpc_endpoints() == set(endpoints)

                # "c" needs both workers: one process must hold them, so "b" must move, which it cannot while
                # it streams. The answer is a retry-later 503 that says so; nothing is unloaded.
                body = {"model": "b", "messages": [{"role": "user", "content": "Tell a long story."}],
                        "max_tokens": 400, "temperature": 0, "logit_bias": NO_EOS, "stream": True}  # fmt: skip
                with http.stream("POST", "/v1/chat/completions", json=body) as stream:
                    lines = stream.iter_lines()
                    next(line for line in lines if line.startswith("data: "))
                    refused = chat(http, "c")
                assert refused.status_code == 503, refused.text
                error = refused.json()["error"]
                assert error["code"] == "no_room"
                assert "b must move into it, but they have requests in flight" in error["message"]
                assert registry.worker_of("b") is worker_b and registry.models["b"].state == "ready"

                # Once "b" is idle, "c" loads: "b" moves into "a"'s process, and all three answer from it.
                wait_for(lambda: registry.models["b"].idle, 30)
                reply = chat(http, "c")
                assert reply.status_code == 200, reply.text
                assert registry.worker_of("a") is registry.worker_of("b") is registry.worker_of("c") is worker_a
                assert not worker_b.alive  # ended once empty, which freed its worker for the merged process
                for name in ("a", "b"):
                    assert chat(http, name).status_code == 200
                assert all(m.state == "ready" for m in registry.models.values())
        finally:
            server.stop()
    assert "b unloaded: moving into engine process rpc-1" in caplog.text
    assert "c uses its RPC workers together" in caplog.text
