"""Batching steps are queued on the event loop and recorded when metrics are read (server.metrics.Metrics).

The queue keeps the per-token work of a lone stream to one append; what a scrape shows must be the same as if
every step had gone into the histograms at once, and an unread queue must not grow without bound.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from server.engine import StepStats
from server.metrics import PENDING_STEPS_MAX, Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_queued_steps_show_in_the_histograms_and_the_throughput_when_read() -> None:
    metrics = Metrics()
    steps = [StepStats(batch_tokens=1, decode_sequences=1, prompt_tokens=0, step_s=0.01)] * 5 + [
        StepStats(batch_tokens=40, decode_sequences=8, prompt_tokens=32, step_s=0.2)
    ]
    for step in steps:
        metrics.observe_step("a", step)
    metrics.observe_step("b", steps[0])

    seen = samples(metrics)
    model_a = (("model", "a"),)
    assert seen[("llamasplit_batch_tokens_count", model_a)] == 6
    assert seen[("llamasplit_batch_tokens_sum", model_a)] == 45
    assert seen[("llamasplit_batch_tokens_bucket", (("le", "1.0"), ("model", "a")))] == 5
    assert seen[("llamasplit_batch_sequences_sum", model_a)] == 13
    assert abs(seen[("llamasplit_step_seconds_sum", model_a)] - 0.25) < 1e-9
    assert seen[("llamasplit_batch_tokens_count", (("model", "b"),))] == 1
    prompt, generated = metrics.throughput("a")
    assert (prompt, generated) == (32 / 10, 13 / 10)
    # Read again: nothing is counted twice.
    assert samples(metrics)[("llamasplit_batch_tokens_count", model_a)] == 6


def test_an_unread_queue_is_recorded_at_its_bound() -> None:
    metrics = Metrics()
    step = StepStats(batch_tokens=1, decode_sequences=1, prompt_tokens=0, step_s=0.01)
    for _ in range(PENDING_STEPS_MAX + 10):
        metrics.observe_step("a", step)
    assert len(metrics._pending) < PENDING_STEPS_MAX
    assert samples(metrics)[("llamasplit_batch_tokens_count", (("model", "a"),))] == PENDING_STEPS_MAX + 10
