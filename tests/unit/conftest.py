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


GB = 1 << 30


class Env:
    """A scheduler over fake workers and a fake clock. Each model is estimated at `sizes[key]` bytes (1 GB by
    default) and the system reports `available` bytes free (plenty by default)."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.workers = FakeWorkerFactory()
        self.settings = Settings(default_parallel=1)  # one request at a time unless a test says otherwise
        self.sizes: dict[str, int] = {}
        self.available = 1 << 50
        self.catalog = StaticCatalog(["alpha", "beta", "gamma", "corrupt", "corrupt-header", "smollm2-135m-instruct"])
        self.scheduler = Scheduler(self.catalog, self.workers, lambda: self.settings, clock=self.clock,
                                   wall_clock=self.clock, max_queue=3, offload=inline,
                                   estimate=lambda entry, ctx, parallel: self.sizes.get(entry.key, GB),
                                   available_memory=lambda: self.available)


async def inline(fn: Any, *args: Any) -> Any:
    """Runs the catalog lookup on the loop: the test decides every interleaving, no threads."""
    return fn(*args)


@pytest.fixture
def env() -> Env:
    return Env()
