"""Prometheus metrics of one daemon, rendered by ``prometheus_client``.

Each ``Daemon`` (and each ``ControlServer``) has a ``CollectorRegistry`` of its own, never the
library's global one: tests run several daemons in one process, and a daemon must not export
what some other part of the process registered. Latencies and failure counts are observed as
they happen; everything that is a state (journal counts, queue depths, the model) is read from
the daemon's status when Prometheus scrapes, so it is never stale and costs nothing between
scrapes. Metric names that existed before (``phicapd_up``, ``phicapd_jobs``, ...) are kept:
dashboards depend on them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: From a socket request answered on an idle model to a deep backlog's wait on a slow GPU.
CAPTION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, math.inf)
#: Control requests: status calls take milliseconds, caption requests up to the caption timeout.
REQUEST_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 1.0, 2.5, 10.0, 30.0, 120.0, 600.0, math.inf)

Status = Callable[[], Mapping[str, Any]]


def render(registry: CollectorRegistry) -> str:
    """The registry in the Prometheus text format 0.0.4."""
    return generate_latest(registry).decode()


class DaemonMetrics:
    """The daemon's registry: caption latencies and failures as observed, the rest from ``status``."""

    def __init__(self, status: Status, is_ready: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._captions = Histogram(
            "phicapd_caption_seconds",
            "Seconds from an image entering the scheduler (decoded) to its caption, by lane.",
            ["lane"],
            buckets=CAPTION_BUCKETS,
            registry=self.registry,
        )
        self._failures = Counter(
            "phicapd_failures",
            "Failed caption attempts since start, by lane and error code.",
            ["lane", "code"],
            registry=self.registry,
        )
        self.registry.register(_StatusCollector(status, is_ready))

    def observe_caption(self, lane: str, seconds: float) -> None:
        self._captions.labels(lane=lane).observe(seconds)

    def observe_failure(self, lane: str, code: str) -> None:
        self._failures.labels(lane=lane, code=code).inc()

    def render(self) -> str:
        return render(self.registry)


class _StatusCollector(Collector):
    """Gauges and totals read from the control API's ``status()`` at scrape time."""

    def __init__(self, status: Status, is_ready: Callable[[], bool]) -> None:
        self._status = status
        self._is_ready = is_ready

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        yield _gauge("phicapd_up", "1 when the model is loaded and the daemon serves captions.", int(self._is_ready()))
        yield _labelled("phicapd_jobs", "Background jobs in the journal by state.", "state", status.get("journal", {}))
        yield _labelled("phicapd_queue_depth", "Items waiting in memory by lane.", "lane", status.get("lanes", {}))
        pending = status.get("watcher_pending")
        yield _gauge("phicapd_watcher_pending", "Files the watcher holds until they settle.", pending)

        progress = status.get("progress") or {}
        yield _gauge("phicapd_backlog", "Background images accepted and not yet captioned.", progress.get("backlog"))
        eta = progress.get("eta_seconds")
        yield _gauge(
            "phicapd_eta_seconds", "Seconds until the backlog is done at the recent rate (NaN: no rate yet).", eta
        )
        yield _labelled(
            "phicapd_failed_jobs",
            "Jobs parked or waiting to be retried, by the code of their last error.",
            "code",
            progress.get("failures_by_code", {}),
        )

        tp = status.get("throughput", {})
        yield CounterMetricFamily("phicapd_captions", "Captions produced since start.", tp.get("captions_total", 0))
        yield CounterMetricFamily("phicapd_batches", "Model batches run since start.", tp.get("batches_total", 0))
        yield _gauge(
            "phicapd_images_per_second", "Captions per second over the last minute.", tp.get("images_per_second_1m")
        )

        model = status.get("model") or {}
        yield _gauge("phicapd_model_loaded", "1 once the model is loaded.", int(bool(model.get("loaded"))))
        info = {k: str(model[k]) for k in ("identity", "device", "dtype") if model.get(k) is not None}
        if info:
            family = GaugeMetricFamily("phicapd_model_info", "The loaded model (value 1).", labels=sorted(info))
            family.add_metric([info[k] for k in sorted(info)], 1)
            yield family
        engine = model.get("engine")
        for key, value in engine.items() if isinstance(engine, dict) else ():
            if _number(value):
                yield _gauge(f"phicapd_engine_{_name(key)}", f"The generation engine's {key}.", value)

        yield from _endpoint_metrics(model.get("endpoints"))

        gpu = status.get("gpu")
        for key in ("memory_allocated_bytes", "memory_reserved_bytes", "memory_total_bytes"):
            if isinstance(gpu, dict) and _number(gpu.get(key)):
                yield _gauge(f"phicapd_gpu_{key}", f"GPU {key.replace('_', ' ')}.", gpu[key])


#: Per remote endpoint: (status key, metric name, help). Counters end in _total in the exposition.
_ENDPOINT_GAUGES = (
    ("up", "phicapd_endpoint_up", "1 while the remote endpoint takes requests, 0 while it is out (circuit open)."),
    ("in_flight", "phicapd_endpoint_in_flight", "Requests on the remote endpoint now."),
    ("limit", "phicapd_endpoint_limit", "The remote endpoint's adaptive in-flight limit."),
    ("latency_ms", "phicapd_endpoint_latency_ms", "The remote endpoint's recent request latency (running average)."),
)
_ENDPOINT_COUNTERS = (
    ("requests", "phicapd_endpoint_requests", "Requests sent to the remote endpoint since start."),
    ("errors", "phicapd_endpoint_errors", "Failed requests to the remote endpoint since start."),
)


def _endpoint_metrics(endpoints: object) -> Iterator[Metric]:
    if not isinstance(endpoints, list) or not endpoints:
        return
    for key, name, doc in _ENDPOINT_GAUGES:
        family = GaugeMetricFamily(name, doc, labels=["endpoint"])
        for e in endpoints:
            value = int(e[key]) if isinstance(e.get(key), bool) else e.get(key)
            family.add_metric([str(e["url"])], value if _number(value) else math.nan)
        yield family
    for key, name, doc in _ENDPOINT_COUNTERS:
        counter = CounterMetricFamily(name, doc, labels=["endpoint"])
        for e in endpoints:
            counter.add_metric([str(e["url"])], e.get(key) or 0)
        yield counter


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def _gauge(name: str, doc: str, value: object) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value if _number(value) else math.nan)


def _labelled(name: str, doc: str, label: str, values: Mapping[str, Any]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=[label])
    for key, value in values.items():
        if _number(value):
            family.add_metric([str(key)], value)
    return family
