from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lmsd.catalog import Catalog, ModelEntry
from lmsd.config import Settings
from lmsd.scheduler import Scheduler
from tests.unit.fakes import FakeClock, FakeWorkerFactory


class StaticCatalog(Catalog):
    """The real catalog's resolve() over entries given by the test (no files needed)."""

    def __init__(self, keys: list[str]) -> None:
        super().__init__(Path("/nonexistent-models"))
        self.entries = [ModelEntry(key=k, path=f"/models/{k}.gguf", rel_path=f"pub/{k}/{k}.gguf", size_bytes=100,
                                   error="corrupt header" if "corrupt-header" in k else "") for k in keys]

    def scan(self) -> list[ModelEntry]:
        return list(self.entries)


class Env:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.workers = FakeWorkerFactory()
        self.settings = Settings()
        self.catalog = StaticCatalog(["alpha", "beta", "gamma", "corrupt", "corrupt-header", "smollm2-135m-instruct"])
        self.scheduler = Scheduler(self.catalog, self.workers, lambda: self.settings, clock=self.clock,
                                   wall_clock=self.clock, max_queue=3, offload=inline)


async def inline(fn: Any, *args: Any) -> Any:
    """Runs the catalog lookup on the loop: the test decides every interleaving, no threads."""
    return fn(*args)


@pytest.fixture
def env() -> Env:
    return Env()
