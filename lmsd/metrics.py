"""Prometheus metrics for `GET /metrics`, with prometheus_client.

Counters and histograms follow the scheduler's events (each request's end, loads, unloads) as they are emitted;
the gauges (loaded instances, requests running and queued, worker memory) are read from the scheduler at scrape
time, so they are never stale. The registry is the daemon's own, not prometheus_client's global one.

A `model` label is a model key the daemon has loaded (or tried to load); a request that names anything else —
a typo, a hostile client's random strings — counts under model="" so that clients cannot grow the label set.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from lmsd.instance import SchedulerEvent
    from lmsd.scheduler import Scheduler

CONTENT_TYPE = CONTENT_TYPE_LATEST
_MAX_MODELS = 1000  # distinct model labels kept; beyond, new ones count as ""
# Seconds: from a cached short prompt (~20 ms) to a long generation on a CPU (minutes)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, scheduler: Scheduler) -> None:
        self.registry = r = CollectorRegistry()
        self._models: set[str] = set()
        self.requests = Counter("lms_requests", "Inference requests that ended, by model, endpoint and outcome "
                                "(ok, cancelled: the client left, error)", ["model", "endpoint", "outcome"],
                                registry=r)
        self.prompt_tokens = Counter("lms_prompt_tokens", "Prompt tokens read, by model", ["model"], registry=r)
        self.generated_tokens = Counter("lms_generated_tokens", "Tokens generated, by model", ["model"], registry=r)
        self.duration = Histogram("lms_request_duration_seconds", "Time from a request's arrival to its end",
                                  ["model", "endpoint"], buckets=_DURATION_BUCKETS, registry=r)
        self.ttft = Histogram("lms_time_to_first_token_seconds", "Time from a generation's start in the worker to "
                              "its first token", ["model"], buckets=_TTFT_BUCKETS, registry=r)
        self.loads = Counter("lms_loads", "Model loads, by origin (manual, jit) and result (ok, failed)",
                             ["model", "origin", "result"], registry=r)
        self.unloads = Counter("lms_unloads", "Model unloads, by reason (manual, ttl, evict, crash, shutdown ...)",
                               ["model", "reason"], registry=r)
        self.load_duration = Histogram("lms_load_duration_seconds", "Time a load took, from its start to ready",
                                       ["model"], buckets=_LOAD_BUCKETS, registry=r)
        r.register(_Live(scheduler))
        scheduler.listen(self.observe)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _model(self, key: str, known: bool = False) -> str:
        if known and len(self._models) < _MAX_MODELS:
            self._models.add(key)
        return key if key in self._models else ""

    def observe(self, ev: SchedulerEvent) -> None:
        f = ev.fields
        if ev.kind == "request":
            model = self._model(ev.model)
            endpoint = f.get("endpoint", "")
            status = f.get("status", "")
            outcome = "ok" if status == "ok" else "cancelled" if status == "client disconnected" else "error"
            self.requests.labels(model, endpoint, outcome).inc()
            self.prompt_tokens.labels(model).inc(_number(f.get("prompt_tokens")))
            self.generated_tokens.labels(model).inc(_number(f.get("completion_tokens")))
            if "duration" in f:
                self.duration.labels(model, endpoint).observe(_number(f["duration"]))
            if "time_to_first_token" in f:
                self.ttft.labels(model).observe(_number(f["time_to_first_token"]))
        elif ev.kind == "loaded":
            model = self._model(ev.model, known=True)
            self.loads.labels(model, f.get("origin", ""), "ok").inc()
            if "load_seconds" in f:
                self.load_duration.labels(model).observe(_number(f["load_seconds"]))
        elif ev.kind == "load_failed":
            self.loads.labels(self._model(ev.model, known=True), f.get("origin", ""), "failed").inc()
        elif ev.kind == "unloaded":
            self.unloads.labels(self._model(ev.model, known=True), ev.reason or "manual").inc()


def _number(text: Any) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return 0.0
    return value if value >= 0 and value == value else 0.0  # negative or NaN: a bug upstream, never a crash here


class _Live:
    """The gauges, read from the scheduler when scraped."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterator[GaugeMetricFamily]:
        views = [self.scheduler.view(i) for i in self.scheduler.instances()]
        loaded = GaugeMetricFamily("lms_loaded_instances", "Loaded instances (loading and draining included), "
                                   "by origin", labels=["origin"])
        for origin in ("manual", "jit"):
            loaded.add_metric([origin], sum(1 for v in views if v.origin == origin))
        running = GaugeMetricFamily("lms_requests_running", "Requests being generated now, by instance",
                                    labels=["model", "identifier"])
        queued = GaugeMetricFamily("lms_requests_queued", "Requests waiting for a slot or for the load, by instance",
                                   labels=["model", "identifier"])
        memory = GaugeMetricFamily("lms_worker_memory_bytes", "Resident memory of each instance's worker process",
                                   labels=["model", "identifier"])
        for v in views:
            running.add_metric([v.model, v.identifier], v.in_flight)
            queued.add_metric([v.model, v.identifier], v.queued)
            memory.add_metric([v.model, v.identifier], v.memory_bytes)
        m = self.scheduler.memory_view()
        used = GaugeMetricFamily("lms_memory_accounted_bytes", "Memory the loaded models are accounted for "
                                 "(estimate, or measured when larger)", value=m.used_bytes)
        yield from (loaded, running, queued, memory, used)
        if m.budget_bytes is not None:
            yield GaugeMetricFamily("lms_memory_budget_bytes", "The memory budget loads are fitted into",
                                    value=m.budget_bytes)
