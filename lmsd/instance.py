"""What the scheduler keeps per loaded model, and the shapes it hands out (views, events).

Only lmsd.scheduler changes an Instance; everything else reads snapshots (InstanceView).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from lmsd.catalog import ModelEntry

Origin = Literal["manual", "jit"]
UnloadReason = Literal["manual", "ttl", "evict", "crash", "shutdown"]
ProgressFn = Callable[[float], None]


class Worker(Protocol):
    """The daemon's handle on one worker process (lmsd.worker.handle.WorkerProcess, or a fake in tests)."""

    pid: int

    async def load(self, path: str, context_length: int, progress: ProgressFn, *, embedding: bool = False) -> int:
        """Loads the model; returns the context length in force. Raises ModelLoadFailed."""
        ...

    async def stop(self, reason: str) -> None:
        """Ends the process. Requests still running on it fail with WorkerGone(reason)."""
        ...

    def memory_bytes(self) -> int: ...

    def generate(self, kind: str, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Yields `token` events then one `done` event; closing it early cancels the generation."""
        ...

    async def embed(self, inputs: list[str], *, embedding_model: bool) -> dict[str, Any]: ...

    def on_exit(self, callback: Callable[[str], None]) -> None:
        """Registers `callback(why)`, called once if the process ends without being asked to stop."""
        ...


WorkerFactory = Callable[[], Awaitable[Worker]]


@dataclass
class Instance:
    identifier: str
    entry: ModelEntry
    origin: Origin
    ttl: int | None
    context_length: int
    worker: Worker | None = None
    in_flight: int = 0
    # Requests admitted but waiting for a slot, oldest first. Each is a future resolved with True when the
    # request may start (its slot is then counted in in_flight), or with an exception.
    waiters: collections.deque[asyncio.Future[bool]] = field(default_factory=collections.deque)
    idle_since: float = 0.0
    last_used_unix: float = 0.0
    draining: bool = False
    ready: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # set once removed from the table
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while in_flight + queued == 0

    @property
    def key(self) -> str:
        return self.entry.key

    @property
    def queued(self) -> int:
        return len(self.waiters)

    @property
    def status(self) -> str:
        if self.draining:
            return "unloading"
        if not self.ready.done():
            return "loading"
        return "busy" if self.in_flight or self.waiters else "idle"


@dataclass(frozen=True)
class InstanceView:
    """A snapshot of an instance for `lms ps` (ListLoaded)."""

    identifier: str
    model: str
    path: str
    status: str
    origin: Origin
    ttl_seconds: int | None
    ttl_remaining_seconds: float | None
    context_length: int
    size_bytes: int
    memory_bytes: int
    pid: int
    in_flight: int
    queued: int
    last_used_unix: float


@dataclass(frozen=True)
class SchedulerEvent:
    kind: str  # loaded, unloaded, crashed, request
    identifier: str
    model: str
    reason: str = ""
    message: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    time_unix: float = field(default_factory=time.time)
