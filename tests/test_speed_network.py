"""The speed model counts a hop over Ethernet for llama.cpp RPC devices on other machines (loopback is free)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuner import Device, PlanRequest, plan_model
from tuner.speed import SpeedModel, is_remote_endpoint, network_token_time_s

GiB = 1024**3


@pytest.mark.parametrize(
    ("endpoint", "remote"),
    [("192.168.1.20:50052", True), ("gpu-box:50052", True), ("127.0.0.1:50052", False),
     ("localhost:50052", False), ("[::1]:50052", False), (None, False)],
)  # fmt: skip
def test_only_endpoints_on_other_machines_cross_the_network(endpoint: str | None, remote: bool) -> None:
    assert is_remote_endpoint(endpoint) is remote


def test_a_remote_device_costs_a_round_trip_and_its_activations_and_the_logits_when_it_holds_the_output() -> None:
    gigabit = SpeedModel()
    n_embd, n_vocab = 8192, 128256  # Llama-3.3-70B
    # RPC devices come first in llama.cpp's order: in the middle, the hidden state goes in and out.
    middle = network_token_time_s([True, False], [40, 41], n_embd, n_vocab, gigabit)
    assert middle == pytest.approx(0.2e-3 + 2 * n_embd * 4 / 117e6)  # 0.76 ms
    # Holding the output layer, it sends the logits back: 0.5 MB, 4.4 ms on gigabit.
    last = network_token_time_s([False, True], [40, 41], n_embd, n_vocab, gigabit)
    assert last == pytest.approx(0.2e-3 + (n_embd + n_vocab) * 4 / 117e6)
    assert network_token_time_s([False, False], [40, 41], n_embd, n_vocab, gigabit) == 0.0
    assert network_token_time_s([True, False], [0, 81], n_embd, n_vocab, gigabit) == 0.0  # no layers, no traffic
    ten_gbe = SpeedModel(network_rtt_s=0.05e-3, network_bandwidth_bytes_per_s=1.17e9)
    assert network_token_time_s([False, True], [40, 41], n_embd, n_vocab, ten_gbe) < last / 5


def test_plans_over_a_lan_worker_predict_fewer_tokens_per_second_than_over_loopback(smollm2: Path) -> None:
    def rpc(host: str) -> Device:
        return Device(name=f"RPC0[{host}:50052]", kind="rpc", backend="cuda", total_bytes=8 * GiB,
                      free_bytes=8 * GiB, endpoint=f"{host}:50052")  # fmt: skip

    local = plan_model(smollm2, PlanRequest(n_ctx=2048), [rpc("127.0.0.1")])
    lan = plan_model(smollm2, PlanRequest(n_ctx=2048), [rpc("192.168.1.20")])
    assert local.predicted_tokens_per_s and lan.predicted_tokens_per_s
    # SmolLM2 (n_embd 576, n_vocab 49152) on a gigabit worker: + 0.2 ms + 0.2 MB of logits per token.
    extra_s = 1 / lan.predicted_tokens_per_s - 1 / local.predicted_tokens_per_s
    assert extra_s == pytest.approx(0.2e-3 + (576 + 49152) * 4 / 117e6, rel=1e-6)
