"""The lifecycle under pressure, with fake workers and the injected clock: interrupted unloads, graces, evictions
of loads in progress, memory first, timers that never block, slots that follow the worker, FIFO swaps, the memory
budget, max_loaded_models, load timeouts and max_wait."""

from __future__ import annotations

import asyncio

import pytest

from lmsd.errors import InsufficientMemory, LoadKilled, ResourceExhausted, Unavailable, WaitExceeded
from lmsd.scheduler import Lease
from tests.unit.conftest import GB, Env


async def settle() -> None:
    for _ in range(30):
        await asyncio.sleep(0)


def ids(env: Env) -> list[str]:
    return sorted(i.identifier for i in env.scheduler.instances())


def status(env: Env, identifier: str) -> str:
    return next(v.status for v in env.scheduler.list_loaded() if v.identifier == identifier)


async def test_cancelled_unload_still_runs_to_its_end(env: Env) -> None:
    """Defect 1: Ctrl-C on `lms unload` during the drain must not leave the instance stuck in `unloading`."""
    await env.scheduler.load("alpha")
    lease = await env.scheduler.acquire("alpha")
    unload = asyncio.create_task(env.scheduler.unload("alpha", grace=None))
    await settle()
    unload.cancel()
    await settle()
    assert status(env, "alpha") == "unloading"
    env.scheduler.release(lease)
    await settle()
    assert ids(env) == [] and env.workers.workers[0].reaped
    again = await env.scheduler.acquire("alpha")  # and the model can be used again
    env.scheduler.release(again)


async def test_evicting_request_that_goes_away_does_not_strand_the_victim(env: Env) -> None:
    """Defect 1 via JIT: the request for beta that evicts a busy alpha disconnects. Alpha is not left stuck in
    `unloading`: nobody needs its room any more, so it is kept and serves again; beta's load never happens."""
    a = await env.scheduler.acquire("alpha")
    b = asyncio.create_task(env.scheduler.acquire("beta"))
    await settle()
    assert status(env, "alpha") == "unloading"
    b.cancel()
    await settle()
    assert status(env, "alpha") == "busy"  # kept, still running its request
    again = asyncio.create_task(env.scheduler.acquire("alpha"))
    env.scheduler.release(a)
    lease = await again
    assert lease.instance is a.instance and env.workers.loads == ["/models/alpha.gguf"]
    env.scheduler.release(lease)
    beta = await env.scheduler.acquire("beta")  # and a later swap works as usual
    assert ids(env) == ["beta"]
    env.scheduler.release(beta)


async def test_shortest_grace_wins_over_an_eviction_drain(env: Env) -> None:
    """Defect 2: an eviction drain has no limit; `lms unload --grace 1` on it still ends it after 1 s."""
    a = await env.scheduler.acquire("alpha")
    stream = a.worker.generate("chat", {})
    b = asyncio.create_task(env.scheduler.acquire("beta"))
    await settle()
    assert status(env, "alpha") == "unloading"
    unload = asyncio.create_task(env.scheduler.unload("alpha", grace=1))
    await settle()
    env.clock.advance(1)
    await env.scheduler.tick()
    await unload
    assert stream.ended.done()  # the running request ended with the worker
    lease = await b
    assert lease.instance.identifier == "beta"
    env.scheduler.release(lease)


async def test_shutdown_grace_applies_to_a_ttl_or_eviction_drain(env: Env) -> None:
    a = await env.scheduler.acquire("alpha")
    asyncio.create_task(env.scheduler.acquire("beta"))
    await settle()
    shutdown = asyncio.create_task(env.scheduler.shutdown(grace=2))
    await settle()
    assert not shutdown.done()
    env.clock.advance(2)
    await env.scheduler.tick()
    await asyncio.wait_for(shutdown, 1)
    assert ids(env) == [] and not env.workers.running
    env.scheduler.release(a)


async def test_eviction_lets_a_load_in_progress_finish_and_serve_its_requests(env: Env) -> None:
    """Defect 3: a request for beta must not kill alpha's load; alpha's waiting requests are served first."""
    gate = env.workers.gates["/models/alpha.gguf"] = asyncio.Event()
    a1 = asyncio.create_task(env.scheduler.acquire("alpha"))
    a2 = asyncio.create_task(env.scheduler.acquire("alpha"))
    await settle()
    b = asyncio.create_task(env.scheduler.acquire("beta"))
    await settle()
    assert status(env, "alpha") == "unloading" and env.workers.workers[0].stopped is None
    gate.set()
    first: Lease = await a1
    assert first.instance.identifier == "alpha"
    env.scheduler.release(first)
    second: Lease = await a2
    env.scheduler.release(second)
    beta = await b
    assert beta.instance.identifier == "beta" and ids(env) == ["beta"]
    env.scheduler.release(beta)


async def test_next_load_starts_only_after_the_evicted_process_is_reaped(env: Env) -> None:
    """Defect 4: memory first."""
    env.scheduler.release(await env.scheduler.acquire("alpha"))
    env.workers.stop_gate = asyncio.Event()
    b = asyncio.create_task(env.scheduler.acquire("beta"))
    await settle()
    assert env.workers.loads == ["/models/alpha.gguf"]  # alpha's process has not exited yet
    assert status(env, "alpha") == "unloading"
    env.workers.stop_gate.set()
    lease = await b
    assert env.workers.workers[0].reaped and len(env.workers.loads) == 2
    env.scheduler.release(lease)


async def test_tick_never_waits_for_an_unload(env: Env) -> None:
    """Defect 5: the TTL driver must not block on a slow process exit."""
    await env.scheduler.load("alpha", ttl=10)
    await env.scheduler.load("beta", ttl=20)
    env.workers.stop_gate = asyncio.Event()
    env.clock.advance(10)
    assert await asyncio.wait_for(env.scheduler.tick(), 0.5) == ["alpha"]
    env.clock.advance(10)
    assert await asyncio.wait_for(env.scheduler.tick(), 0.5) == ["beta"]
    env.workers.stop_gate.set()
    await settle()
    assert ids(env) == []


async def test_request_arriving_as_its_model_expires_reloads_it(env: Env) -> None:
    """Defect 5: an expiry and a request in the same instant: the request is served, never failed."""
    env.settings.default_ttl = 5
    env.scheduler.release(await env.scheduler.acquire("alpha"))
    env.workers.stop_gate = asyncio.Event()
    env.clock.advance(5)
    await env.scheduler.tick()
    request = asyncio.create_task(env.scheduler.acquire("alpha"))
    await settle()
    assert not request.done()
    env.workers.stop_gate.set()
    lease = await request
    assert lease.instance.identifier == "alpha" and len(env.workers.loads) == 2
    env.scheduler.release(lease)


async def test_slot_is_given_back_when_the_worker_ends_the_request(env: Env) -> None:
    """Defect 6: a client that leaves during prompt processing frees its slot only when the worker is done."""
    env.settings.default_ttl = 5
    env.workers.slow_cancel = True
    lease = await env.scheduler.acquire("alpha")
    stream = lease.worker.generate("chat", {})
    await stream.aclose()  # the client disconnected; the worker is still processing the prompt
    env.scheduler.release(lease, until=stream.ended)
    view = env.scheduler.list_loaded()[0]
    assert (view.in_flight, view.status) == (1, "busy")
    queued = asyncio.create_task(env.scheduler.acquire("alpha"))
    await settle()
    assert not queued.done()  # the next request waits for the worker, not for the client
    env.clock.advance(100)
    assert await env.scheduler.tick() == []  # a working model never expires
    stream.finish()
    second = await queued
    env.scheduler.release(second)
    assert status(env, "alpha") == "idle"


async def test_swaps_go_in_arrival_order_and_serve_everyone_waiting(env: Env) -> None:
    """Two clients alternating two models with auto-evict: every request served, in arrival order, one swap per
    batch of requests waiting for the incoming model."""
    first = await env.scheduler.acquire("alpha")
    order: list[str] = []

    async def request(model: str) -> None:
        lease = await env.scheduler.acquire(model)
        order.append(model)
        await asyncio.sleep(0)
        env.scheduler.release(lease)

    tasks = [asyncio.create_task(request(m)) for m in ("beta", "alpha", "beta", "alpha", "gamma", "beta")]
    await settle()
    env.scheduler.release(first)
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert order == ["beta", "beta", "beta", "alpha", "alpha", "gamma"]
    loads = [p.split("/")[-1] for p in env.workers.loads]
    assert loads == ["alpha.gguf", "beta.gguf", "alpha.gguf", "gamma.gguf"]


async def test_alternating_clients_never_get_errors(env: Env) -> None:
    failures: list[BaseException] = []

    async def client(models: list[str]) -> None:
        for n in range(20):
            try:
                lease = await env.scheduler.acquire(models[n % 2])
            except Exception as exc:  # noqa: BLE001
                failures.append(exc)
                continue
            await asyncio.sleep(0)
            env.scheduler.release(lease)

    await asyncio.wait_for(asyncio.gather(client(["alpha", "beta"]), client(["beta", "alpha"])), 5)
    assert failures == []


async def test_memory_budget_evicts_least_recently_used_jit_instance(env: Env) -> None:
    env.settings.auto_evict = False
    env.settings.memory_limit = int(2.5 * GB)
    for name in ("alpha", "beta"):
        env.scheduler.release(await env.scheduler.acquire(name))
        env.clock.advance(1)
    env.scheduler.release(await env.scheduler.acquire("alpha"))  # alpha is now the most recently used
    env.clock.advance(1)
    lease = await env.scheduler.acquire("gamma")
    assert ids(env) == ["alpha", "gamma"]
    assert sum(i.estimate for i in env.scheduler.instances()) <= env.settings.memory_limit
    env.scheduler.release(lease)


async def test_manual_load_that_cannot_fit_is_refused_with_the_numbers(env: Env) -> None:
    env.settings.memory_limit = int(2.5 * GB)
    await env.scheduler.load("alpha")
    await env.scheduler.load("beta")
    with pytest.raises(InsufficientMemory, match=r"needs an estimated 1\.\d+ GB.*budget is 2\.\d+ GB.*alpha.*beta"):
        await env.scheduler.load("gamma")
    # A JIT request is refused the same way (HTTP 503 insufficient_memory), and nothing was evicted.
    with pytest.raises(InsufficientMemory):
        await env.scheduler.acquire("gamma")
    assert ids(env) == ["alpha", "beta"]
    env.sizes["gamma"] = 4 * GB
    env.settings.memory_limit = "off"
    await env.scheduler.load("gamma")  # no budget: anything goes


async def test_a_model_larger_than_the_budget_alone_is_refused(env: Env) -> None:
    env.settings.memory_limit = GB
    env.sizes["alpha"] = 2 * GB
    with pytest.raises(InsufficientMemory):
        await env.scheduler.acquire("alpha")
    assert ids(env) == [] and env.workers.loads == []


async def test_auto_budget_is_what_the_system_has_available(env: Env) -> None:
    env.settings.auto_evict = False
    env.available = 3 * GB  # minus the safety margin, room for one 1 GB model and a bit
    lease = await env.scheduler.acquire("alpha")
    env.available = GB // 2
    with pytest.raises(InsufficientMemory):
        await env.scheduler.load("beta")
    env.scheduler.release(lease)
    env.settings.memory_limit = "off"
    await env.scheduler.load("beta")


async def test_max_loaded_evicts_lru_jit_and_refuses_when_only_manual_are_left(env: Env) -> None:
    env.settings.auto_evict = False
    env.settings.max_loaded_models = 2
    env.scheduler.release(await env.scheduler.acquire("alpha"))
    env.clock.advance(1)
    env.scheduler.release(await env.scheduler.acquire("beta"))
    env.clock.advance(1)
    await env.scheduler.load("gamma")  # a manual load at the limit evicts the LRU JIT instance
    assert ids(env) == ["beta", "gamma"]
    await env.scheduler.load("alpha")  # and the next one evicts beta
    assert ids(env) == ["alpha", "gamma"]
    with pytest.raises(ResourceExhausted, match="max_loaded_models is 2.*alpha, gamma"):
        await env.scheduler.load("beta")
    with pytest.raises(ResourceExhausted):
        await env.scheduler.acquire("beta")


async def test_load_without_progress_is_killed_and_shown_until_the_next_request(env: Env) -> None:
    env.settings.load_timeout = 30
    env.workers.gates["/models/alpha.gguf"] = asyncio.Event()  # never set: a stuck load
    request = asyncio.create_task(env.scheduler.acquire("alpha"))
    await settle()
    env.clock.advance(30)
    await env.scheduler.tick()
    with pytest.raises(LoadKilled, match="no progress for 30 s"):
        await request
    await settle()
    view = env.scheduler.list_loaded()
    assert [(v.identifier, v.status) for v in view] == [("alpha", "failed")] and "no progress" in view[0].message
    assert not env.workers.running
    [stuck] = [w for w in env.workers.workers if w.stopped and "no progress" in w.stopped]
    assert stuck.killed  # a stuck worker is not asked to exit (it could not read it): killed
    del env.workers.gates["/models/alpha.gguf"]
    lease = await env.scheduler.acquire("alpha")
    assert [v.status for v in env.scheduler.list_loaded()] == ["busy"]
    env.scheduler.release(lease)


async def test_request_waiting_past_max_wait_is_refused_and_leaves_no_trace(env: Env) -> None:
    env.settings.max_wait = 60
    a = await env.scheduler.acquire("alpha")
    queued = asyncio.create_task(env.scheduler.acquire("alpha"))
    swap = asyncio.create_task(env.scheduler.acquire("beta"))
    await settle()
    env.clock.advance(60)
    await env.scheduler.tick()
    for task in (queued, swap):
        with pytest.raises(WaitExceeded, match="max_wait"):
            await task
    env.scheduler.release(a)
    await settle()
    assert status(env, "alpha") == "idle"  # the swap that would have evicted it was given up: alpha stays
    assert env.workers.loads == ["/models/alpha.gguf"]


async def test_manual_unload_of_a_loading_instance_stops_the_load_and_its_riders_hear_why(env: Env) -> None:
    env.workers.gate = asyncio.Event()
    request = asyncio.create_task(env.scheduler.acquire("alpha"))
    await settle()
    await env.scheduler.unload("alpha", grace=10)
    with pytest.raises(Unavailable, match="unloaded while loading"):
        await request
    assert ids(env) == [] and [v.status for v in env.scheduler.list_loaded()] == []  # no "failed" record


async def test_estimate_only_reports_fit_without_loading(env: Env) -> None:
    env.settings.memory_limit = int(1.5 * GB)
    est = await env.scheduler.estimate_load("alpha", 2048)
    assert (est.model, est.context_length, est.estimated_memory_bytes, est.fits) == ("alpha", 2048, GB, True)
    await env.scheduler.load("alpha")
    est = await env.scheduler.estimate_load("beta")
    assert not est.fits and "memory budget" in est.detail
    assert env.workers.loads == ["/models/alpha.gguf"]


async def test_measured_memory_corrects_the_estimate(env: Env) -> None:
    env.workers.rss = 3 * GB  # reality is larger than the 1 GB estimate
    inst = await env.scheduler.load("alpha")
    assert inst.estimate == 3 * GB
    await env.scheduler.unload("alpha")
    env.workers.rss = 1
    assert (await env.scheduler.estimate_load("alpha")).estimated_memory_bytes == 3 * GB


async def test_measured_memory_survives_a_restart(env: Env, tmp_path: object) -> None:
    from pathlib import Path

    from lmsd.memory import Measurements
    from lmsd.scheduler import Scheduler

    path = Path(str(tmp_path)) / "memory.json"
    env.scheduler._measured = Measurements(path)
    env.workers.rss = 3 * GB
    await env.scheduler.load("alpha")
    again = Scheduler(env.catalog, env.workers, lambda: env.settings, estimate=lambda e, c, p: GB,
                      available_memory=lambda: 1 << 50, measurements=Measurements(path))
    assert (await again.estimate_load("alpha")).estimated_memory_bytes == 3 * GB
    path.write_text("{not json")
    assert Measurements(path).get(env.catalog.entries[0], 4096) == 0  # a damaged file is ignored, not fatal


async def test_a_load_evicted_for_a_request_that_left_is_kept_once_loaded(env: Env) -> None:
    gate = env.workers.gates["/models/alpha.gguf"] = asyncio.Event()
    first = asyncio.create_task(env.scheduler.acquire("alpha"))
    await settle()
    beta = asyncio.create_task(env.scheduler.acquire("beta"))
    await settle()
    assert status(env, "alpha") == "unloading"  # evicted while loading
    beta.cancel()  # the client that wanted beta leaves
    await settle()
    gate.set()
    lease = await first
    again = asyncio.create_task(env.scheduler.acquire("alpha"))
    env.scheduler.release(lease)
    second = await again
    assert second.instance is lease.instance and env.workers.loads == ["/models/alpha.gguf"]  # no reload
    env.scheduler.release(second)


async def test_no_load_for_riders_who_all_left_in_the_same_instant(env: Env) -> None:
    a = await env.scheduler.acquire("alpha")
    beta = asyncio.create_task(env.scheduler.acquire("beta"))
    await settle()
    env.scheduler.release(a)  # alpha's drain ends...
    beta.cancel()  # ...as beta's only client leaves
    await settle()
    assert "/models/beta.gguf" not in env.workers.loads
