"""Prometheus metrics of one app: requests, tokens, latency, queue depth and per-device memory.

Each app gets its own CollectorRegistry, so several apps (tests) never share counters. Gauges that mirror
live state (queue depth, memory) are read at scrape time from the registry of models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets sized for local inference: TTFT from tens of ms (cached prompt, small model) to a minute (long
# prompt, partly on CPU); inter-token latency from 5 ms (fast GPU) to 2 s (CPU offload).
TTFT_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
ITL_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "llamasplit_requests",
            "HTTP requests by route and status code",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "llamasplit_prompt_tokens", "Prompt tokens processed", ["model"], registry=self.registry
        )
        self.generated_tokens = Counter(
            "llamasplit_generated_tokens", "Tokens generated", ["model"], registry=self.registry
        )
        self.ttft = Histogram(
            "llamasplit_time_to_first_token_seconds",
            "Time from receiving a request to its first generated token",
            ["model"],
            buckets=TTFT_BUCKETS_S,
            registry=self.registry,
        )
        self.itl = Histogram(
            "llamasplit_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request",
            ["model"],
            buckets=ITL_BUCKETS_S,
            registry=self.registry,
        )
        self.cancelled = Counter(
            "llamasplit_requests_cancelled",
            "Generations stopped because the client went away",
            ["model"],
            registry=self.registry,
        )

    def add_live_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self.registry.register(_Live(collect))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Live(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()

    def describe(self) -> Iterable[Metric]:
        return []


def gauge(name: str, doc: str, labels: list[str], rows: Iterable[tuple[list[str], float]]) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in rows:
        family.add_metric(values, value)
    return family
