"""Prometheus metrics of one app: requests, tokens, latency, queue depth and per-device memory.

Each app gets its own CollectorRegistry, so several apps (tests) never share counters. Gauges that mirror
live state (queue depth, memory) are read at scrape time from the registry of models.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.engine import StepStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets sized for local inference: TTFT from tens of ms (cached prompt, small model) to a minute (long
# prompt, partly on CPU); inter-token latency from 5 ms (fast GPU) to 2 s (CPU offload).
TTFT_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
ITL_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2)
# Tokens in one batching step: 1 (a lone stream) up to the physical batch (a prompt chunk).
STEP_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
THROUGHPUT_WINDOW_S = 10.0
PENDING_STEPS_MAX = 4096  # steps queued between two reads of the metrics before they are recorded anyway


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

        self.step_tokens = Histogram(
            "llamasplit_batch_tokens",
            "Tokens decoded per batching step (batch fill): running streams plus prompt chunks",
            ["model"],
            buckets=STEP_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.step_sequences = Histogram(
            "llamasplit_batch_sequences",
            "Streams that advanced by one token in a batching step",
            ["model"],
            buckets=STEP_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.step_seconds = Histogram(
            "llamasplit_step_seconds",
            "Wall time of one batching step (llama_decode plus sampling)",
            ["model"],
            buckets=ITL_BUCKETS_S,
            registry=self.registry,
        )
        self._step_children: dict[str, tuple[Histogram, Histogram, Histogram]] = {}
        self._window: dict[str, collections.deque[tuple[float, int, int]]] = {}
        self._window_lock = threading.Lock()  # the window and the draining of queued steps
        # Steps not yet in the histograms: (model, time.monotonic() of arrival, step); deque appends are atomic.
        self._pending: collections.deque[tuple[str, float, StepStats]] = collections.deque()

    def observe_step(self, model: str, step: StepStats) -> None:
        """Record one batching step of ``model``. Called where the engine's messages are read (the event loop),
        once per token of a lone stream: the step is only queued here, and goes into the histograms and the
        throughput window when metrics are read (or every PENDING_STEPS_MAX steps), in one pass."""
        self._pending.append((model, time.monotonic(), step))
        if len(self._pending) >= PENDING_STEPS_MAX:
            self._drain()

    def _drain(self) -> None:
        with self._window_lock:
            while self._pending:
                model, at, step = self._pending.popleft()
                children = self._step_children.get(model)
                if children is None:
                    children = self._step_children[model] = (
                        self.step_tokens.labels(model),
                        self.step_sequences.labels(model),
                        self.step_seconds.labels(model),
                    )
                tokens, sequences, seconds = children
                tokens.observe(step.batch_tokens)
                sequences.observe(step.decode_sequences)
                seconds.observe(step.step_s)
                window = self._window.setdefault(model, collections.deque())
                window.append((at, step.prompt_tokens, step.decode_sequences))
                while window and window[0][0] < at - THROUGHPUT_WINDOW_S:
                    window.popleft()

    def throughput(self, model: str) -> tuple[float, float]:
        """(prompt, generated) tokens per second over the last THROUGHPUT_WINDOW_S seconds."""
        self._drain()
        now = time.monotonic()
        with self._window_lock:
            window = [entry for entry in self._window.get(model, ()) if entry[0] >= now - THROUGHPUT_WINDOW_S]
        prompt = sum(entry[1] for entry in window)
        generated = sum(entry[2] for entry in window)
        return prompt / THROUGHPUT_WINDOW_S, generated / THROUGHPUT_WINDOW_S

    def add_live_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self.registry.register(_Live(collect))

    def render(self) -> bytes:
        self._drain()
        return generate_latest(self.registry)


class _Live(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()

    def describe(self) -> Iterable[Metric]:
        return []


def counter(name: str, doc: str, labels: list[str], rows: Iterable[tuple[list[str], float]]) -> Metric:
    """A counter read at scrape time from state the registry keeps (loads, evictions)."""
    family = CounterMetricFamily(name, doc, labels=labels)
    for values, value in rows:
        family.add_metric(values, value)
    return family


def gauge(name: str, doc: str, labels: list[str], rows: Iterable[tuple[list[str], float]]) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in rows:
        family.add_metric(values, value)
    return family
