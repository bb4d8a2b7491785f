"""Load and soak runs against a real lmsd, with the figures docs/reliability.md reports.

tests/slow runs them at CI sizes and asserts on the figures; `make stress` runs bench/reliability.py, which calls
the same functions with bigger sizes and writes the figures into docs/reliability.md. The HTTP clients are
bench/bench_contention.py's (streaming and not, Retry-After honoured); the models are three keys of SmolLM2.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.bench_contention import (
    MODELS,
    free_port,
    lms,
    loads_in_log,
    make_home,
    percentile,
    run_clients,
    stop_daemon,
)


@dataclass
class LoadFigures:
    clients: int
    seconds: float
    sent: int = 0
    served: int = 0
    refused: int = 0
    refused_with_retry_after: int = 0
    failed: int = 0
    p50: float = 0.0
    p99: float = 0.0
    max_latency: float = 0.0
    swaps: int = 0
    most_instances_of_one_model: int = 0
    zombies: int = 0
    orphans: int = 0
    failures: list[str] = field(default_factory=list)  # the first few, for the assertion message

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Sample:
    rss_mb: float
    fds: int
    threads: int


@dataclass
class SoakFigures:
    cycles: int
    requests: int
    first: Sample | None = None
    last: Sample | None = None
    served: int = 0
    failed: int = 0
    distinct_worker_pids: int = 0
    zombies: int = 0
    orphans: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def processes_of(home: Path) -> list[psutil.Process]:
    """Every live process started for this LMS_HOME (the daemon and its workers carry it in their environment)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("LMS_HOME") == str(home) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def zombies_of(pid: int) -> int:
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return 0
    count = 0
    for child in children:
        try:
            count += child.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            continue
    return count


def daemon_pid(home: Path) -> int:
    return int((home / "run" / "lmsd.pid").read_text())


def shut_down(home: Path) -> int:
    """`lms daemon down`, then the number of this home's processes still alive 10 s later (orphans)."""
    stop_daemon(home)
    deadline = time.monotonic() + 10
    while (left := processes_of(home)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return len(left)


class InstanceWatcher:
    """Polls the daemon's instance table (gRPC ListLoaded, in-process: cheap) and records the most instances
    one model ever had at once."""

    def __init__(self, home: Path, interval: float = 0.2) -> None:
        from lmscli.client import DaemonClient
        from lmsd.config import Paths

        self.client = DaemonClient(Paths(home, home / "models"))
        self.interval = interval
        self.most = 0
        self.seen: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from lmsd.api.v1 import control_pb2 as pb

        while not self._stop.wait(self.interval):
            try:
                instances = self.client.stub.ListLoaded(pb.ListLoadedRequest(), timeout=5).instances
            except Exception:  # noqa: BLE001 - a missed sample is not a finding
                continue
            per_model = Counter(i.model for i in instances)
            self.seen.update(per_model.keys())
            self.most = max(self.most, max(per_model.values(), default=0))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.client.close()
        return self.most


def run_load(clients: int, seconds: float) -> LoadFigures:
    """`clients` concurrent clients (half streaming) over three models with auto-evict on, for `seconds`."""
    figures = LoadFigures(clients, seconds)
    home = make_home()
    port = free_port()
    try:
        lms(home, "daemon", "up")
        lms(home, "server", "start", "--port", str(port))
        watcher = InstanceWatcher(home)
        results, _wall = run_clients(f"http://127.0.0.1:{port}", clients, seconds)
        figures.most_instances_of_one_model = watcher.stop()
        figures.zombies = zombies_of(daemon_pid(home))
        log = (home / "logs" / "lmsd.log").read_text(errors="replace")
    finally:
        figures.orphans = shut_down(home)
        import shutil

        shutil.rmtree(home, ignore_errors=True)
    served = [r for r in results if r.kind == "served"]
    refused = [r for r in results if r.kind == "refused"]
    failed = [r for r in results if r.kind == "failed"]
    latencies = [r.latency for r in served]
    figures.sent, figures.served, figures.refused, figures.failed = len(results), len(served), len(refused), len(failed)
    figures.refused_with_retry_after = sum(1 for r in refused if r.retry_after)
    figures.p50, figures.p99 = round(percentile(latencies, 50), 2), round(percentile(latencies, 99), 2)
    figures.max_latency = round(max(latencies, default=0.0), 2)
    figures.swaps = sum(loads_in_log(log).values())
    figures.failures = [f"{r.status} {r.model} stream={r.stream} {r.code}: {r.body[:300]}" for r in failed[:5]]
    return figures


def sample(pid: int) -> Sample:
    proc = psutil.Process(pid)
    return Sample(round(proc.memory_info().rss / 1e6, 1), proc.num_fds(), proc.num_threads())


def run_soak(cycles: int, requests: int) -> SoakFigures:
    """`cycles` times `lms load` + `lms unload` (the real CLI), then `requests` HTTP requests (a JIT model, half
    streaming, four at a time); the daemon's RSS, open descriptors and threads are sampled after a warm-up and
    at the end."""
    figures = SoakFigures(cycles, requests)
    home = make_home()
    port = free_port()
    model = MODELS[0]
    started = time.monotonic()
    pids: set[int] = set()
    try:
        lms(home, "daemon", "up")
        lms(home, "server", "start", "--port", str(port))
        pid = daemon_pid(home)
        base = f"http://127.0.0.1:{port}"

        from lmscli.client import DaemonClient
        from lmsd.api.v1 import control_pb2 as pb
        from lmsd.config import Paths

        control = DaemonClient(Paths(home, home / "models"))

        def cycle() -> None:
            lms(home, "load", model, "--ttl", "600")
            pids.update(i.pid for i in control.stub.ListLoaded(pb.ListLoadedRequest(), timeout=10).instances)
            lms(home, "unload", model)

        served, failures = _requests(base, model, 20)  # warm-up: imports, buffers, thread pools
        for _ in range(3):
            cycle()
        figures.first = sample(pid)
        for _ in range(cycles):
            cycle()
        served, failures = _requests(base, model, requests)
        lms(home, "unload", "--all")
        time.sleep(1)  # let the unloaded worker's pipes close before counting descriptors
        figures.last = sample(pid)
        figures.served, figures.failed, figures.failures = served, len(failures), failures[:5]
        figures.distinct_worker_pids = len(pids)
        figures.zombies = zombies_of(pid)
        control.close()
    finally:
        figures.orphans = shut_down(home)
        import shutil

        shutil.rmtree(home, ignore_errors=True)
    figures.seconds = round(time.monotonic() - started, 1)
    return figures


def _requests(base: str, model: str, count: int) -> tuple[int, list[str]]:
    """`count` short chat requests, four clients at a time, every second one streaming: (served, failures)."""
    from bench.bench_contention import request_once

    lock = threading.Lock()
    todo = iter(range(count))
    served = 0
    failures: list[str] = []

    def client(index: int) -> None:
        nonlocal served
        with httpx.Client(timeout=300) as http:
            while True:
                with lock:
                    n = next(todo, None)
                if n is None:
                    return
                out = request_once(http, base + "/v1/chat/completions", index, model, n % 2 == 0)
                with lock:
                    if out.kind == "served":
                        served += 1
                    else:
                        failures.append(f"{out.status} {out.code}: {out.body[:300]}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return served, failures


def write_figures(name: str, figures: dict[str, Any]) -> None:
    """Saves a run's figures as JSON in $LMS_FIGURES_DIR (set by `make stress`) for bench/reliability.py."""
    out = os.environ.get("LMS_FIGURES_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(figures, indent=2, default=str))
    print(f"\n{name}: {json.dumps(figures, default=str)}")


def env_size(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else default



def fault_figure(name: str, result: str) -> None:
    """One fault test's outcome, in words, for the table in docs/reliability.md."""
    slug = "".join(c if c.isalnum() else "-" for c in name.lower())[:60]
    write_figures(f"fault-{slug}", {"name": name, "result": result})
