"""A small Prometheus registry (text exposition format 0.0.4), enough for counters, gauges and
histograms with labels; it avoids a dependency for ~100 lines.

Metrics are per process: with WORKERS > 1 each gunicorn worker answers /metrics with its own
numbers, so scrape through a per-worker port or aggregate by the `instance`/`pid` the scraper sees.
"""
from __future__ import annotations

import math
import os
import threading
from typing import Callable, Iterable, Sequence

# Seconds; spans a cache-hit interactive call (ms) to a large batch (minutes).
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: tuple[str, str] | None = None) -> str:
    pairs = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        pairs.append(f'{extra[0]}="{extra[1]}"')
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()):
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_num(v)}" for k, v in items]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = (),
                 buckets: Iterable[float] = DEFAULT_BUCKETS):
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._series: dict[tuple[str, ...], list] = {}   # key -> [bucket counts, sum, count]

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            series = self._series.setdefault(key, [[0] * len(self.buckets), 0.0, 0])
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    series[0][i] += 1
            series[1] += value
            series[2] += 1

    def count(self, **labels: str) -> int:
        series = self._series.get(self._key(labels))
        return series[2] if series else 0

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, (list(v[0]), v[1], v[2])) for k, v in self._series.items())
        lines = self.header()
        for key, (counts, total, count) in items:
            for bound, c in zip(self.buckets, counts):
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, ('le', _num(bound)))} {c}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_num(total)}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {count}")
        return lines


class CallbackGauge(_Metric):
    """A gauge whose series are read when /metrics is rendered: `read()` -> {label values: value}.
    For what is cheaper to look at than to keep up to date (resident memory, cache sizes)."""
    kind = "gauge"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = (), read=None):
        super().__init__(name, help_text, labelnames)
        self.read = read

    def render(self) -> list[str]:
        try:
            values = dict(self.read()) if self.read is not None else {}
        except Exception:   # a reading that fails must not take /metrics down with it
            values = {}
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_num(v)}"
                                for k, v in sorted(values.items())]


class Registry:
    def __init__(self):
        self._metrics: list[_Metric] = []

    def register(self, metric: _Metric) -> _Metric:
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


class BackendMetrics:
    """The backend's metrics; one instance per app."""

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
    STAGES = ("fetch", "preprocess", "model", "postprocess", "encode")

    def __init__(self):
        self.registry = r = Registry()
        self.requests = r.register(Counter(
            "gem_http_requests_total", "HTTP requests by endpoint, method and status", ("endpoint", "method", "status")))
        self.request_seconds = r.register(Histogram(
            "gem_http_request_duration_seconds", "HTTP request latency by endpoint", ("endpoint",)))
        self.stage_seconds = r.register(Histogram(
            "gem_stage_duration_seconds",
            "time per prediction stage (fetch, preprocess, model, postprocess, encode) per /predict",
            ("stage",)))
        self.tasks = r.register(Counter(
            "gem_tasks_total", "tasks predicted, by outcome (ok or failed)", ("outcome",)))
        self.task_errors = r.register(Counter(
            "gem_task_errors_total", "tasks that got an empty prediction, by reason", ("reason",)))
        self.errors = r.register(Counter(
            "gem_errors_total", "requests answered with an error, by endpoint and kind", ("endpoint", "kind")))
        self.regions = r.register(Counter(
            "gem_results_total", "result items returned, by type", ("type",)))
        self.model_ready = r.register(Gauge(
            "gem_model_ready", "1 when the model is loaded and serving"))
        self.model_load_seconds = r.register(Gauge(
            "gem_model_load_seconds", "time the model took to load"))
        self.webhooks = r.register(Counter(
            "gem_webhook_events_total", "webhook events by action and handling", ("action", "handling")))
        self.background_queued = r.register(Gauge(
            "gem_background_queued_tasks", "tasks waiting to be finished in the background (this process)"))
        self.outbox_tasks = r.register(Gauge(
            "gem_outbox_tasks", "rows of MODEL_DIR's outbox (all processes): queued = tasks to predict, computed = "
            "predictions kept until Label Studio stores them", ["state"]))
        self.label_studio_reachable = r.register(Gauge(
            "gem_label_studio_reachable", "1 while the background finisher reaches Label Studio, 0 while it waits "
            "for it (computing paused, predictions kept in the outbox)"))
        self.background_tasks = r.register(Counter(
            "gem_background_tasks_total",
            "tasks the background finisher handled, by outcome: done (stored), failed, skipped (already stored), "
            "dropped (left at shutdown)", ("outcome",)))
        self.deferred = r.register(Counter(
            "gem_deferred_tasks_total", "tasks /predict had no time for, by what became of them "
            "(queued, queue_full, unavailable)", ("handling",)))
        self.refresh_tasks = r.register(Counter(
            "gem_refresh_tasks_total", "tasks of refreshes after learning (this process), by outcome: queued "
            "(listed for the new version), done (stored), skipped (already stored), labelled (labelled meanwhile, "
            "not predicted), failed, cancelled (dropped for a newer version)", ("outcome",)))
        self.refresh_outbox = r.register(Gauge(
            "gem_refresh_tasks", "refreshes after learning in MODEL_DIR's outbox (all processes): queued = tasks to "
            "predict, computed = predictions to store, pending = refreshes whose tasks are not listed yet",
            ("state",)))
        self.refreshes = r.register(Counter(
            "gem_refreshes_total", "refreshes after learning (this process), by event: requested, started (tasks "
            "listed and queued), done (last task settled), cancelled (by a newer version)", ("event",)))
        self.process = r.register(Gauge("gem_process_info", "constant 1; labels identify this process", ("pid",)))
        self.process.set(1, pid=str(os.getpid()))
        self.before_render: list = []

        # -- memory (bench/soak.py reads these; docs/PERFORMANCE.md "Memory over weeks") --
        from . import memory
        self.resident = r.register(CallbackGauge(
            "gem_process_resident_bytes", "resident memory of this process (VmRSS)",
            read=lambda: {(): v} if (v := memory.resident_bytes()) is not None else {}))
        self.malloc = r.register(CallbackGauge(
            "gem_malloc_bytes", "glibc heap: in_use (allocated), free (kept by the allocator inside its heaps), "
            "mmapped (large blocks)", ("kind",),
            read=lambda: {(k,): v for k, v in (memory.malloc_stats() or {}).items() if k != "arena"}))
        self._caches: dict[str, Callable[[], tuple[int, int]]] = {}
        self.cache_bytes = r.register(CallbackGauge(
            "gem_cache_bytes", "bytes held by each in-memory cache", ("cache",),
            read=lambda: {(name,): read()[0] for name, read in list(self._caches.items())}))
        self.cache_limit_bytes = r.register(CallbackGauge(
            "gem_cache_limit_bytes", "the bound of each in-memory cache, in bytes", ("cache",),
            read=lambda: {(name,): read()[1] for name, read in list(self._caches.items())}))

    def watch_cache(self, name: str, read: Callable[[], tuple[int, int]]) -> None:
        """Report a cache on /metrics: `read()` -> (bytes held, bound in bytes)."""
        self._caches[name] = read

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.observe(seconds, stage=stage)

    def render(self) -> str:
        for refresh in list(self.before_render):   # gauges read from shared state (the outbox file) at scrape time
            try:
                refresh()
            except Exception:   # a metric that cannot be read now must not break /metrics
                pass
        return self.registry.render()
