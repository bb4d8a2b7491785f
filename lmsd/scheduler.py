"""The scheduler: the only owner of the instance table — loads, idle TTLs, JIT, eviction, drain and unload.

Everything here runs on the daemon's event loop; no method blocks it. gRPC and HTTP handlers ask the
scheduler and never touch an Instance's counters themselves. Time, memory and workers are injected: the clock
is a `() -> float` of monotonic seconds and every deadline (TTL, grace, load progress, max_wait) is measured on
it and acted on by `tick()`, so unit tests move time forward and call `tick()` instead of sleeping.

The rules (docs/lifecycle.md says the same for users):
- An instance is idle when it has no request in flight or queued. Its TTL counts from the moment it became
  idle, so it restarts at the end of every request and can never fire while the instance works. A request's
  slot is given back when the worker reports the request over, not when the client leaves.
- Loads wait for their turn in one FIFO queue of tickets. JIT requests for a model that is not loaded ride on
  its ticket (one load per model, however many ask); each load serves every request already waiting for it
  before a later ticket may evict it. A request waits (bounded by `max_wait`) rather than fail.
- Room for a load is made by lmsd.placement's policy (auto-evict, max_loaded_models, memory budget), from JIT
  instances only; the load starts once the evicted processes are reaped.
- Unload, eviction and TTL expiry drain: no new requests, running ones finish. A grace bounds a drain; the
  shortest grace asked for wins. An unload, once begun, is a task the scheduler owns: whoever stops waiting
  for it, it runs to its end.

This module is long on purpose: every change of the instance table and of the queue of loads is in it, so
every transition can be read (and reviewed for what may change at each await) in one place.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from lmsd import memory, placement
from lmsd.catalog import AmbiguousModel, Catalog, ModelEntry
from lmsd.config import MAX_PARALLEL, Settings
from lmsd.errors import (
    FailedPrecondition,
    InvalidArgument,
    LmsError,
    LoadKilled,
    ModelLoadFailed,
    ModelNotFound,
    QueueFull,
    Unavailable,
    WaitExceeded,
)
from lmsd.instance import (
    FailedLoad,
    Instance,
    InstanceView,
    MemoryView,
    Origin,
    ProgressFn,
    SchedulerEvent,
    Ticket,
    UnloadReason,
    Waiter,
    Worker,
    WorkerFactory,
)

log = logging.getLogger(__name__)
Clock = Callable[[], float]
Estimator = Callable[[ModelEntry, int, int], int]  # (model, context length, parallel) -> bytes


@dataclass(frozen=True)
class LoadEstimate:
    model: str
    context_length: int
    estimated_memory_bytes: int
    budget_bytes: int | None
    available_bytes: int
    fits: bool
    detail: str


class Lease:
    """One request's hold on an instance: taken by `acquire`, given back by `release` (exactly once)."""

    def __init__(self, scheduler: Scheduler, instance: Instance) -> None:
        self.scheduler = scheduler
        self.instance = instance
        self.released = False

    @property
    def worker(self) -> Worker:
        assert self.instance.worker is not None
        return self.instance.worker


class Scheduler:
    def __init__(
        self,
        catalog: Catalog,
        worker_factory: WorkerFactory,
        settings: Callable[[], Settings],
        *,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        max_queue: int = 64,
        offload: Callable[..., Awaitable[Any]] = asyncio.to_thread,
        estimate: Estimator | None = None,
        available_memory: Callable[[], int] | None = None,
        measurements: memory.Measurements | None = None,
    ) -> None:
        self.catalog = catalog
        self.worker_factory = worker_factory
        self.settings = settings
        self.clock = clock
        self.wall_clock = wall_clock
        self.max_queue = max_queue  # requests one model holds waiting (queued or riding a load); beyond: QueueFull
        self.offload = offload  # runs blocking work (catalog scans read files) off the event loop
        self.estimate = estimate or memory.estimate_bytes
        self.available_memory = available_memory or memory.system_available_bytes
        self._instances: dict[str, Instance] = {}  # identifier -> instance; changed only by this class
        self._tickets: collections.deque[Ticket] = collections.deque()  # loads waiting for their turn, FIFO
        self._failed: dict[str, FailedLoad] = {}  # model key -> its last failed load, until the next request
        self._measured = measurements or memory.Measurements()  # largest resident memory seen per model/context
        self._changed = asyncio.Event()  # wakes the timer driver when a deadline may have moved
        self._subscribers: set[asyncio.Queue[SchedulerEvent]] = set()
        self._listeners: list[Callable[[SchedulerEvent], None]] = []  # called at once, on the loop (metrics)
        self._tasks: set[asyncio.Task[None]] = set()  # loads and unloads the scheduler owns
        self._closing = False

    # ---------------------------------------------------------------- queries

    def instances(self) -> list[Instance]:
        return list(self._instances.values())

    def view(self, inst: Instance) -> InstanceView:
        remaining: float | None = None
        if inst.ttl is not None:
            if inst.status == "idle":
                remaining = max(0.0, inst.ttl - (self.clock() - inst.idle_since))
            else:
                remaining = float(inst.ttl)  # the timer restarts when the instance becomes idle
        held = min(inst.in_flight, inst.worker.waiting()) if inst.worker else 0  # waiting for KV room in the worker
        return InstanceView(
            identifier=inst.identifier, model=inst.key, path=inst.entry.rel_path, status=inst.status,
            origin=inst.origin, ttl_seconds=inst.ttl, ttl_remaining_seconds=remaining,
            context_length=inst.context_length, size_bytes=inst.entry.size_bytes,
            memory_bytes=inst.worker.memory_bytes() if inst.worker else 0, pid=inst.worker.pid if inst.worker else 0,
            in_flight=inst.in_flight - held, queued=inst.queued + held, last_used_unix=inst.last_used_unix,
            estimated_memory_bytes=inst.estimate, parallel=inst.parallel,
        )

    def list_loaded(self) -> list[InstanceView]:
        views = [self.view(i) for i in self._instances.values()]
        for f in self._failed.values():
            views.append(InstanceView(
                identifier=f.identifier, model=f.entry.key, path=f.entry.rel_path, status="failed", origin=f.origin,
                ttl_seconds=None, ttl_remaining_seconds=None, context_length=0, size_bytes=f.entry.size_bytes,
                memory_bytes=0, pid=0, in_flight=0, queued=0, last_used_unix=f.time_unix, message=f.reason))
        return views

    def memory_view(self) -> MemoryView:
        limit = self.settings().memory_limit
        return MemoryView(used_bytes=sum(i.estimate for i in self._instances.values()), budget_bytes=self.budget(),
                          available_bytes=self.available_memory(), limit=str(limit))

    def budget(self) -> int | None:
        """Bytes the instances may be accounted for in all, or None when there is no limit. `auto`: what the system
        has available now, plus what our own workers hold, minus a safety margin."""
        limit = self.settings().memory_limit
        if limit == "off":
            return None
        if isinstance(limit, int):
            return limit
        # What our workers hold privately comes back when they are evicted; their mapped weights are page cache,
        # which the system already reports as available: counting them again would inflate the budget.
        held = sum(i.worker.private_memory_bytes() for i in self._instances.values() if i.worker is not None)
        return max(0, self.available_memory() + held - memory.safety_margin_bytes(memory.system_total_bytes()))

    async def estimate_load(self, model: str, context_length: int = 0, parallel: int = 0) -> LoadEstimate:
        """What loading `model` (as `lms load` would) takes and whether it fits now, without loading anything."""
        entry = await self._resolve(model)
        ctx = self._check_context(entry, context_length)
        estimate = self._accounted(entry, ctx, self._check_parallel(parallel))
        settings = self.settings()
        budget = self.budget()
        decision = placement.decide(list(self._instances.values()), key=entry.key, origin="manual",
                                    estimate=estimate, auto_evict=settings.auto_evict,
                                    max_loaded=settings.max_loaded_models, budget=budget)
        if decision.refusal is not None:
            detail = decision.refusal.message
        elif decision.victims:
            detail = "fits after evicting " + ", ".join(v.identifier for v in decision.victims)
        else:
            detail = ""
        return LoadEstimate(entry.key, ctx, estimate, budget, self.available_memory(), decision.refusal is None,
                            detail)

    def _accounted(self, entry: ModelEntry, context_length: int, parallel: int) -> int:
        if entry.type == "embedding":
            parallel = 1  # embeddings run one request at a time on their own context: no slots, no prompt cache
        return max(self.estimate(entry, context_length, parallel), self._measured.get(entry, context_length))

    # ---------------------------------------------------------------- events

    def subscribe(self) -> asyncio.Queue[SchedulerEvent]:
        q: asyncio.Queue[SchedulerEvent] = asyncio.Queue(maxsize=1000)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[SchedulerEvent]) -> None:
        self._subscribers.discard(q)

    def listen(self, listener: Callable[[SchedulerEvent], None]) -> None:
        """Calls `listener` with every event as it is emitted; it must be quick and must not raise."""
        self._listeners.append(listener)

    def emit(self, event: SchedulerEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - an observer's bug must not break the scheduler
                log.exception("event listener failed")
        for q in list(self._subscribers):
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:
                pass  # a watcher that does not read loses events rather than slowing the daemon

    # ---------------------------------------------------------------- manual loads

    async def load(self, model: str, **options: Any) -> Instance:
        """Loads a new instance of `model` (key, unique prefix or relative path) and waits until it is ready."""
        inst = await self.begin_load(model, **options)
        await asyncio.shield(inst.ready)
        return inst

    async def begin_load(
        self,
        model: str,
        *,
        ttl: int | None = None,
        identifier: str = "",
        context_length: int = 0,
        parallel: int = 0,
        origin: Origin = "manual",
        progress: ProgressFn | None = None,
    ) -> Instance:
        """Queues a new instance's load, waits for its turn, and returns it while it loads; `instance.ready`
        tells the outcome. A caller that goes away before its turn withdraws the load."""
        self._check_open()
        _check_ttl(ttl)
        entry = await self._resolve(model)
        ctx = self._check_context(entry, context_length)
        parallel = self._check_parallel(parallel)
        self._check_open()
        if identifier and (identifier in self._instances or any(t.identifier == identifier for t in self._tickets)):
            raise FailedPrecondition(
                f"an instance with identifier '{identifier}' is already loaded; unload it or choose another")
        self._failed.pop(entry.key, None)
        ticket = Ticket(entry=entry, origin=origin, ttl=ttl, identifier=identifier, context_length=ctx,
                        progress=progress, result=asyncio.get_running_loop().create_future(), parallel=parallel)
        self._tickets.append(ticket)
        self._pump()
        try:
            return await asyncio.shield(ticket.result)
        except asyncio.CancelledError:
            if ticket in self._tickets:
                self._drop_ticket(ticket)
            elif ticket.result.done() and not ticket.result.cancelled() and ticket.result.exception() is None:
                self._begin_unload(ticket.result.result(), "manual", 0.0)  # placed in the same instant
            raise

    def _check_parallel(self, parallel: int) -> int:
        if parallel < 0 or parallel > MAX_PARALLEL:
            raise InvalidArgument(f"parallel must be from 1 to {MAX_PARALLEL} requests, got {parallel}")
        return parallel or self.settings().default_parallel

    def _check_context(self, entry: ModelEntry, context_length: int) -> int:
        if context_length < 0:
            raise InvalidArgument(f"context length must be a positive number of tokens, got {context_length}")
        if context_length and entry.max_context_length and context_length > entry.max_context_length:
            raise InvalidArgument(f"context length {context_length} is beyond what '{entry.key}' was trained for "
                                  f"({entry.max_context_length} tokens)")
        return context_length or default_context_length(entry)

    async def _resolve(self, model: str) -> ModelEntry:
        try:
            entry = await self.offload(self.catalog.resolve, model)
        except AmbiguousModel as exc:
            raise InvalidArgument(str(exc), code="model_ambiguous") from None
        except ValueError as exc:
            raise InvalidArgument(str(exc), code="invalid_model") from None
        except LookupError as exc:
            raise ModelNotFound(str(exc)) from None
        if entry.error:
            raise ModelLoadFailed(f"cannot load '{entry.key}' ({entry.rel_path}): {entry.error}")
        return entry

    # ---------------------------------------------------------------- requests (the JIT entry point)

    async def acquire(self, model: str, ttl: int | None = None, *, jit: bool | None = None) -> Lease:
        """A slot on an instance serving `model`, loading it just in time if allowed (`jit`: whatever the setting
        says, for a caller that named the model itself, as `lms chat` does).

        `model` is an identifier, a key or a unique prefix of one. `ttl` applies only if this call causes the
        load. Raises ModelNotFound, InvalidArgument, QueueFull, Unavailable, WaitExceeded, ModelLoadFailed,
        InsufficientMemory, ResourceExhausted.
        """
        _check_ttl(ttl)
        self._check_open()
        inst = self._find_serving(model)
        if inst is None:
            entry = await self._resolve(model)
            self._check_open()  # the world may have changed while the catalog was read: look again
            inst = self._find_serving(entry.key)
            if inst is None:
                if not (self.settings().jit if jit is None else jit):
                    raise self._jit_off_error(model)
                waiter = self._ride_load(entry, ttl)
            else:
                waiter = self._enqueue(inst)
        else:
            waiter = self._enqueue(inst)
        try:
            inst = await waiter.fut
        except asyncio.CancelledError:
            self._withdraw(waiter)
            raise
        return Lease(self, inst)

    async def target(self, model: str, *, jit: bool | None = None) -> tuple[ModelEntry, int, bool]:
        """What a request for `model` would run on, without loading anything: the model, the context length it
        has or would get from a JIT load, and whether it is loaded. Raises as `acquire` would for a model that
        cannot be served (unknown, path-like, unreadable, or unloaded with JIT off)."""
        inst = self._find_serving(model)
        if inst is not None:
            return inst.entry, inst.context_length, True
        entry = await self._resolve(model)
        inst = self._find_serving(entry.key)
        if inst is not None:
            return inst.entry, inst.context_length, True
        if not (self.settings().jit if jit is None else jit):
            raise self._jit_off_error(model)
        return entry, default_context_length(entry), False

    def _find_serving(self, model: str) -> Instance | None:
        inst = self._instances.get(model)
        if inst is not None and not inst.draining:
            return inst
        same = [i for i in self._instances.values() if i.key.lower() == model.lower() and not i.draining]
        return min(same, key=lambda i: (i.in_flight + i.queued, i.identifier)) if same else None

    def _jit_off_error(self, model: str) -> ModelNotFound:
        loaded = ", ".join(sorted(self._instances)) or "none"
        return ModelNotFound(
            f"model '{model}' is not loaded and JIT loading is off. Load it first with "
            f"`lms load {model}`, or turn JIT on with `lms server settings --jit`. Loaded: {loaded}.")

    def _new_waiter(self) -> Waiter:
        max_wait = self.settings().max_wait
        return Waiter(fut=asyncio.get_running_loop().create_future(),
                      deadline=self.clock() + max_wait if max_wait else None)

    def _ride_load(self, entry: ModelEntry, ttl: int | None) -> Waiter:
        """Joins the pending JIT load of `entry`, or queues one."""
        self._failed.pop(entry.key, None)
        ticket = next((t for t in self._tickets if t.origin == "jit" and t.entry.key == entry.key), None)
        if ticket is None:
            ticket = Ticket(entry=entry, origin="jit", ttl=ttl if ttl is not None else self.settings().default_ttl,
                            identifier="", context_length=default_context_length(entry), progress=None,
                            result=asyncio.get_running_loop().create_future(),
                            parallel=self.settings().default_parallel)
            self._tickets.append(ticket)
        elif len(ticket.waiters) >= self.max_queue:
            raise QueueFull(f"'{entry.key}' already has {len(ticket.waiters)} requests waiting for it to load; "
                            "retry shortly")
        waiter = self._new_waiter()
        waiter.owner = ticket
        ticket.waiters.append(waiter)
        self._changed.set()
        self._pump()
        return waiter

    def _enqueue(self, inst: Instance) -> Waiter:
        """A slot on `inst` now if one is free, else a place in its queue (bounded)."""
        self._failed.pop(inst.key, None)
        waiter = self._new_waiter()
        if inst.loaded and inst.in_flight < inst.parallel and not inst.waiters:
            self._start_request(inst)
            waiter.fut.set_result(inst)
            return waiter
        if len(inst.waiters) >= self.max_queue:
            raise QueueFull(f"'{inst.identifier}' already has {len(inst.waiters)} requests waiting; retry shortly")
        waiter.owner = inst
        inst.waiters.append(waiter)
        self._set_busy(inst)
        self._changed.set()
        return waiter

    def _withdraw(self, waiter: Waiter) -> None:
        """The caller of `acquire` went away: leave the queue, or give back a slot granted in the same instant."""
        owner = waiter.owner
        if owner is not None and waiter in owner.waiters:
            owner.waiters.remove(waiter)
            if isinstance(owner, Instance):
                self._after_request(owner)
            elif not owner.waiters and owner in self._tickets:
                self._drop_ticket(owner)  # nobody wants this load any more
        elif waiter.fut.done() and not waiter.fut.cancelled() and waiter.fut.exception() is None:
            self._finish_request(waiter.fut.result())

    def _start_request(self, inst: Instance) -> None:
        inst.in_flight += 1
        self._set_busy(inst)

    def _set_busy(self, inst: Instance) -> None:
        inst.last_used = self.clock()
        inst.drained.clear()

    def release(self, lease: Lease, until: asyncio.Future[Any] | None = None) -> None:
        """Gives the slot back — at once, or when `until` (the worker's own end of the request) completes."""
        if lease.released:
            return
        lease.released = True
        if until is not None and not until.done():
            def ended(f: asyncio.Future[Any]) -> None:
                if not f.cancelled():
                    f.exception()  # retrieved: its caller may have gone
                self._finish_request(lease.instance)

            until.add_done_callback(ended)
        else:
            self._finish_request(lease.instance)

    def _finish_request(self, inst: Instance) -> None:
        inst.in_flight -= 1
        inst.last_used = self.clock()
        inst.last_used_unix = self.wall_clock()
        if inst.worker is not None and inst.loaded and not inst.draining:
            self._measure(inst)
        self._after_request(inst)

    def _after_request(self, inst: Instance) -> None:
        """Hands free slots to the oldest waiters; an instance left with no work becomes idle (or drained)."""
        if inst.loaded and not inst.cut:
            while inst.waiters and inst.in_flight < inst.parallel:
                waiter = inst.waiters.popleft()
                if waiter.fut.done():
                    continue  # its caller was cancelled in this same instant and has not run yet: no slot
                self._start_request(inst)
                waiter.fut.set_result(inst)
        if not inst.busy:
            inst.idle_since = self.clock()  # the TTL restarts from the end of every request
            inst.drained.set()
            self._changed.set()

    # ---------------------------------------------------------------- placement: the FIFO of loads

    def _pump(self) -> None:
        """Starts the loads whose turn it is, in arrival order; makes room for the first that cannot start yet
        and stops there (a later load never overtakes it). Synchronous: nothing changes while it decides."""
        while self._tickets:
            ticket = self._tickets[0]
            if ticket.origin == "jit":
                # riders cancelled in this same instant have not withdrawn yet: a load nobody waits for is dropped
                ticket.waiters = collections.deque(w for w in ticket.waiters if not w.fut.done())
                if not ticket.waiters:
                    self._drop_ticket(ticket, pump=False)
                    continue
                serving = self._find_serving(ticket.entry.key)
                if serving is not None:  # loaded meanwhile (by `lms load`, say): ride on it
                    self._move_waiters(ticket, serving)
                    self._drop_ticket(ticket, pump=False)
                    continue
            if ticket.identifier and ticket.identifier in self._instances:
                # taken while this load waited (a JIT load of that model, say)
                self._drop_ticket(ticket, FailedPrecondition(
                    f"an instance with identifier '{ticket.identifier}' is already loaded; unload it or choose "
                    "another"), pump=False)
                continue
            settings = self.settings()
            estimate = self._accounted(ticket.entry, ticket.context_length, ticket.parallel)
            decision = placement.decide(
                list(self._instances.values()), key=ticket.entry.key, origin=ticket.origin, estimate=estimate,
                auto_evict=settings.auto_evict, max_loaded=settings.max_loaded_models, budget=self.budget())
            if decision.refusal is not None:
                log.warning("%s", decision.refusal.message)
                self._drop_ticket(ticket, decision.refusal, pump=False)
                continue
            for victim in decision.victims:
                log.info("evicting %s to make room for %s", victim.identifier, ticket.entry.key)
                self._begin_unload(victim, "evict", None)
                victim.evicted_for = ticket
            if not decision.start_now:
                return
            self._tickets.popleft()
            inst = self._place(ticket, estimate)
            self._move_waiters(ticket, inst)

    def _drop_ticket(self, ticket: Ticket, err: LmsError | None = None, *, pump: bool = True) -> None:
        """Takes a load out of the queue without starting it (withdrawn, refused, or served by another instance).
        Instances it evicted that still only drain for it are kept: nobody needs their room any more."""
        if ticket in self._tickets:
            self._tickets.remove(ticket)
        if err is not None:
            _fail(ticket.result, err)
            for waiter in ticket.waiters:
                _fail(waiter.fut, err)
            ticket.waiters.clear()
        ticket.dropped = True
        for inst in list(self._instances.values()):
            if inst.evicted_for is ticket and inst.loaded:
                self._keep(inst)  # (one still loading is kept when its load is done: see _run_unload)
        if pump:
            self._pump()

    def _keep(self, inst: Instance, *, cancel: bool = True) -> None:
        """Stops the eviction of `inst` if it drains only for a load that was given up, and nobody asked for it to
        go: it serves again instead of being unloaded (and reloaded) for nothing."""
        ticket = inst.evicted_for
        if ticket is None or not ticket.dropped or inst.state != "draining" or inst.must_go or inst.cut \
                or inst.unload_task is None:
            return
        log.info("keeping %s: the load it was evicted for was given up", inst.identifier)
        if cancel:
            inst.unload_task.cancel()
        inst.unload_task = None
        inst.unload_reason = None
        inst.evicted_for = None
        inst.move("ready")
        self._after_request(inst)

    def _move_waiters(self, ticket: Ticket, inst: Instance) -> None:
        if not ticket.result.done():
            ticket.result.set_result(inst)
        for waiter in ticket.waiters:
            if not waiter.fut.done():
                waiter.owner = inst
                inst.waiters.append(waiter)
        ticket.waiters.clear()
        if inst.waiters:
            self._set_busy(inst)
        self._after_request(inst)

    def _place(self, ticket: Ticket, estimate: int) -> Instance:
        identifier = ticket.identifier or self._next_identifier(ticket.entry.key)
        inst = Instance(identifier=identifier, entry=ticket.entry, origin=ticket.origin, ttl=ticket.ttl,
                        context_length=ticket.context_length, estimate=estimate,
                        requested_context=ticket.context_length, parallel=ticket.parallel)
        inst.last_used = inst.load_started = self.clock()
        inst.load_deadline = self.clock() + self.settings().load_timeout
        self._instances[identifier] = inst
        self._spawn(self._run_load(inst, ticket.progress))
        self._changed.set()
        return inst

    def _next_identifier(self, key: str) -> str:
        """The key, else key:2, key:3 ... — skipping identifiers in use or reserved by a load waiting its turn."""
        taken = set(self._instances) | {t.identifier for t in self._tickets if t.identifier}
        if key not in taken:
            return key
        n = 2
        while f"{key}:{n}" in taken:
            n += 1
        return f"{key}:{n}"

    async def _run_load(self, inst: Instance, progress: ProgressFn | None) -> None:
        def on_progress(fraction: float) -> None:
            if inst.abort is None:  # progress: the clock starts again (not for a load being stopped)
                inst.load_deadline = self.clock() + self.settings().load_timeout
            if progress is not None:
                progress(fraction)

        try:
            inst.worker = await self.worker_factory()
            inst.worker.on_exit(lambda why: self._on_worker_exit(inst, why))
            if inst.abort is not None:
                raise inst.abort
            n_ctx = await inst.worker.load(inst.entry.path, inst.context_length, on_progress,
                                           embedding=inst.entry.type == "embedding", parallel=inst.parallel)
            if inst.abort is not None:
                raise inst.abort
        except Exception as exc:  # noqa: BLE001 - any load failure is reported to everyone waiting on it
            await self._load_failed(inst, exc)
            return
        inst.context_length = n_ctx
        # What the worker really runs at once: an embedding model embeds one request at a time.
        inst.parallel = min(inst.parallel, inst.worker.parallel or inst.parallel)
        inst.load_deadline = None
        inst.idle_since = inst.last_used = self.clock()
        if inst.state == "loading":
            inst.move("ready")
        self._measure(inst)
        inst.ready.set_result(None)
        log.info("loaded %s (%s, origin %s, ttl %s, pid %s, ~%d MB)", inst.identifier, inst.entry.rel_path,
                 inst.origin, inst.ttl, inst.worker.pid, inst.estimate >> 20)
        self.emit(SchedulerEvent("loaded", inst.identifier, inst.key, fields={
            "origin": inst.origin, "ttl": str(inst.ttl or ""), "context_length": str(n_ctx),
            "estimated_memory_bytes": str(inst.estimate), "load_seconds": f"{self.clock() - inst.load_started:.3f}"}))
        self._after_request(inst)  # the requests that rode on the load start now
        self._pump()

    async def _load_failed(self, inst: Instance, exc: Exception) -> None:
        err = inst.abort or (exc if isinstance(exc, LmsError) else ModelLoadFailed(f"cannot load '{inst.key}': {exc}"))
        if not isinstance(err, Unavailable):  # a load stopped by an unload or shutdown is no failure to show
            log.warning("load of %s failed: %s", inst.identifier, err.message)
            self._failed[inst.key] = FailedLoad(inst.identifier, inst.entry, inst.origin, err.message,
                                                self.wall_clock())
            self.emit(SchedulerEvent("load_failed", inst.identifier, inst.key, message=err.message))
        if inst.state in ("loading", "draining"):
            inst.move("stopping")
        self._fail_waiters(inst, err)
        if inst.worker is not None:
            await inst.worker.stop(err.message)  # reaped before the instance leaves the table
        _fail(inst.ready, err)
        self._remove(inst)

    def _measure(self, inst: Instance) -> None:
        """Reality corrects the estimate: the larger of the two is used for this model from now on."""
        assert inst.worker is not None
        rss = inst.worker.memory_bytes()
        self._measured.record(inst.entry, inst.requested_context or inst.context_length, rss)
        inst.estimate = max(inst.estimate, rss)

    # ---------------------------------------------------------------- unloading

    async def unload(self, identifier: str, *, reason: UnloadReason = "manual", grace: float | None = None) -> None:
        """Drains and unloads one instance; `grace` bounds the drain (None: no bound of its own). Returns when the
        instance is gone. Cancelling the caller does not stop the unload."""
        inst = self._instances.get(identifier)
        if inst is None:
            loaded = ", ".join(sorted(self._instances)) or "none"
            raise ModelNotFound(f"no loaded instance '{identifier}'. Loaded: {loaded}. See `lms ps`.")
        await asyncio.shield(self._begin_unload(inst, reason, grace))

    async def unload_all(self, *, reason: UnloadReason = "manual", grace: float | None = None) -> list[str]:
        insts = list(self._instances.values())
        tasks = [self._begin_unload(i, reason, grace) for i in insts]
        await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))
        return [i.identifier for i in insts]

    def _begin_unload(self, inst: Instance, reason: UnloadReason, grace: float | None) -> asyncio.Task[None]:
        """Starts the drain and unload of `inst` as a task the scheduler owns (or tightens the one under way)."""
        if grace is not None:
            deadline = self.clock() + max(0.0, grace)
            if inst.grace_deadline is None or deadline < inst.grace_deadline:
                inst.grace_deadline = deadline  # the shortest grace asked for wins
                inst.grace_set_by = (reason, grace)
                self._changed.set()
        if reason in ("manual", "shutdown") and not inst.ready.done():
            # An explicit unload of a model still loading stops the load (an eviction lets it finish).
            self._abort_load(inst, Unavailable(f"'{inst.identifier}' was unloaded while loading"))
        if reason != "evict":
            inst.must_go = True  # asked for by someone: never kept because a load no longer needs the room
        if inst.unload_task is None:
            inst.unload_reason = reason
            if inst.state in ("loading", "ready"):
                inst.move("draining")
            self._changed.set()
            if inst.loaded and inst.busy:
                log.info("draining %s (%d in flight, %d queued) before unload (%s)", inst.identifier,
                         inst.in_flight, inst.queued, reason)
            inst.unload_task = self._spawn(self._run_unload(inst))
        if inst.grace_deadline is not None and inst.grace_deadline <= self.clock():
            self._cut(inst)
        return inst.unload_task

    def _abort_load(self, inst: Instance, err: LmsError, *, kill: bool = False) -> None:
        if inst.abort is not None:
            return
        inst.abort = err
        inst.load_deadline = None  # acted on: the timer must not come back for it while the worker exits
        if inst.worker is not None:
            # the load returns at once; _run_load reports it
            self._spawn(inst.worker.stop(err.message, kill=kill))

    async def _run_unload(self, inst: Instance) -> None:
        try:
            await asyncio.shield(inst.ready)  # an evicted load finishes first and serves who waits on it
        except Exception:  # noqa: BLE001 - the load failed: _run_load has cleaned up
            return
        if inst.evicted_for is not None and inst.evicted_for.dropped:
            self._keep(inst, cancel=False)  # evicted while loading, for a load that was then given up
            if inst.unload_task is None:
                self._pump()
                return
        await inst.drained.wait()  # idle, or the grace ran out (cut)
        if inst.state == "gone":
            return  # the worker crashed meanwhile
        why = inst.cut or _reason_text(inst.identifier, inst.unload_reason or "manual", None)
        self._fail_waiters(inst, Unavailable(why))
        inst.move("stopping")
        if inst.worker is not None:
            await inst.worker.stop(why)  # returns once the process has been reaped: its memory is free
        log.info("unloaded %s (reason: %s)", inst.identifier, inst.unload_reason)
        if self._remove(inst):
            self.emit(SchedulerEvent("unloaded", inst.identifier, inst.key, reason=inst.unload_reason or "manual"))

    def _cut(self, inst: Instance) -> None:
        """The grace is over: queued requests are refused, running ones end when the worker stops."""
        if inst.cut or inst.state == "gone":
            return
        reason, grace = inst.grace_set_by or (inst.unload_reason or "manual", 0.0)
        inst.cut = _reason_text(inst.identifier, reason, grace)
        if inst.busy:
            log.warning("unload of %s: grace period over; ending %d running and %d queued request(s)",
                        inst.identifier, inst.in_flight, inst.queued)
        self._fail_waiters(inst, Unavailable(inst.cut))
        inst.drained.set()

    def _fail_waiters(self, inst: Instance, err: LmsError) -> None:
        for waiter in inst.waiters:
            _fail(waiter.fut, err)
        inst.waiters.clear()

    def _remove(self, inst: Instance) -> bool:
        """Takes `inst` out of the table (once); lets the next load in."""
        if inst.state == "gone":
            return False
        inst.move("gone")
        if self._instances.get(inst.identifier) is inst:
            del self._instances[inst.identifier]
        inst.drained.set()
        inst.gone.set()
        self._changed.set()
        self._pump()
        return True

    def _on_worker_exit(self, inst: Instance, why: str) -> None:
        """The worker died on its own (crash, OOM kill, SIGKILL)."""
        if inst.state == "gone":
            return
        if not inst.loaded:
            # The load in progress fails with the worker's exit status — even if the worker reported `loaded`
            # just before dying and _run_load has not resumed yet: it checks `abort` after the load returns.
            if inst.abort is None:
                inst.abort = LoadKilled(f"the worker loading '{inst.identifier}' died ({why})" + _died_hint(why))
            return
        log.error("worker of %s (pid %s) died: %s", inst.identifier, inst.worker.pid if inst.worker else "-", why)
        self._fail_waiters(inst, Unavailable(f"the worker running '{inst.identifier}' died ({why})"))
        self._remove(inst)
        self.emit(SchedulerEvent("crashed", inst.identifier, inst.key, reason="crash", message=why))
        self.emit(SchedulerEvent("unloaded", inst.identifier, inst.key, reason="crash", message=why))

    # ---------------------------------------------------------------- time: TTL, grace, load progress, max_wait

    def next_deadline(self) -> float | None:
        """The scheduler-clock time of the next deadline `tick()` acts on, or None when none is pending."""
        times: list[float] = []
        for inst in self._instances.values():
            if inst.ttl is not None and inst.status == "idle":
                times.append(inst.idle_since + inst.ttl)
            if inst.grace_deadline is not None and not inst.cut and inst.draining:
                times.append(inst.grace_deadline)
            if inst.load_deadline is not None and inst.state in ("loading", "draining") and not inst.loaded:
                times.append(inst.load_deadline)
            if inst.loaded:
                times.extend(w.deadline for w in inst.waiters if w.deadline is not None)
        for ticket in self._tickets:
            times.extend(w.deadline for w in ticket.waiters if w.deadline is not None)
        return min(times) if times else None

    async def tick(self) -> list[str]:
        """Acts on every deadline that has come: idle TTLs expire (their unload starts), drains whose grace is over
        are cut, loads without progress are killed, requests past max_wait are refused. Never waits for an
        unload. Returns the identifiers whose TTL expired."""
        now = self.clock()
        expired = [i for i in self._instances.values()
                   if i.ttl is not None and i.status == "idle" and now - i.idle_since >= i.ttl]
        for inst in expired:
            log.info("TTL of %s (%ss) ran out after being idle", inst.identifier, inst.ttl)
            self._begin_unload(inst, "ttl", None)
        for inst in list(self._instances.values()):
            if inst.draining and inst.grace_deadline is not None and now >= inst.grace_deadline:
                self._cut(inst)
            if not inst.loaded and inst.load_deadline is not None and now >= inst.load_deadline:
                timeout = self.settings().load_timeout
                self._abort_load(inst, LoadKilled(
                    f"the load of '{inst.identifier}' made no progress for {timeout} s (load_timeout); its worker "
                    "was killed"), kill=True)
            if inst.loaded:  # riders of a load in progress wait for it: load_timeout bounds a stuck load
                self._expire_waiters(inst.waiters, now, inst)
        for ticket in list(self._tickets):
            self._expire_waiters(ticket.waiters, now, ticket)
            if not ticket.waiters and ticket.origin == "jit":
                self._drop_ticket(ticket, pump=False)
        self._pump()
        return [i.identifier for i in expired]

    def _expire_waiters(self, waiters: collections.deque[Waiter], now: float, owner: Instance | Ticket) -> None:
        late = [w for w in waiters if w.deadline is not None and now >= w.deadline]
        for waiter in late:
            waiters.remove(waiter)
            name = owner.identifier if isinstance(owner, Instance) else owner.entry.key
            _fail(waiter.fut, WaitExceeded(
                f"waited {self.settings().max_wait} s (max_wait) for '{name}' while other models held the memory "
                "or its queue; retry later, or raise `lms server settings --max-wait`"))
        if late and isinstance(owner, Instance):
            self._after_request(owner)

    async def run_timer(self) -> None:
        """The daemon's driver for `tick()`: sleeps until the next deadline or until something changes. Runs until
        cancelled (after shutdown, whose grace it enforces)."""
        while True:
            self._changed.clear()
            deadline = self.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                pass
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - the driver must outlive any one bad tick
                log.exception("scheduler tick failed")

    def settings_changed(self) -> None:
        """Settings apply at once: a raised limit may let a waiting load start."""
        self._changed.set()
        self._pump()

    # ---------------------------------------------------------------- shutdown

    def _check_open(self) -> None:
        if self._closing:
            raise Unavailable("the daemon is shutting down")

    async def shutdown(self, grace: float = 10.0) -> None:
        """Refuses new work, refuses every load still waiting for its turn, drains every instance for at most
        `grace` seconds and ends every worker. The timer driver must run meanwhile (it enforces the grace)."""
        self._closing = True
        err = Unavailable("the daemon is shutting down")
        while self._tickets:
            ticket = self._tickets.popleft()
            _fail(ticket.result, err)
            for waiter in ticket.waiters:
                _fail(waiter.fut, err)
        await self.unload_all(reason="shutdown", grace=grace)
        await asyncio.shield(asyncio.gather(*list(self._tasks), return_exceptions=True))

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("scheduler task failed", exc_info=task.exception())


DEFAULT_CONTEXT_LENGTH = 4096


def default_context_length(entry: ModelEntry) -> int:
    """LM Studio's choice: 4096 tokens, or the model's own maximum when that is smaller."""
    if entry.max_context_length:
        return min(DEFAULT_CONTEXT_LENGTH, entry.max_context_length)
    return DEFAULT_CONTEXT_LENGTH


def _fail(fut: asyncio.Future[Any], err: BaseException) -> None:
    if not fut.done():
        fut.set_exception(err)
        fut.exception()  # marked retrieved: no "exception never retrieved" noise when nobody waited


def _check_ttl(ttl: int | None) -> None:
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1):
        raise InvalidArgument(f"ttl must be a whole number of seconds >= 1, got {ttl!r}", code="invalid_ttl")


def _died_hint(why: str) -> str:
    return " (out of memory? `lms load MODEL --estimate-only` shows what it needs)" if "SIGKILL" in why else ""


def _reason_text(identifier: str, reason: UnloadReason, grace: float | None) -> str:
    """What a request cut off by an unload is told: `grace` is the grace period that ran out (None: none did)."""
    if reason == "shutdown":
        return f"the daemon shut down while this request on '{identifier}' ran"
    if grace is not None and reason == "manual":
        return f"'{identifier}' was unloaded (lms unload) after a grace period of {grace}s while this request ran"
    if grace is not None:
        return f"'{identifier}' was unloaded ({reason}) and its grace period of {grace}s ended while this request ran"
    return f"'{identifier}' was unloaded ({reason})"
