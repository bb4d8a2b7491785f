"""Fakes for unit tests of logic: a manual clock and a worker whose load, requests and exit the test controls."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmsd.catalog import Catalog
from lmsd.errors import ModelLoadFailed, Unavailable, WorkerGone, WorkerStopped


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeStream:
    """One request inside a fake worker. The test ends it with `finish()`; `aclose()` asks for a cancel, which the
    worker honours at once unless `factory.slow_cancel` (a worker busy in prompt processing)."""

    def __init__(self, worker: FakeWorker) -> None:
        self.worker = worker
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._events.put_nowait({"ev": "token", "text": "hi"})
        self.cancel_requested = False

    def finish(self, ev: dict[str, Any] | None = None) -> None:
        if not self.ended.done():
            self._events.put_nowait(ev or {"ev": "done", "finish_reason": "stop"})
            self.ended.set_result(None)
            self.worker.active.pop(self, None)

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self.ended.done() and self._events.empty():
            raise StopAsyncIteration
        ev = await self._events.get()
        if ev["ev"] == "gone":
            raise (WorkerStopped if ev.get("stopped") else WorkerGone)(ev["message"])
        return ev

    async def aclose(self) -> None:
        self.cancel_requested = True
        if not self.worker.factory.slow_cancel:
            self.finish({"ev": "done", "finish_reason": "cancelled"})


class FakeWorker:
    _next_pid = 5000

    def __init__(self, factory: FakeWorkerFactory) -> None:
        FakeWorker._next_pid += 1
        self.pid = FakeWorker._next_pid
        self.factory = factory
        self.stopped: str | None = None
        self.killed = False  # stopped with kill=True: not asked, killed
        self.reaped = False
        self.crashed: str | None = None
        self.loaded_path: str | None = None
        self.parallel = 0  # what the scheduler asked the load for
        self.active: dict[FakeStream, None] = {}  # insertion-ordered: runs are reproducible
        self.rss = factory.rss
        self._exit_cb: Callable[[str], None] | None = None
        self._ended = asyncio.Event()  # stopped or crashed

    def waiting(self) -> int:
        return self.held_for_room

    held_for_room = 0  # requests the (fake) worker holds until its KV cache has room

    async def load(self, path: str, context_length: int, progress: Callable[[float], None], *,
                   embedding: bool = False, parallel: int = 1) -> int:
        self.parallel = parallel
        self.factory.loads.append(path)
        progress(0.5)
        gate = self.factory.gates.get(path, self.factory.gate)
        while gate is not None and not gate.is_set() and not self._ended.is_set():
            await asyncio.sleep(0)  # polled, not asyncio.wait on a set: the order of wake-ups stays reproducible
        if self.stopped is not None:
            raise Unavailable(self.stopped)
        if self.crashed is not None:
            raise ModelLoadFailed(f"the worker loading {path} {self.crashed}")
        if "corrupt" in path:
            raise ModelLoadFailed(f"cannot load {path}: bad file")
        self.loaded_path = path
        progress(1.0)
        return context_length or 2048

    async def stop(self, reason: str, *, kill: bool = False) -> None:
        self.killed = self.killed or kill
        if self.stopped is None and self.crashed is None:
            self.stopped = reason
        self._end_requests(reason, stopped=True)
        self._ended.set()
        if self.factory.stop_gate is not None:
            await self.factory.stop_gate.wait()  # the process takes its time to exit
        self.reaped = True

    def _end_requests(self, why: str, *, stopped: bool) -> None:
        for stream in list(self.active):
            stream.finish({"ev": "gone", "message": why, "stopped": stopped})

    def memory_bytes(self) -> int:
        return 0 if self.reaped or self.crashed else self.rss

    def private_memory_bytes(self) -> int:
        return self.memory_bytes()

    def on_exit(self, callback: Callable[[str], None]) -> None:
        self._exit_cb = callback

    def generate(self, kind: str, params: dict[str, Any]) -> FakeStream:
        if self.stopped:
            raise WorkerStopped(self.stopped)
        if self.crashed:
            raise WorkerGone(self.crashed)
        stream = FakeStream(self)
        self.active[stream] = None
        return stream

    def embed(self, inputs: list[str], *, embedding_model: bool) -> asyncio.Future[dict[str, Any]]:
        stream = self.generate("embed", {})
        result: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        def answered(_f: asyncio.Future[None]) -> None:
            result.set_result({"data": [[0.0] * 4 for _ in inputs], "prompt_tokens": 1})

        stream.ended.add_done_callback(answered)
        return result

    def crash(self, why: str = "killed by signal 9") -> None:
        """The process dies on its own: requests fail, a load in progress fails, the daemon is told."""
        if self.stopped is not None or self.crashed is not None:
            return
        self.crashed = why
        self.reaped = True
        self._end_requests(f"the worker {why}", stopped=False)
        self._ended.set()
        if self._exit_cb is not None:
            self._exit_cb(why)


class FakeWorkerFactory:
    def __init__(self) -> None:
        self.workers: list[FakeWorker] = []
        self.loads: list[str] = []
        self.gate: asyncio.Event | None = None  # when set, loads wait for it
        self.gates: dict[str, asyncio.Event] = {}  # per model path, overrides `gate`
        self.stop_gate: asyncio.Event | None = None  # when set, stop() waits for it (a slow process exit)
        self.slow_cancel = False  # when true, a cancelled request ends only when the test finishes it
        self.rss = 1 << 20

    async def __call__(self) -> FakeWorker:
        w = FakeWorker(self)
        self.workers.append(w)
        return w

    @property
    def running(self) -> list[FakeWorker]:
        return [w for w in self.workers if not w.reaped]


def make_catalog(tmp_path: Path, names: list[str]) -> Catalog:
    """A catalog of files that look like GGUF to the header reader only as far as the catalog needs:
    scan() marks them unreadable, so tests that load must patch `error` away — see `catalog_of`."""
    models = tmp_path / "models"
    for name in names:
        p = models / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"GGUF")
    return Catalog(models)
