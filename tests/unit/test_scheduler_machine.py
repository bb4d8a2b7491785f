"""The lifecycle rules as invariants, and hypothesis searching for the interleavings that break them.

The real Scheduler runs over fake workers and the injected clock on one event loop per example. Rules are what the
world does: manual loads, JIT requests, work on the worker, clients that finish or vanish (during the wait, during
prompt processing), unloads with any grace (and Ctrl-C on them), unload --all, time passing, loads and requests
crashing, slow process exits, settings changes, shutdown. After every step the invariants of docs/lifecycle.md
must hold; at the end every caller must have ended with a lease or a typed error — never a hang.

`HYPOTHESIS_PROFILE=stress` (make stress) runs many more examples.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lmsd.errors import LmsError, ModelLoadFailed, Unavailable, WorkerGone
from lmsd.scheduler import Lease
from tests.unit.conftest import GB, Env
from tests.unit.fakes import FakeStream

settings.register_profile("ci", max_examples=250, stateful_step_count=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("stress", max_examples=3000, stateful_step_count=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

MODELS = ["alpha", "beta", "gamma"]
SIZES = {"alpha": GB, "beta": 3 * GB // 2, "gamma": 2 * GB}
GRACES = st.sampled_from([None, 0.0, 1.0, 5.0])


@dataclass(eq=False)
class Caller:
    """One client of the scheduler: a JIT request (acquire) and what it did with its lease."""

    model: str
    task: asyncio.Task[Lease]
    excuses_at_start: int  # how many events that may fail a request (unloads, crashes...) had happened before it
    stream: FakeStream | None = None
    done: bool = False  # released (normally or by leaving)
    vanished: bool = False  # left mid-request: its slot is the worker's until the stream ends
    error: LmsError | None = None  # what starting work on its lease raised (the model went away under it)


class LifecycleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.env: Env = self.run(self._make_env())
        self.callers: list[Caller] = []
        self.loads: list[asyncio.Task[Any]] = []
        self.unloads: list[asyncio.Task[Any]] = []
        self.shutdown_task: asyncio.Task[None] | None = None
        self.grandfathered: set[int] = set()  # instances loaded before a limit was lowered (id of the object)
        self.excuses = 0  # unloads, unload --all, shutdown, crashes, Ctrl-C on a load: events that may fail requests
        self.graces: dict[int, float] = {}  # id(instance) -> the earliest grace deadline anyone asked for

    async def _make_env(self) -> Env:
        env = Env()
        env.sizes.update(SIZES)
        env.workers.gates = {f"/models/{m}.gguf": asyncio.Event() for m in MODELS}
        for gate in env.workers.gates.values():
            gate.set()
        env.scheduler.max_queue = 4
        return env

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def settle(self) -> None:
        async def spin() -> None:
            for _ in range(60):
                await asyncio.sleep(0)

        self.run(spin())

    def do(self, fn: Any, *args: Any) -> Any:
        """Runs a synchronous step on the loop (futures need a running loop), then lets the world react."""
        async def step() -> Any:
            return fn(*args)

        result = self.run(step())
        self.settle()
        return result

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self.settle()
        return task

    @property
    def sched(self) -> Any:
        return self.env.scheduler

    # ------------------------------------------------------------ rules: clients

    @initialize(auto_evict=st.booleans(), max_loaded=st.sampled_from([0, 0, 1, 2]),
                limit=st.sampled_from(["off", "auto", 3 * GB, 4 * GB]), slow_cancel=st.booleans(),
                parallel=st.sampled_from([1, 1, 2, 3]))
    def configure(self, auto_evict: bool, max_loaded: int, limit: Any, slow_cancel: bool, parallel: int) -> None:
        self.env.workers.slow_cancel = slow_cancel  # a worker busy in prompt processing finishes before it stops
        s = self.env.settings
        s.auto_evict, s.max_loaded_models, s.memory_limit = auto_evict, max_loaded, limit
        s.default_parallel = parallel  # JIT loads run this many requests at once
        s.max_wait = 100
        self.env.available = 5 * GB

    @rule(model=st.sampled_from(MODELS), ttl=st.sampled_from([None, 1, 10]))
    def jit_request(self, model: str, ttl: int | None) -> None:
        self.callers.append(Caller(model, self.spawn(self.sched.acquire(model, ttl)), self.excuses))

    @rule(model=st.sampled_from(MODELS), ttl=st.sampled_from([None, 10]), parallel=st.sampled_from([0, 1, 2]))
    def manual_load(self, model: str, ttl: int | None, parallel: int) -> None:
        self.loads.append(self.spawn(self.sched.load(model, ttl=ttl, parallel=parallel)))

    def _holding(self) -> list[Caller]:
        return [c for c in self.callers if c.task.done() and not c.task.cancelled() and c.task.exception() is None
                and not c.done]

    @precondition(lambda self: any(c.stream is None for c in self._holding()))
    @rule(data=st.data())
    def start_work(self, data: st.DataObject) -> None:
        caller = data.draw(st.sampled_from([c for c in self._holding() if c.stream is None]))
        lease = caller.task.result()

        def start() -> None:
            try:
                caller.stream = lease.worker.generate("chat", {})
            except LmsError as exc:
                caller.error = exc
                caller.done = True
                self.sched.release(lease)

        self.do(start)

    @precondition(lambda self: bool(self._holding()))
    @rule(data=st.data())
    def finish_normally(self, data: st.DataObject) -> None:
        caller = data.draw(st.sampled_from(self._holding()))
        self.do(self._finish, caller)

    def _finish(self, caller: Caller) -> None:
        if caller.stream is not None:
            caller.stream.finish()
        caller.done = True
        self.sched.release(caller.task.result())

    @precondition(lambda self: bool(self._holding()))
    @rule(data=st.data())
    def client_vanishes_mid_request(self, data: st.DataObject) -> None:
        self.do(self._vanish, data.draw(st.sampled_from(self._holding())))

    def _vanish(self, caller: Caller) -> None:
        caller.done = True
        if caller.stream is None:
            self.sched.release(caller.task.result())
        else:
            caller.vanished = True
            self.loop.create_task(caller.stream.aclose())  # FakeStream.aclose does its work before any await
            self.sched.release(caller.task.result(), until=caller.stream.ended)

    @precondition(lambda self: any(not c.task.done() for c in self.callers))
    @rule(data=st.data())
    def client_vanishes_while_waiting(self, data: st.DataObject) -> None:
        caller = data.draw(st.sampled_from([c for c in self.callers if not c.task.done()]))
        caller.task.cancel()
        caller.done = True
        self.settle()

    @precondition(lambda self: any(w.active for w in self.env.workers.workers))
    @rule(data=st.data())
    def worker_ends_a_request(self, data: st.DataObject) -> None:
        streams = [s for w in self.env.workers.workers for s in w.active]
        self.do(data.draw(st.sampled_from(streams)).finish)

    @rule(slow=st.booleans())
    def cancels_are_slow(self, slow: bool) -> None:
        self.env.workers.slow_cancel = slow

    # ------------------------------------------------------------ rules: operator and time

    @precondition(lambda self: bool(self.sched.instances()))
    @rule(data=st.data(), grace=GRACES)
    def unload(self, data: st.DataObject, grace: float | None) -> None:
        ident = data.draw(st.sampled_from(sorted(i.identifier for i in self.sched.instances())))
        self._note_grace([i for i in self.sched.instances() if i.identifier == ident], grace)
        self.unloads.append(self.spawn(self.sched.unload(ident, grace=grace)))

    @rule(grace=GRACES)
    def unload_all(self, grace: float | None) -> None:
        self._note_grace(self.sched.instances(), grace)
        self.unloads.append(self.spawn(self.sched.unload_all(grace=grace)))

    def _note_grace(self, insts: list[Any], grace: float | None) -> None:
        self.excuses += 1
        if grace is not None:
            for inst in insts:
                deadline = self.env.clock() + grace
                self.graces[id(inst)] = min(self.graces.get(id(inst), deadline), deadline)

    @precondition(lambda self: any(not t.done() for t in self.unloads + self.loads))
    @rule(data=st.data())
    def ctrl_c_on_unload_or_load(self, data: st.DataObject) -> None:
        self.excuses += 1  # Ctrl-C on a load that already started unloads it: its riders hear so
        data.draw(st.sampled_from([t for t in self.unloads + self.loads if not t.done()])).cancel()
        self.settle()

    @rule(seconds=st.sampled_from([0.5, 1, 5, 10, 60, 150]))
    def time_passes(self, seconds: float) -> None:
        busy_before = {id(i) for i in self.sched.instances() if i.busy or not i.loaded}
        self.env.clock.advance(seconds)
        expired = self.run(self.sched.tick())
        for inst in self.sched.instances():
            if inst.identifier in expired:
                assert id(inst) not in busy_before, f"TTL expired {inst.identifier} while it had work"
        self.settle()

    @rule(model=st.sampled_from(MODELS), open_=st.booleans())
    def loads_are_slow(self, model: str, open_: bool) -> None:
        gate = self.env.workers.gates[f"/models/{model}.gguf"]
        self.do(gate.set if open_ else gate.clear)

    @rule(slow=st.booleans())
    def process_exits_are_slow(self, slow: bool) -> None:
        if slow and self.env.workers.stop_gate is None:
            self.env.workers.stop_gate = asyncio.Event()
        elif not slow and self.env.workers.stop_gate is not None:
            self.do(self.env.workers.stop_gate.set)
            self.env.workers.stop_gate = None
        self.settle()

    @precondition(lambda self: any(not w.reaped for w in self.env.workers.workers))
    @rule(data=st.data())
    def worker_crashes(self, data: st.DataObject) -> None:
        self.excuses += 1
        self.do(data.draw(st.sampled_from([w for w in self.env.workers.workers if not w.reaped])).crash)

    @rule(auto_evict=st.booleans(), max_loaded=st.sampled_from([0, 1, 2, 3]),
          limit=st.sampled_from(["off", "auto", 3 * GB, 4 * GB]), jit=st.booleans())
    def settings_change(self, auto_evict: bool, max_loaded: int, limit: Any, jit: bool) -> None:
        s = self.env.settings
        lowered = (max_loaded and (not s.max_loaded_models or max_loaded < s.max_loaded_models)) or (
            limit != "off" and (s.memory_limit == "off" or _n(limit) < _n(s.memory_limit))) or (
            auto_evict and not s.auto_evict)
        if lowered:
            self.grandfathered |= {id(i) for i in self.sched.instances()}
        s.auto_evict, s.max_loaded_models, s.memory_limit, s.jit = auto_evict, max_loaded, limit, jit
        self.do(self.sched.settings_changed)

    @precondition(lambda self: self.shutdown_task is None)
    @rule(grace=st.sampled_from([0.0, 2.0]))
    def shutdown(self, grace: float) -> None:
        self._note_grace(self.sched.instances(), grace)
        self.shutdown_task = self.spawn(self.sched.shutdown(grace=grace))

    # ------------------------------------------------------------ two things in the same instant

    def _instant_actions(self) -> list[tuple[str, Any]]:
        """Steps that can happen in one turn of the event loop, for `same_instant` to pair up."""
        actions: list[tuple[str, Any]] = []
        for c in self.callers:
            if not c.task.done():
                actions.append(("cancel waiting caller", c.task.cancel))
        for c in self._holding():
            actions.append(("caller finishes", lambda c=c: self._finish(c)))
            actions.append(("caller vanishes", lambda c=c: self._vanish(c)))
        for w in self.env.workers.workers:
            for stream in w.active:
                actions.append(("worker ends a request", stream.finish))
            if not w.reaped:
                actions.append(("worker crashes", w.crash))
        for gate in self.env.workers.gates.values():
            if not gate.is_set():
                actions.append(("a load completes", gate.set))
        for model in MODELS:
            actions.append((f"request {model}", lambda m=model: self.callers.append(
                Caller(m, self.loop.create_task(self.sched.acquire(m)), self.excuses))))
        actions.append(("time passes 10 s", self._tick_after(10)))
        actions.append(("time passes 150 s", self._tick_after(150)))
        return actions

    def _tick_after(self, seconds: float) -> Any:
        def step() -> None:
            self.env.clock.advance(seconds)
            # tick() awaits nothing: run it to its end in this same turn of the loop
            coro = self.sched.tick()
            try:
                coro.send(None)
            except StopIteration:
                pass
            else:
                raise AssertionError("tick() awaited something")
        return step

    @rule(data=st.data())
    def same_instant(self, data: st.DataObject) -> None:
        actions = self._instant_actions()
        first, second = data.draw(st.lists(st.integers(0, len(actions) - 1), min_size=2, max_size=2, unique=True))
        names = [actions[first][0], actions[second][0]]
        if any(n == "worker crashes" for n in names):
            self.excuses += 1

        def both() -> None:
            actions[first][1]()
            actions[second][1]()

        self.do(both)

    # ------------------------------------------------------------ invariants

    @invariant()
    def no_instance_stuck_unloading(self) -> None:
        slow_exit = self.env.workers.stop_gate is not None
        for inst in self.sched.instances():
            assert inst.state != "gone"
            if inst.draining and inst.loaded and not (slow_exit and inst.state == "stopping"):
                # draining is only ever waiting for work to finish; once it is over (or cut) the unload goes on
                assert inst.state == "draining" and inst.busy and not inst.cut, (
                    f"{inst.identifier} stuck in {inst.state} (busy={inst.busy}, cut={inst.cut!r})")
            deadline = self.graces.get(id(inst))
            if deadline is not None and deadline <= self.env.clock() and inst.loaded and not slow_exit:
                raise AssertionError(f"{inst.identifier}: the grace asked for ran out, yet it is still loaded")

    @invariant()
    def one_jit_instance_per_model_and_processes_match_the_table(self) -> None:
        insts = self.sched.instances()
        keys = [i.key for i in insts if i.origin == "jit"]
        assert len(keys) == len(set(keys)), keys
        if self.env.settings.auto_evict and not any(id(i) in self.grandfathered for i in insts):
            live = [i.identifier for i in insts if i.origin == "jit" and not i.draining]
            assert len(live) <= 1, f"auto-evict on, yet several JIT models serve: {live}"
        workers = {id(i.worker) for i in insts if i.worker is not None}
        for w in self.env.workers.workers:
            # memory first: a process is out of the table only once it has exited
            assert w.reaped or id(w) in workers, f"worker {w.pid} ({w.loaded_path}) runs outside the table"
    @invariant()
    def ttl_only_expires_idle_instances_and_only_jit_is_evicted(self) -> None:
        for inst in self.sched.instances():
            if inst.unload_reason == "ttl":
                assert not inst.waiters and inst.in_flight <= 0 or inst.state == "stopping"
            if inst.unload_reason == "evict":
                assert inst.origin == "jit", f"manual instance {inst.identifier} was evicted"

    @invariant()
    def within_limits(self) -> None:
        insts = self.sched.instances()
        if any(id(i) in self.grandfathered for i in insts):
            return
        self.grandfathered.clear()
        s = self.env.settings
        if s.max_loaded_models:
            assert len(insts) <= s.max_loaded_models, [i.identifier for i in insts]
        if isinstance(s.memory_limit, int):
            assert sum(i.estimate for i in insts) <= s.memory_limit

    @invariant()
    def slots_follow_leases_and_the_worker(self) -> None:
        for inst in self.sched.instances():
            held = sum(1 for c in self.callers if c.task.done() and not c.task.cancelled()
                       and c.task.exception() is None and c.task.result().instance is inst
                       and (not c.done or (c.vanished and c.stream is not None and not c.stream.ended.done())))
            assert inst.in_flight == held, f"{inst.identifier}: in_flight {inst.in_flight}, leases and work {held}"
            assert inst.in_flight <= inst.parallel, f"{inst.identifier}: {inst.in_flight} > parallel {inst.parallel}"
            if inst.origin == "jit":  # JIT loads take the default_parallel setting
                assert inst.parallel == self.env.settings.default_parallel
            if inst.worker is not None and getattr(inst.worker, "parallel", 0):
                assert inst.worker.parallel == inst.parallel  # the worker decodes as many as the scheduler admits
            assert all(not w.fut.done() for w in inst.waiters) or self._pending_cancel(inst)
            if inst.waiters and inst.loaded and not inst.cut and not self._pending_cancel(inst):
                assert inst.in_flight == inst.parallel  # nobody waits while a slot is free

    def _pending_cancel(self, inst: Any) -> bool:
        return any(w.fut.cancelled() for w in inst.waiters)

    @invariant()
    def callers_end_with_a_lease_or_a_typed_error(self) -> None:
        for caller in self.callers:
            if caller.task.done() and not caller.task.cancelled():
                exc = caller.task.exception() or caller.error
                assert exc is None or isinstance(exc, LmsError), repr(exc)
                if isinstance(exc, (Unavailable, ModelLoadFailed, WorkerGone)):
                    # nobody is failed because another model was asked for, or a TTL ran out
                    excused = self.excuses > caller.excuses_at_start or self.shutdown_task is not None
                    assert excused, f"{caller.model}: {exc!r} with no unload or crash"

    def _open_everything(self) -> None:
        for gate in self.env.workers.gates.values():
            gate.set()
        if self.env.workers.stop_gate is not None:
            self.env.workers.stop_gate.set()
            self.env.workers.stop_gate = None
        self.env.workers.slow_cancel = False

    def _end_all_work(self) -> None:
        for caller in self._holding():
            self._finish(caller)
        for w in self.env.workers.workers:
            for stream in list(w.active):
                stream.finish()

    def teardown(self) -> None:
        """Let the world run to its end: every gate open, every client done, time past every deadline. Nothing may
        be left hanging."""
        try:
            self.do(self._open_everything)
            for _ in range(4):
                self.do(self._end_all_work)
                self.env.clock.advance(1000)
                self.run(self.sched.tick())
            self.settle()
            hanging = [c.model for c in self.callers if not c.task.done()]
            assert not hanging, f"requests never answered: {hanging}"
            assert all(t.done() for t in self.loads), "a load never ended"
            assert all(t.done() for t in self.unloads), "an unload never ended"
            self.run(asyncio.wait_for(self.sched.shutdown(grace=0), 0.1))
            assert not self.sched.instances() and not self.env.workers.running
            for task in [c.task for c in self.callers] + self.loads + self.unloads:
                if task.done() and not task.cancelled():
                    exc = task.exception()
                    assert exc is None or isinstance(exc, LmsError), repr(exc)
        finally:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.settle()
            self.loop.close()


def _n(limit: Any) -> int:
    return limit if isinstance(limit, int) else 1 << 62


LifecycleMachine.TestCase.settings = PROFILE
TestLifecycle = LifecycleMachine.TestCase
