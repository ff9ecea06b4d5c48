"""Prometheus metrics and the recent-requests window behind the status page.

Each app owns its `CollectorRegistry` (never the process-global one), so
several apps in one process (tests) never share counters. Counters and
histograms are updated as requests run; facts that live elsewhere (queue
depth, store counts, sync backlog, model identity) are read at scrape time
into `Metrics.facts` and exposed by one collector.
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from typing import Any
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Latency buckets from a 2 ms cache hit to a 30 s phone upload over bad Wi-Fi.
SECONDS_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)
# The status page's "recently"; requests kept at most in that window (bounds memory).
RECENT_WINDOW_S = 300.0
RECENT_MAX = 50_000
_NAME = re.compile(r"[^a-zA-Z0-9_]")


class RecentRequests:
    """(time, seconds, status) of the requests answered in the last `window_s`, for count and percentiles."""

    def __init__(self, window_s: float = RECENT_WINDOW_S, max_kept: int = RECENT_MAX) -> None:
        self.window_s = window_s
        self._items: deque[tuple[float, float, int]] = deque(maxlen=max_kept)

    def add(self, seconds: float, status: int, *, now: float | None = None) -> None:
        self._items.append((time.monotonic() if now is None else now, seconds, status))

    def summary(self, *, now: float | None = None) -> dict[str, Any]:
        """Count, errors (5xx), client errors (4xx), p50/p95 in ms over the window."""
        now = time.monotonic() if now is None else now
        while self._items and self._items[0][0] < now - self.window_s:
            self._items.popleft()
        durations = sorted(seconds for _, seconds, _ in self._items)
        statuses = [status for _, _, status in self._items]
        return {
            "window_s": self.window_s,
            "requests": len(durations),
            "client_errors": sum(1 for s in statuses if 400 <= s < 500),
            "server_errors": sum(1 for s in statuses if s >= 500),
            "p50_ms": _percentile_ms(durations, 0.50),
            "p95_ms": _percentile_ms(durations, 0.95),
        }


def _percentile_ms(sorted_seconds: list[float], q: float) -> float | None:
    if not sorted_seconds:
        return None
    index = min(len(sorted_seconds) - 1, max(0, math.ceil(q * len(sorted_seconds)) - 1))
    return round(sorted_seconds[index] * 1000.0, 1)


class Metrics:
    """Every metric of one app, on its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("appliance_requests", "HTTP requests answered, by route, method and status.",
                                ["route", "method", "status"], registry=self.registry)
        self.request_seconds = Histogram("appliance_request_duration_seconds", "Whole-request latency by route.",
                                         ["route"], buckets=SECONDS_BUCKETS, registry=self.registry)
        self.in_progress = Gauge("appliance_requests_in_progress", "Requests being handled now.",
                                 registry=self.registry)
        self.stage_seconds = Histogram("appliance_stage_duration_seconds",
                                       "Time in each step of an image request: decode, inference (queue wait "
                                       "included), storage.", ["stage"], buckets=SECONDS_BUCKETS,
                                       registry=self.registry)
        self.batch_size = Histogram("appliance_inference_batch_size", "Images per runtime call.",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.model_reloads = Counter("appliance_model_reloads", "Model reloads, by result: ok (swapped), refused "
                                     "(a check failed; the current version kept serving), unchanged.", ["result"],
                                     registry=self.registry)
        for result in ("ok", "refused", "unchanged"):
            self.model_reloads.labels(result)  # present from the start: a dashboard sees 0, not nothing
        self.recent = RecentRequests()
        self.facts: dict[str, Any] = {}
        self.registry.register(_FactsCollector(self))

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record one step's duration (the services' and scheduler's hook)."""
        self.stage_seconds.labels(stage).observe(seconds)

    def observe_batch(self, size: int) -> None:
        """Record one runtime call's batch size."""
        self.batch_size.observe(size)

    def render(self) -> bytes:
        """The exposition text of every metric."""
        return generate_latest(self.registry)


class _FactsCollector(Collector):
    """Exposes `Metrics.facts`, gathered by the /metrics handler just before rendering."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        facts = self.metrics.facts
        if not facts:
            return
        yield _gauge("appliance_up_seconds", "Seconds since the process started.", facts["uptime_s"])
        yield _gauge("appliance_ready", "1 when /ready answers 200.", 1.0 if facts["ready"] else 0.0)
        model = facts.get("model")
        if model:
            info = GaugeMetricFamily("appliance_model_info", "The model being served (always 1).",
                                     labels=["name", "version", "artifact", "runtime", "device", "demo"])
            info.add_metric([str(model.get(k, "")) for k in ("name", "version", "artifact", "runtime", "device")]
                            + [str(bool(model.get("demo"))).lower()], 1.0)
            yield info
        inference = facts.get("inference", {})
        if inference:
            yield _gauge("appliance_inference_queue_depth", "Images waiting for a batch.", inference["queue_depth"])
            yield _gauge("appliance_inference_queue_size", "Queue capacity; beyond it requests get 503.",
                         inference["queue_size"])
            yield _counter("appliance_inference_batches", "Runtime calls made.", inference["batches"])
            yield _counter("appliance_inference_images", "Images classified.", inference["images"])
        watch = (facts.get("served_path") or {}).get("watch")
        if watch:
            yield _counter("appliance_parity_samples", "Answered photos the live parity watch re-ran on the reference "
                           "path.", watch["samples"])
            yield _counter("appliance_parity_dropped", "Photos sampled for the watch but dropped (its queue was full).",
                           watch["dropped"])
            yield _gauge("appliance_parity_fell_back", "1 once the watch fell back to the reference path (until a "
                         "reload).", 1.0 if watch["fell_back"] else 0.0)
            if watch["top1_agreement"] is not None:
                yield _gauge("appliance_parity_top1_agreement", "Top-1 agreement with the reference path over the "
                             "watch's window.", watch["top1_agreement"])
                yield _gauge("appliance_parity_max_abs_dp", "Largest probability difference from the reference path "
                             "over the watch's window.", watch["max_abs_dp"])
        yield _gauge("appliance_bodies_in_progress", "Requests holding a body (limits.max_concurrent_bodies).",
                     facts.get("bodies_in_progress", 0))
        if "memory_trims" in facts:
            yield _counter("appliance_memory_trims", "Times freed memory was given back to the OS after uploads.",
                           facts["memory_trims"])
        if "auth_failures" in facts:
            yield _counter("appliance_auth_wrong_keys", "Requests that presented a wrong API key.",
                           facts["auth_failures"]["wrong_keys"])
            yield _counter("appliance_auth_refused", "Requests answered 429 for their address's wrong keys "
                           "(auth.max_failures_per_minute).", facts["auth_failures"]["refused"])
        yield from _numbers("appliance_store", "Store figure", facts.get("storage") or {})
        sync = facts.get("sync")
        if sync is not None:
            yield _gauge("appliance_sync_present", "1 when a sync worker runs.", 1.0)
            yield from _numbers("appliance_sync", "Sync figure", sync)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=float(value))


def _numbers(prefix: str, doc: str, figures: Mapping[str, Any]) -> Iterator[Metric]:
    """One gauge per numeric figure of a stats dict (store, sync): their shape belongs to their owners."""
    for key, value in figures.items():
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            yield _gauge(f"{prefix}_{_NAME.sub('_', key)}", f"{doc} '{key}'.", value)
