"""/metrics: what the scheduler's events and state become in Prometheus' text format (the end-to-end scrape is in
tests/e2e/test_http.py)."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from lmsd.instance import InstanceView, MemoryView, SchedulerEvent
from lmsd.metrics import Metrics


class FakeScheduler:
    def __init__(self) -> None:
        self.listeners: list[Any] = []
        self.views: list[InstanceView] = []

    def listen(self, fn: Any) -> None:
        self.listeners.append(fn)

    def emit(self, ev: SchedulerEvent) -> None:
        for fn in self.listeners:
            fn(ev)

    def instances(self) -> list[InstanceView]:
        return self.views

    def view(self, v: InstanceView) -> InstanceView:
        return v

    def memory_view(self) -> MemoryView:
        return MemoryView(used_bytes=300, budget_bytes=1000, available_bytes=2000, limit="auto")


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def view(identifier: str, origin: str, in_flight: int, queued: int) -> InstanceView:
    return InstanceView(identifier=identifier, model=identifier, path="", status="busy", origin=origin,  # type: ignore[arg-type]
                        ttl_seconds=None, ttl_remaining_seconds=None, context_length=4096, size_bytes=1,
                        memory_bytes=123, pid=1, in_flight=in_flight, queued=queued, last_used_unix=0.0)


def test_requests_tokens_loads_and_live_state_are_counted() -> None:
    sched = FakeScheduler()
    m = Metrics(sched)  # type: ignore[arg-type]
    sched.emit(SchedulerEvent("loaded", "smol", "smol", fields={"origin": "jit", "load_seconds": "0.8"}))
    for status in ("ok", "ok", "client disconnected"):
        sched.emit(SchedulerEvent("request", "smol", "smol", fields={
            "endpoint": "/v1/chat/completions", "status": status, "prompt_tokens": "10", "completion_tokens": "5",
            "duration": "1.5", "time_to_first_token": "0.2"}))
    sched.emit(SchedulerEvent("unloaded", "smol", "smol", reason="ttl"))
    sched.views = [view("smol", "jit", 2, 3), view("big", "manual", 0, 0)]
    got = samples(m)
    chat = (("endpoint", "/v1/chat/completions"), ("model", "smol"))
    assert got[("lms_requests_total", (*chat, ("outcome", "ok")))] == 2
    assert got[("lms_requests_total", (*chat, ("outcome", "cancelled")))] == 1
    assert got[("lms_prompt_tokens_total", (("model", "smol"),))] == 30
    assert got[("lms_generated_tokens_total", (("model", "smol"),))] == 15
    assert got[("lms_request_duration_seconds_count", chat)] == 3
    assert got[("lms_time_to_first_token_seconds_bucket", (("le", "0.25"), ("model", "smol")))] == 3
    assert got[("lms_loads_total", (("model", "smol"), ("origin", "jit"), ("result", "ok")))] == 1
    assert got[("lms_load_duration_seconds_sum", (("model", "smol"),))] == 0.8
    assert got[("lms_unloads_total", (("model", "smol"), ("reason", "ttl")))] == 1
    assert got[("lms_loaded_instances", (("origin", "jit"),))] == 1
    assert got[("lms_loaded_instances", (("origin", "manual"),))] == 1
    assert got[("lms_requests_running", (("identifier", "smol"), ("model", "smol")))] == 2
    assert got[("lms_requests_queued", (("identifier", "smol"), ("model", "smol")))] == 3
    assert got[("lms_worker_memory_bytes", (("identifier", "big"), ("model", "big")))] == 123
    assert got[("lms_memory_budget_bytes", ())] == 1000


def test_model_names_clients_invent_do_not_grow_the_label_set() -> None:
    sched = FakeScheduler()
    m = Metrics(sched)  # type: ignore[arg-type]
    for i in range(500):
        sched.emit(SchedulerEvent("request", f"typo-{i}", f"typo-{i}", fields={
            "endpoint": "/v1/completions", "status": "error: no model", "duration": "0.001"}))
    got = samples(m)
    assert got[("lms_requests_total", (("endpoint", "/v1/completions"), ("model", ""), ("outcome", "error")))] == 500
    assert not [k for k in got if any(v.startswith("typo-") for _, v in k[1])]
