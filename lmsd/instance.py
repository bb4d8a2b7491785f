"""What the scheduler keeps per loaded model and per waiting request, and the shapes it hands out (views,
events).

Only lmsd.scheduler changes an Instance, a Waiter or a Ticket; everything else reads snapshots (InstanceView).

An instance moves through these states, and only these (checked by `Instance.move`):

    loading ──► ready ◄─► draining ──► stopping ──► gone
       │                     ▲
       └─────────────────────┘        (loading may also go straight to stopping, or to gone on a failed load)

- loading:  its worker loads the weights; requests may already queue on it (they joined the load).
- ready:    serves requests (status `idle` or `busy`).
- draining: takes no new requests; the running and queued ones finish (bounded by a grace deadline once one is
            set). An instance evicted while loading is `draining` from then on: it finishes its load and serves
            the requests already waiting on it, then stops. An instance drained only to make room for a load that
            is then withdrawn (its clients left) goes back to `ready`.
- stopping: its worker is being ended; the instance stays in the table (and its memory counted) until the
            process has been reaped, so a load that needs the memory starts only after it is really free.
- gone:     out of the table.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from lmsd.catalog import ModelEntry
from lmsd.errors import LmsError

Origin = Literal["manual", "jit"]
UnloadReason = Literal["manual", "ttl", "evict", "crash", "shutdown"]
State = Literal["loading", "ready", "draining", "stopping", "gone"]
ProgressFn = Callable[[float], None]

_MOVES: dict[State, set[State]] = {
    "loading": {"ready", "draining", "stopping", "gone"},
    "ready": {"draining", "gone"},  # gone: the worker crashed
    "draining": {"stopping", "gone", "ready"},  # ready: kept, when the load it was evicted for is withdrawn
    "stopping": {"gone"},
    "gone": set(),
}


class WorkerStream(Protocol):
    """One generation on a worker: `token` events then one `done`. `aclose()` cancels it; `ended` resolves when
    the worker itself reports the request over (done, error, or the worker is gone) — not when the caller
    stops reading."""

    ended: asyncio.Future[None]

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]: ...

    async def __anext__(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


class Worker(Protocol):
    """The daemon's handle on one worker process (lmsd.worker.handle.WorkerProcess, or a fake in tests)."""

    pid: int
    parallel: int  # after a load: the requests it decodes together (0 before)

    def waiting(self) -> int:
        """Requests admitted by the scheduler that the worker holds until its KV cache has room (shown as queued)."""
        ...

    async def load(self, path: str, context_length: int, progress: ProgressFn, *, embedding: bool = False,
                   parallel: int = 1) -> int:
        """Loads the model to decode `parallel` requests together; returns the context length in force. Raises
        ModelLoadFailed, or Unavailable when the load was stopped by `stop()`."""
        ...

    async def stop(self, reason: str, *, kill: bool = False) -> None:
        """Ends the process and returns once it has been reaped: asked to exit (then killed if it does not), or
        killed at once with `kill` (it is stuck). Requests still running on it fail with WorkerGone(reason)."""
        ...

    def memory_bytes(self) -> int:
        """Resident memory, the mapped model file included."""
        ...

    def private_memory_bytes(self) -> int:
        """Resident memory without the mapped model file (which the system counts as reclaimable cache)."""
        ...

    def generate(self, kind: str, params: dict[str, Any]) -> WorkerStream: ...

    def embed(self, inputs: list[str], *, embedding_model: bool) -> asyncio.Future[dict[str, Any]]:
        """Starts an embedding; the future resolves when the worker answers, whoever still waits for it."""
        ...

    def on_exit(self, callback: Callable[[str], None]) -> None:
        """Registers `callback(why)`, called once if the process ends without being asked to stop."""
        ...


WorkerFactory = Callable[[], Awaitable[Worker]]


@dataclass(eq=False)
class Waiter:
    """One request waiting for a slot: on a pending load (a Ticket) or on an instance's queue. Its future is
    resolved with the instance once the slot is counted in the instance's `in_flight`, or with an error."""

    fut: asyncio.Future[Instance]
    deadline: float | None  # scheduler clock; past it the request is refused (max_wait)
    owner: Ticket | Instance | None = None


@dataclass(eq=False)
class Ticket:
    """A load waiting for its turn: the queue of tickets is served in arrival order (FIFO swaps)."""

    entry: ModelEntry
    origin: Origin
    ttl: int | None
    identifier: str  # "" for the next free identifier
    context_length: int
    progress: ProgressFn | None
    result: asyncio.Future[Instance]  # the placed (loading) instance, or the refusal
    parallel: int = 1  # requests the instance will run at once
    waiters: collections.deque[Waiter] = field(default_factory=collections.deque)  # JIT requests riding on it
    dropped: bool = False  # given up before it started (withdrawn, refused, served by another instance)


@dataclass(eq=False)
class Instance:
    identifier: str
    entry: ModelEntry
    origin: Origin
    ttl: int | None
    context_length: int
    estimate: int = 0  # bytes this instance is accounted for (the larger of estimate and measured reality)
    requested_context: int = 0  # the context length asked for (what estimates and measurements are keyed by)
    parallel: int = 1  # requests it runs at once (sequences its worker decodes together)
    worker: Worker | None = None
    state: State = "loading"
    in_flight: int = 0
    waiters: collections.deque[Waiter] = field(default_factory=collections.deque)  # oldest first
    idle_since: float = 0.0  # scheduler clock; meaningful while idle
    last_used: float = 0.0  # scheduler clock; orders eviction (least recently used first)
    last_used_unix: float = 0.0
    unload_reason: UnloadReason | None = None
    grace_deadline: float | None = None  # while draining: when running requests are ended (None: never)
    grace_set_by: tuple[UnloadReason, float] | None = None  # the unload that set grace_deadline, and its grace
    load_deadline: float | None = None  # while loading: killed if no progress by then
    load_started: float = 0.0  # scheduler clock: when its load began
    abort: LmsError | None = None  # set when a load must stop (manual unload, shutdown, no progress): what to report
    cut: str = ""  # set when the grace ran out: requests still running end with this reason
    unload_task: asyncio.Task[None] | None = None
    evicted_for: Ticket | None = None  # the load this instance drains to make room for
    must_go: bool = False  # an unload was asked for (manual, ttl, shutdown): never kept
    ready: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # set once removed from the table
    drained: asyncio.Event = field(default_factory=asyncio.Event)  # set when a drain may end (idle, or cut)

    @property
    def key(self) -> str:
        return self.entry.key

    @property
    def queued(self) -> int:
        return len(self.waiters)

    @property
    def draining(self) -> bool:
        """Takes no new requests: on its way out."""
        return self.state in ("draining", "stopping", "gone")

    @property
    def loaded(self) -> bool:
        return self.ready.done() and not self.ready.cancelled() and self.ready.exception() is None

    @property
    def busy(self) -> bool:
        return bool(self.in_flight or self.waiters)

    @property
    def status(self) -> str:
        if self.draining:
            return "unloading"
        if self.state == "loading":
            return "loading"
        return "busy" if self.busy else "idle"

    def move(self, to: State) -> None:
        if to not in _MOVES[self.state]:
            raise AssertionError(f"instance {self.identifier}: no move from {self.state} to {to}")
        self.state = to


@dataclass(frozen=True)
class FailedLoad:
    """A load that failed, shown by `lms ps` until the next request for the model (as llama.cpp's router does)."""

    identifier: str
    entry: ModelEntry
    origin: Origin
    reason: str
    time_unix: float


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
    estimated_memory_bytes: int = 0
    parallel: int = 1
    message: str = ""  # for a failed load: why


@dataclass(frozen=True)
class MemoryView:
    """What `lms ps` and /api/v0/models show about memory: what the loaded models are accounted for, the budget
    (None: no limit) and what the system reports available."""

    used_bytes: int
    budget_bytes: int | None
    available_bytes: int
    limit: str  # "auto", "off", or a number of bytes


@dataclass(frozen=True)
class SchedulerEvent:
    kind: str  # loaded, unloaded, crashed, load_failed, request, settings
    identifier: str
    model: str
    reason: str = ""
    message: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    time_unix: float = field(default_factory=time.time)
