"""The lifecycle rules of SPEC §4, driven with an injected clock and fake workers: no sleeps."""

from __future__ import annotations

import asyncio

import pytest

from lmsd.errors import InvalidArgument, ModelLoadFailed, ModelNotFound, QueueFull, Unavailable
from tests.unit.conftest import Env


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def ids(env: Env) -> list[str]:
    return sorted(i.identifier for i in env.scheduler.instances())


async def test_manual_load_has_no_ttl_unless_given(env: Env) -> None:
    a = await env.scheduler.load("alpha")
    b = await env.scheduler.load("beta", ttl=60)
    assert (a.origin, a.ttl, b.ttl) == ("manual", None, 60)
    env.clock.advance(10_000)
    assert await env.scheduler.tick() == ["beta"]
    await settle()  # tick starts the unload; it does not wait for it
    assert ids(env) == ["alpha"]


async def test_second_instance_gets_numbered_identifier(env: Env) -> None:
    await env.scheduler.load("alpha")
    second = await env.scheduler.load("alpha")
    third = await env.scheduler.load("alpha")
    custom = await env.scheduler.load("alpha", identifier="mine")
    assert (second.identifier, third.identifier, custom.identifier) == ("alpha:2", "alpha:3", "mine")
    with pytest.raises(Exception, match="already loaded"):
        await env.scheduler.load("beta", identifier="mine")


async def test_load_by_unique_prefix_and_errors(env: Env) -> None:
    inst = await env.scheduler.load("smol")
    assert inst.identifier == "smollm2-135m-instruct"
    with pytest.raises(ModelNotFound, match="no model 'nope'"):
        await env.scheduler.load("nope")
    with pytest.raises(InvalidArgument, match="filesystem path"):
        await env.scheduler.load("../../etc/passwd")
    with pytest.raises(ModelLoadFailed, match="corrupt header"):
        await env.scheduler.load("corrupt-header")
    with pytest.raises(ModelLoadFailed, match="bad file"):
        await env.scheduler.load("corrupt")
    for bad in (0, -5):
        with pytest.raises(InvalidArgument, match="whole number of seconds"):
            await env.scheduler.load("alpha", ttl=bad)
    assert ids(env) == ["smollm2-135m-instruct"]
    assert len(env.workers.running) == 1  # the failed load's worker was ended


async def test_ttl_counts_only_while_idle_and_restarts_after_each_request(env: Env) -> None:
    await env.scheduler.load("alpha", ttl=10)
    env.clock.advance(9)
    lease = await env.scheduler.acquire("alpha")
    env.clock.advance(100)  # a long request: the TTL is due, but the instance is busy
    assert await env.scheduler.tick() == []
    assert env.scheduler.next_deadline() is None
    env.scheduler.release(lease)
    env.clock.advance(9)  # the timer restarted at the end of the request
    assert await env.scheduler.tick() == []
    view = env.scheduler.list_loaded()[0]
    assert view.status == "idle" and view.ttl_remaining_seconds == pytest.approx(1)
    env.clock.advance(1)
    assert await env.scheduler.tick() == ["alpha"]
    await settle()  # tick starts the unload; it does not wait for it
    assert ids(env) == [] and env.workers.workers[0].stopped


async def test_jit_load_uses_request_ttl_else_default_and_ignores_ttl_when_loaded(env: Env) -> None:
    env.settings.default_ttl = 300
    lease = await env.scheduler.acquire("alpha")
    assert (lease.instance.origin, lease.instance.ttl) == ("jit", 300)
    env.scheduler.release(lease)
    again = await env.scheduler.acquire("alpha", ttl=5)  # already loaded: ttl accepted and ignored
    assert again.instance.ttl == 300
    env.scheduler.release(again)
    env.settings.auto_evict = False
    other = await env.scheduler.acquire("beta", ttl=5)
    assert other.instance.ttl == 5
    env.scheduler.release(other)


async def test_concurrent_first_requests_share_one_load(env: Env) -> None:
    env.workers.gate = asyncio.Event()
    env.scheduler.max_queue = 10  # requests riding a load count as queued
    tasks = [asyncio.create_task(env.scheduler.acquire("alpha")) for _ in range(6)]
    await settle()
    assert ids(env) == ["alpha"] and env.scheduler.list_loaded()[0].status == "loading"
    env.workers.gate.set()
    leases = []
    for t in tasks:
        lease = await t
        leases.append(lease)
        env.scheduler.release(lease)
    assert len(env.workers.loads) == 1 and ids(env) == ["alpha"]
    assert {lease.instance.identifier for lease in leases} == {"alpha"}


async def test_failed_jit_load_fails_every_joined_request(env: Env) -> None:
    env.workers.gate = asyncio.Event()
    tasks = [asyncio.create_task(env.scheduler.acquire("corrupt")) for _ in range(3)]
    await settle()
    env.workers.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ModelLoadFailed) for r in results)
    assert len(env.workers.loads) == 1 and ids(env) == []


async def test_jit_off_refuses_unloaded_model_but_serves_loaded(env: Env) -> None:
    env.settings.jit = False
    with pytest.raises(ModelNotFound, match="lms load alpha"):
        await env.scheduler.acquire("alpha")
    await env.scheduler.load("alpha")
    lease = await env.scheduler.acquire("alpha")
    env.scheduler.release(lease)
    assert env.workers.loads == ["/models/alpha.gguf"]


async def test_auto_evict_drains_other_jit_instances_but_never_manual(env: Env) -> None:
    await env.scheduler.load("gamma")  # manual
    events = env.scheduler.subscribe()
    a = await env.scheduler.acquire("alpha")  # a request on alpha is still running
    b_task = asyncio.create_task(env.scheduler.acquire("beta"))
    await settle()
    alpha = a.instance
    assert alpha.draining and not alpha.gone.is_set()  # drains: its running request is not cut off
    assert env.workers.workers[1].stopped is None
    assert len(env.workers.loads) == 2  # beta waits for alpha's memory
    assert not b_task.done()
    env.scheduler.release(a)
    b = await b_task
    assert alpha.gone.is_set() and env.workers.workers[1].stopped
    assert ids(env) == ["beta", "gamma"]
    env.scheduler.release(b)
    unloads = [(e.identifier, e.reason) for e in [events.get_nowait() for _ in range(events.qsize())]
               if e.kind == "unloaded"]
    assert unloads == [("alpha", "evict")]


async def test_auto_evict_off_keeps_jit_instances(env: Env) -> None:
    env.settings.auto_evict = False
    for name in ("alpha", "beta"):
        env.scheduler.release(await env.scheduler.acquire(name))
    assert ids(env) == ["alpha", "beta"]


async def test_requests_queue_in_order_and_overflow_is_refused(env: Env) -> None:
    first = await env.scheduler.acquire("alpha")
    order: list[int] = []

    async def request(n: int) -> None:
        lease = await env.scheduler.acquire("alpha")
        order.append(n)
        env.scheduler.release(lease)

    waiting = [asyncio.create_task(request(n)) for n in range(3)]
    await settle()
    view = env.scheduler.list_loaded()[0]
    assert (view.in_flight, view.queued, view.status) == (1, 3, "busy")
    with pytest.raises(QueueFull):
        await env.scheduler.acquire("alpha")
    env.scheduler.release(first)
    await asyncio.gather(*waiting)
    assert order == [0, 1, 2]
    assert env.scheduler.list_loaded()[0].status == "idle"


async def test_cancelled_waiter_leaves_the_queue(env: Env) -> None:
    first = await env.scheduler.acquire("alpha")
    waiter = asyncio.create_task(env.scheduler.acquire("alpha"))
    await settle()
    waiter.cancel()
    await settle()
    assert env.scheduler.list_loaded()[0].queued == 0
    env.scheduler.release(first)
    assert env.scheduler.list_loaded()[0].status == "idle"


async def test_unload_drains_then_unloads(env: Env) -> None:
    await env.scheduler.load("alpha")
    lease = await env.scheduler.acquire("alpha")
    unload = asyncio.create_task(env.scheduler.unload("alpha", grace=None))
    await settle()
    assert env.scheduler.list_loaded()[0].status == "unloading"
    assert env.workers.workers[0].stopped is None
    env.scheduler.release(lease)
    await unload
    assert ids(env) == [] and env.workers.workers[0].stopped


async def test_unload_after_grace_ends_running_and_queued_requests(env: Env) -> None:
    await env.scheduler.load("alpha")
    lease = await env.scheduler.acquire("alpha")  # never released: a stuck request
    stream = lease.worker.generate("chat", {})
    queued = asyncio.create_task(env.scheduler.acquire("alpha"))
    await settle()
    unload = asyncio.create_task(env.scheduler.unload("alpha", grace=5))
    await settle()
    assert not unload.done()
    env.clock.advance(5)
    await env.scheduler.tick()
    await unload
    assert "grace period" in (env.workers.workers[0].stopped or "")
    with pytest.raises(Unavailable, match="unloaded"):
        await queued
    assert stream.ended.done()  # the running request ended with the worker


async def test_unload_unknown_and_all(env: Env) -> None:
    with pytest.raises(ModelNotFound, match="no loaded instance 'zzz'"):
        await env.scheduler.unload("zzz")
    await env.scheduler.load("alpha")
    await env.scheduler.load("beta")
    assert sorted(await env.scheduler.unload_all()) == ["alpha", "beta"]
    assert ids(env) == [] and not env.workers.running


async def test_worker_crash_removes_instance_and_fails_waiters(env: Env) -> None:
    await env.scheduler.load("alpha")
    await env.scheduler.load("beta")
    events = env.scheduler.subscribe()
    await env.scheduler.acquire("alpha")
    queued = asyncio.create_task(env.scheduler.acquire("alpha"))
    await settle()
    env.workers.workers[0].crash("killed by signal 9")
    with pytest.raises(Unavailable, match="died"):
        await queued
    assert ids(env) == ["beta"]
    kinds = [events.get_nowait().kind for _ in range(events.qsize())]
    assert "crashed" in kinds


async def test_unload_while_loading_ends_the_worker(env: Env) -> None:
    env.workers.gate = asyncio.Event()
    load = asyncio.create_task(env.scheduler.load("alpha"))
    await settle()
    await env.scheduler.unload("alpha")
    env.workers.gate.set()
    with pytest.raises(Unavailable, match="unloaded while loading"):
        await load
    await settle()
    assert ids(env) == [] and not env.workers.running


async def test_request_for_draining_model_waits_and_reloads(env: Env) -> None:
    lease = await env.scheduler.acquire("alpha")
    unload = asyncio.create_task(env.scheduler.unload("alpha"))
    again = asyncio.create_task(env.scheduler.acquire("alpha"))
    await settle()
    assert not again.done()
    env.scheduler.release(lease)
    await unload
    second = await again
    assert second.instance is not lease.instance and len(env.workers.loads) == 2
    env.scheduler.release(second)


async def test_ttl_timer_driver_wakes_at_the_deadline() -> None:
    # The real driver with the real clock and a 50 ms TTL: proves run_timer sleeps until the deadline.
    from lmsd.config import Settings
    from lmsd.scheduler import Scheduler
    from tests.unit.conftest import StaticCatalog
    from tests.unit.fakes import FakeWorkerFactory

    sched = Scheduler(StaticCatalog(["alpha"]), FakeWorkerFactory(), Settings, estimate=lambda e, c, p: 1)
    driver = asyncio.create_task(sched.run_timer())
    await sched.load("alpha", ttl=1)
    sched.instances()[0].ttl = 0  # type: ignore[assignment]  # force "due now" without waiting a second
    sched._changed.set()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not sched.instances():
            break
    assert sched.instances() == []
    driver.cancel()


async def test_request_by_prefix_uses_the_loaded_instance(env: Env) -> None:
    first = await env.scheduler.acquire("smollm2-135m-instruct")
    env.scheduler.release(first)
    lease = await asyncio.wait_for(env.scheduler.acquire("smol"), 1)  # a prefix must not spin or reload
    assert lease.instance is first.instance and len(env.workers.loads) == 1
    env.scheduler.release(lease)
    entry, n_ctx, loaded = await env.scheduler.target("smol")
    assert (entry.key, loaded) == ("smollm2-135m-instruct", True)


async def test_parallel_requests_run_at_once_and_those_the_worker_holds_for_room_show_as_queued(env: Env) -> None:
    inst = await env.scheduler.load("alpha", parallel=3)
    assert inst.parallel == 3 and inst.worker is not None and inst.worker.parallel == 3
    leases = [await env.scheduler.acquire("alpha") for _ in range(3)]  # three slots: nobody waits
    waiting = asyncio.ensure_future(env.scheduler.acquire("alpha"))
    await settle()
    view = env.scheduler.view(inst)
    assert (view.in_flight, view.queued, view.status) == (3, 1, "busy")
    inst.worker.held_for_room = 1  # type: ignore[attr-defined]  # the worker's KV cache has room for two of them
    view = env.scheduler.view(inst)
    assert (view.in_flight, view.queued, view.parallel) == (2, 2, 3)
    inst.worker.held_for_room = 0  # type: ignore[attr-defined]
    env.scheduler.release(leases[0])
    assert (await waiting).instance is inst
    with pytest.raises(InvalidArgument):
        await env.scheduler.load("beta", parallel=65)
