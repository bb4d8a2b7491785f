"""The scheduler: the only owner of the instance table — loads, idle TTLs, JIT, auto-evict and drain.

Everything here runs on the daemon's event loop; no method blocks it. gRPC and HTTP handlers ask the
scheduler and never touch an Instance's counters themselves. Time and workers are injected: the clock is
a `() -> float` of monotonic seconds and workers come from a factory, so unit tests move time forward and
call `tick()` instead of sleeping.

Lifecycle rules (docs/lifecycle.md says the same for users):
- An instance is idle when it has no request in flight or queued. Its TTL counts from the moment it became
  idle, so it restarts at the end of every request and can never fire while the instance works.
- A JIT load takes the request's ttl, else the default TTL. A request that finds the model loaded leaves
  its TTL alone. Concurrent requests for the same unloaded model share one load.
- Auto-evict: before a JIT load, every other JIT instance drains (takes no new requests, finishes what it
  has) and is unloaded. Manual instances are never evicted.
- Unload drains too; a manual unload waits at most `grace` seconds, then ends what is still running with
  a clear error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from lmsd.catalog import AmbiguousModel, Catalog, ModelEntry
from lmsd.config import Settings
from lmsd.errors import (
    FailedPrecondition,
    InvalidArgument,
    LmsError,
    ModelLoadFailed,
    ModelNotFound,
    QueueFull,
    Unavailable,
)
from lmsd.instance import (
    Instance,
    InstanceView,
    Origin,
    ProgressFn,
    SchedulerEvent,
    UnloadReason,
    Worker,
    WorkerFactory,
)

log = logging.getLogger(__name__)
Clock = Callable[[], float]


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
        parallel: int = 1,
        max_queue: int = 16,
        offload: Callable[..., Awaitable[Any]] = asyncio.to_thread,
    ) -> None:
        self.catalog = catalog
        self.worker_factory = worker_factory
        self.settings = settings
        self.clock = clock
        self.wall_clock = wall_clock
        self.parallel = parallel  # requests one instance runs at once (the worker serves them in order)
        self.max_queue = max_queue  # requests one instance holds waiting; beyond this: QueueFull
        self.offload = offload  # runs blocking work (catalog scans read files) off the event loop
        self._instances: dict[str, Instance] = {}  # identifier -> instance; changed only by this class
        self._changed = asyncio.Event()  # wakes the TTL driver when a deadline may have moved
        self._subscribers: set[asyncio.Queue[SchedulerEvent]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
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
        pid = inst.worker.pid if inst.worker else 0
        return InstanceView(
            identifier=inst.identifier,
            model=inst.key,
            path=inst.entry.rel_path,
            status=inst.status,
            origin=inst.origin,
            ttl_seconds=inst.ttl,
            ttl_remaining_seconds=remaining,
            context_length=inst.context_length,
            size_bytes=inst.entry.size_bytes,
            memory_bytes=inst.worker.memory_bytes() if inst.worker else 0,
            pid=pid,
            in_flight=inst.in_flight,
            queued=inst.queued,
            last_used_unix=inst.last_used_unix,
        )

    def list_loaded(self) -> list[InstanceView]:
        return [self.view(i) for i in self._instances.values()]

    # ---------------------------------------------------------------- events

    def subscribe(self) -> asyncio.Queue[SchedulerEvent]:
        q: asyncio.Queue[SchedulerEvent] = asyncio.Queue(maxsize=1000)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[SchedulerEvent]) -> None:
        self._subscribers.discard(q)

    def emit(self, event: SchedulerEvent) -> None:
        for q in list(self._subscribers):
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:
                pass  # a watcher that does not read loses events rather than slowing the daemon

    # ---------------------------------------------------------------- loading

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
        origin: Origin = "manual",
        progress: ProgressFn | None = None,
    ) -> Instance:
        """Starts loading a new instance and returns it while it loads; `instance.ready` tells the outcome."""
        self._check_open()
        _check_ttl(ttl)
        if context_length < 0:
            raise InvalidArgument(f"context length must be a positive number of tokens, got {context_length}")
        entry = await self._resolve(model)
        if context_length and entry.max_context_length and context_length > entry.max_context_length:
            raise InvalidArgument(
                f"context length {context_length} is beyond what '{entry.key}' was trained for "
                f"({entry.max_context_length} tokens)"
            )
        if identifier and identifier in self._instances:
            raise FailedPrecondition(
                f"an instance with identifier '{identifier}' is already loaded; unload it or choose another"
            )
        return self._start_load(entry, origin, ttl, identifier or self._next_identifier(entry.key), context_length,
                                progress)

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

    def _next_identifier(self, key: str) -> str:
        if key not in self._instances:
            return key
        n = 2
        while f"{key}:{n}" in self._instances:
            n += 1
        return f"{key}:{n}"

    def _start_load(
        self,
        entry: ModelEntry,
        origin: Origin,
        ttl: int | None,
        identifier: str,
        context_length: int,
        progress: ProgressFn | None,
    ) -> Instance:
        """Puts a `loading` instance in the table at once (so concurrent requests join it), loads it in a task."""
        context_length = context_length or default_context_length(entry)
        inst = Instance(identifier=identifier, entry=entry, origin=origin, ttl=ttl, context_length=context_length)
        self._instances[identifier] = inst
        self._spawn(self._run_load(inst, progress))
        return inst

    async def _run_load(self, inst: Instance, progress: ProgressFn | None) -> None:
        n_ctx = 0
        try:
            worker = await self.worker_factory()
            inst.worker = worker
            worker.on_exit(lambda why: self._on_worker_exit(inst, why))
            if not inst.draining:
                n_ctx = await worker.load(inst.entry.path, inst.context_length, progress or (lambda _f: None),
                                          embedding=inst.entry.type == "embedding")
        except Exception as exc:  # noqa: BLE001 - any load failure is reported to every waiter
            err = exc if isinstance(exc, LmsError) else ModelLoadFailed(f"cannot load '{inst.key}': {exc}")
            if not inst.draining:
                log.warning("load of %s failed: %s", inst.identifier, err)
            if inst.worker is not None:
                await inst.worker.stop("load failed")
            self._remove(inst)
            _fail(inst.ready, err)
            return
        if inst.draining or inst.gone.is_set():
            # Unloaded (or crashed) while loading: make sure the worker is gone and nobody waits forever.
            await worker.stop(f"'{inst.identifier}' was unloaded while loading")
            self._remove(inst)
            _fail(inst.ready, Unavailable(f"'{inst.identifier}' was unloaded while loading"))
            return
        inst.context_length = n_ctx
        inst.idle_since = self.clock()
        inst.idle.set()
        inst.ready.set_result(None)
        log.info("loaded %s (%s, origin %s, ttl %s, pid %s)", inst.identifier, inst.entry.rel_path, inst.origin,
                 inst.ttl, inst.worker.pid if inst.worker else "-")
        self.emit(SchedulerEvent("loaded", inst.identifier, inst.key, fields={
            "origin": inst.origin, "ttl": str(inst.ttl or ""), "context_length": str(n_ctx)}))
        self._changed.set()

    # ---------------------------------------------------------------- requests (JIT entry point)

    async def acquire(self, model: str, ttl: int | None = None) -> Lease:
        """A slot on an instance serving `model`, loading it just in time if allowed.

        `model` is an identifier, a key or a unique prefix of one. `ttl` applies only if this call causes
        the load. Raises ModelNotFound, InvalidArgument, QueueFull, Unavailable, ModelLoadFailed.
        """
        _check_ttl(ttl)
        while True:
            self._check_open()
            inst = self._find_serving(model)
            if inst is None:
                inst = await self._jit_instance(model, ttl)
                if inst is None:
                    continue  # a drain of this model just ended; look again
            if not inst.ready.done():
                await asyncio.shield(inst.ready)  # joins the one load in progress; raises its error
                continue
            return await self._admit(inst)

    async def target(self, model: str) -> tuple[ModelEntry, int, bool]:
        """What a request for `model` would run on, without loading anything: the model, the context length it
        has or would get from a JIT load, and whether it is loaded. Raises as `acquire` would for a model
        that cannot be served (unknown, path-like, unreadable, or unloaded with JIT off)."""
        inst = self._find_serving(model)
        if inst is not None:
            return inst.entry, inst.context_length, True
        entry = await self._resolve(model)
        inst = self._find_serving(entry.key)
        if inst is not None:
            return inst.entry, inst.context_length, True
        if not self.settings().jit:
            raise self._jit_off_error(model)
        return entry, default_context_length(entry), False

    def _find_serving(self, model: str) -> Instance | None:
        if model in self._instances and not self._instances[model].draining:
            return self._instances[model]
        same = [i for i in self._instances.values() if i.key.lower() == model.lower() and not i.draining]
        return min(same, key=lambda i: (i.in_flight + i.queued, i.identifier)) if same else None

    async def _jit_instance(self, model: str, ttl: int | None) -> Instance | None:
        settings = self.settings()
        entry = await self._resolve(model)
        existing = self._find_serving(entry.key)
        if existing is not None:
            return existing  # `model` was a prefix of a loaded key, or someone loaded it while we resolved
        if not settings.jit:
            raise self._jit_off_error(model)
        draining = [i for i in self._instances.values() if i.key == entry.key and i.draining]
        if draining:
            # The model is on its way out (evicted, expiring, unloading): wait until it is gone, then load it
            # afresh.
            await draining[0].gone.wait()
            return None  # look again from the start
        if settings.auto_evict:
            await self._evict_jit_except(entry.key)
            existing = self._find_serving(entry.key)
            if existing is not None:
                return existing
        return self._start_load(entry, "jit", ttl if ttl is not None else settings.default_ttl,
                                self._next_identifier(entry.key), 0, None)

    def _jit_off_error(self, model: str) -> ModelNotFound:
        loaded = ", ".join(sorted(self._instances)) or "none"
        return ModelNotFound(
            f"model '{model}' is not loaded and JIT loading is off. Load it first with "
            f"`lms load {model}`, or turn JIT on with `lms server settings --jit`. Loaded: {loaded}."
        )

    async def _evict_jit_except(self, key: str) -> None:
        """Drains and unloads every other JIT instance, and waits for those already on their way out, so the
        new model is loaded only once their memory is given back."""
        others = [i for i in self._instances.values() if i.origin == "jit" and i.key != key]
        victims = [i for i in others if not i.draining]
        if victims:
            log.info("auto-evict before loading %s: %s", key, ", ".join(v.identifier for v in victims))
        await asyncio.gather(
            *(self.unload(v.identifier, reason="evict") for v in victims),
            *(i.gone.wait() for i in others if i.draining),
            return_exceptions=True,
        )

    async def _admit(self, inst: Instance) -> Lease:
        if inst.in_flight < self.parallel and not inst.waiters:
            self._start_request(inst)
            return Lease(self, inst)
        if len(inst.waiters) >= self.max_queue:
            raise QueueFull(
                f"'{inst.identifier}' already has {len(inst.waiters)} requests waiting; retry shortly"
            )
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        inst.waiters.append(fut)
        inst.idle.clear()
        try:
            await fut  # resolved by _next_waiter with the slot already counted in in_flight
        except asyncio.CancelledError:
            if fut in inst.waiters:
                inst.waiters.remove(fut)
                self._after_request(inst)
            elif fut.done() and not fut.cancelled() and fut.exception() is None:
                self._finish_request(inst)  # the slot was granted just as the caller went away
            raise
        return Lease(self, inst)

    def _start_request(self, inst: Instance) -> None:
        inst.in_flight += 1
        inst.idle.clear()

    def release(self, lease: Lease) -> None:
        if lease.released:
            return
        lease.released = True
        self._finish_request(lease.instance)

    def _finish_request(self, inst: Instance) -> None:
        inst.in_flight -= 1
        inst.last_used_unix = self.wall_clock()
        self._after_request(inst)

    def _after_request(self, inst: Instance) -> None:
        while inst.waiters and inst.in_flight < self.parallel:
            fut = inst.waiters.popleft()
            if not fut.done():
                self._start_request(inst)
                fut.set_result(True)
        if inst.in_flight == 0 and not inst.waiters:
            inst.idle_since = self.clock()  # the TTL restarts from the end of every request
            inst.idle.set()
            self._changed.set()

    # ---------------------------------------------------------------- unloading

    async def unload(self, identifier: str, *, reason: UnloadReason = "manual", grace: float | None = None) -> None:
        """Drains and unloads one instance. `grace` bounds the drain (None: wait for every request)."""
        inst = self._instances.get(identifier)
        if inst is None:
            loaded = ", ".join(sorted(self._instances)) or "none"
            raise ModelNotFound(f"no loaded instance '{identifier}'. Loaded: {loaded}. See `lms ps`.")
        if inst.draining:
            await inst.gone.wait()
            return
        inst.draining = True
        self._changed.set()
        if inst.ready.done() and (inst.in_flight or inst.waiters):
            log.info("draining %s (%d in flight, %d queued) before unload (%s)", identifier, inst.in_flight,
                     inst.queued, reason)
            try:
                await asyncio.wait_for(inst.idle.wait(), grace)
            except TimeoutError:
                log.warning("unload of %s: grace period of %ss over; ending %d running request(s)", identifier,
                            grace, inst.in_flight + inst.queued)
        why = _reason_text(identifier, reason, grace)
        for fut in inst.waiters:
            if not fut.done():
                fut.set_exception(Unavailable(why))
        inst.waiters.clear()
        await self._finish_unload(inst, reason, why)

    async def _finish_unload(self, inst: Instance, reason: UnloadReason, why: str) -> None:
        if inst.gone.is_set():
            return
        self._remove(inst)
        if inst.worker is not None:
            await inst.worker.stop(why)
        _fail(inst.ready, Unavailable(f"'{inst.identifier}' was unloaded while loading"))
        log.info("unloaded %s (reason: %s)", inst.identifier, reason)
        self.emit(SchedulerEvent("unloaded", inst.identifier, inst.key, reason=reason))

    async def unload_all(self, *, reason: UnloadReason = "manual", grace: float | None = None) -> list[str]:
        ids = list(self._instances)
        await asyncio.gather(*(self.unload(i, reason=reason, grace=grace) for i in ids), return_exceptions=True)
        return ids

    def _remove(self, inst: Instance) -> None:
        if self._instances.get(inst.identifier) is inst:
            del self._instances[inst.identifier]
        inst.gone.set()
        self._changed.set()

    def _on_worker_exit(self, inst: Instance, why: str) -> None:
        """The worker died on its own (crash, OOM kill, SIGKILL): drop the instance at once."""
        if inst.gone.is_set():
            return
        log.error("worker of %s (pid %s) died: %s", inst.identifier, inst.worker.pid if inst.worker else "-", why)
        err = Unavailable(f"the worker running '{inst.identifier}' died ({why})")
        for fut in inst.waiters:
            if not fut.done():
                fut.set_exception(err)
        inst.waiters.clear()
        self._remove(inst)
        _fail(inst.ready, ModelLoadFailed(f"cannot load '{inst.key}': the worker died ({why})"))
        self.emit(SchedulerEvent("crashed", inst.identifier, inst.key, reason="crash", message=why))
        self.emit(SchedulerEvent("unloaded", inst.identifier, inst.key, reason="crash", message=why))

    # ---------------------------------------------------------------- TTL

    def next_deadline(self) -> float | None:
        """The monotonic time of the next possible TTL expiry, or None when nothing can expire."""
        deadlines = [i.idle_since + i.ttl for i in self._expirable() if i.ttl is not None]
        return min(deadlines) if deadlines else None

    def _expirable(self) -> Iterator[Instance]:
        for inst in self._instances.values():
            if inst.ttl is not None and inst.status == "idle":
                yield inst

    async def tick(self) -> list[str]:
        """Unloads every idle instance whose TTL has run out; returns their identifiers."""
        now = self.clock()
        expired = [i for i in self._expirable() if now - i.idle_since >= i.ttl]  # type: ignore[operator]
        for inst in expired:
            log.info("TTL of %s (%ss) ran out after being idle", inst.identifier, inst.ttl)
        await asyncio.gather(*(self.unload(i.identifier, reason="ttl") for i in expired), return_exceptions=True)
        return [i.identifier for i in expired]

    async def run_ttl_timer(self) -> None:
        """The daemon's driver for `tick()`: sleeps until the next deadline or until something changes."""
        while not self._closing:
            self._changed.clear()
            deadline = self.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                pass
            await self.tick()

    # ---------------------------------------------------------------- shutdown

    def _check_open(self) -> None:
        if self._closing:
            raise Unavailable("the daemon is shutting down")

    async def shutdown(self, grace: float = 10.0) -> None:
        self._closing = True
        self._changed.set()
        await self.unload_all(reason="shutdown", grace=grace)
        for task in list(self._tasks):
            task.cancel()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


DEFAULT_CONTEXT_LENGTH = 4096


def default_context_length(entry: ModelEntry) -> int:
    """LM Studio's choice: 4096 tokens, or the model's own maximum when that is smaller."""
    if entry.max_context_length:
        return min(DEFAULT_CONTEXT_LENGTH, entry.max_context_length)
    return DEFAULT_CONTEXT_LENGTH


def _fail(fut: asyncio.Future[None], err: BaseException) -> None:
    if not fut.done():
        fut.set_exception(err)
        fut.exception()  # marked retrieved: no "exception never retrieved" noise when nobody waited


def _check_ttl(ttl: int | None) -> None:
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1):
        raise InvalidArgument(f"ttl must be a whole number of seconds >= 1, got {ttl!r}", code="invalid_ttl")


def _reason_text(identifier: str, reason: UnloadReason, grace: float | None) -> str:
    if reason == "manual":
        return f"'{identifier}' was unloaded (lms unload) after a grace period of {grace}s while this request ran"
    if reason == "shutdown":
        return f"the daemon shut down while this request on '{identifier}' ran"
    return f"'{identifier}' was unloaded ({reason})"
