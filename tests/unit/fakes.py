"""Fakes for unit tests of logic: a manual clock and a worker whose load the test controls."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from lmsd.catalog import Catalog
from lmsd.errors import ModelLoadFailed


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeWorker:
    _next_pid = 5000

    def __init__(self, factory: FakeWorkerFactory) -> None:
        FakeWorker._next_pid += 1
        self.pid = FakeWorker._next_pid
        self.factory = factory
        self.stopped: str | None = None
        self.loaded_path: str | None = None
        self._exit_cb: Callable[[str], None] | None = None

    async def load(self, path: str, context_length: int, progress: Callable[[float], None], *,
                   embedding: bool = False) -> int:
        self.factory.loads.append(path)
        progress(0.5)
        if self.factory.gate is not None:
            await self.factory.gate.wait()
        if "corrupt" in path:
            raise ModelLoadFailed(f"cannot load {path}: bad file")
        self.loaded_path = path
        progress(1.0)
        return context_length or 2048

    async def stop(self, reason: str) -> None:
        self.stopped = reason

    def memory_bytes(self) -> int:
        return 1 << 20

    def on_exit(self, callback: Callable[[str], None]) -> None:
        self._exit_cb = callback

    def crash(self, why: str = "killed by signal 9") -> None:
        assert self._exit_cb is not None
        self._exit_cb(why)


class FakeWorkerFactory:
    def __init__(self) -> None:
        self.workers: list[FakeWorker] = []
        self.loads: list[str] = []
        self.gate: asyncio.Event | None = None  # when set, loads wait for it

    async def __call__(self) -> FakeWorker:
        w = FakeWorker(self)
        self.workers.append(w)
        return w

    @property
    def running(self) -> list[FakeWorker]:
        return [w for w in self.workers if w.stopped is None]


def make_catalog(tmp_path: Path, names: list[str]) -> Catalog:
    """A catalog of files that look like GGUF to the header reader only as far as the catalog needs:
    scan() marks them unreadable, so tests that load must patch `error` away — see `catalog_of`."""
    models = tmp_path / "models"
    for name in names:
        p = models / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"GGUF")
    return Catalog(models)
