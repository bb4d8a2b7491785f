"""The scheduler with real worker processes and real llama.cpp: JIT, TTL, eviction and crash handling."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from lmsd.catalog import Catalog
from lmsd.config import Settings
from lmsd.scheduler import Scheduler
from lmsd.worker.handle import WorkerPool
from tests.conftest import pid_alive


def make(models: Path, settings: Settings) -> tuple[Scheduler, WorkerPool]:
    pool = WorkerPool(None)
    return Scheduler(Catalog(models), pool, lambda: settings), pool


async def test_jit_eviction_and_ttl_with_real_workers(tiny_file: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    for name in ("alpha", "beta"):
        (models / name).mkdir(parents=True)
        os.symlink(tiny_file, models / name / f"{name}.F16.gguf")
    settings = Settings(default_ttl=1)
    sched, pool = make(models, settings)
    timer = asyncio.create_task(sched.run_timer())
    try:
        # Six concurrent first requests: one load, one instance.
        leases = await asyncio.gather(*(sched.acquire("alpha") for _ in range(1)))
        sched.max_queue = 10
        more = [asyncio.create_task(sched.acquire("alpha")) for _ in range(5)]
        for lease in leases:
            sched.release(lease)
        for t in more:
            sched.release(await t)
        assert [i.identifier for i in sched.instances()] == ["alpha"]
        alpha_pid = sched.instances()[0].worker.pid  # type: ignore[union-attr]

        # A request for beta evicts alpha (JIT): alpha's process ends.
        lease = await sched.acquire("beta", ttl=1)
        async for _ev in lease.worker.generate("completion", {"prompt": "hi", "max_tokens": 3}):  # type: ignore[attr-defined]
            pass
        sched.release(lease)
        assert [i.identifier for i in sched.instances()] == ["beta"]
        assert not pid_alive(alpha_pid)

        # beta's 1 s TTL runs out on the real clock, driven by the real timer task.
        beta_pid = sched.instances()[0].worker.pid  # type: ignore[union-attr]
        for _ in range(100):
            if not sched.instances():
                break
            await asyncio.sleep(0.05)
        assert sched.instances() == []
        assert not pid_alive(beta_pid)
    finally:
        timer.cancel()
        await sched.shutdown(grace=1)
        await pool.close()


async def test_crashed_worker_leaves_the_table(tiny_file: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    os.symlink(tiny_file, models / "tiny.F16.gguf")
    sched, pool = make(models, Settings())
    try:
        inst = await sched.load("tiny")
        events = sched.subscribe()
        os.kill(inst.worker.pid, signal.SIGKILL)  # type: ignore[union-attr]
        await asyncio.wait_for(inst.gone.wait(), 10)
        assert sched.instances() == []
        ev = await asyncio.wait_for(events.get(), 5)
        assert (ev.kind, ev.identifier) == ("crashed", "tiny")
        # And the scheduler still loads models afterwards.
        again = await sched.load("tiny")
        assert again.identifier == "tiny"
    finally:
        await sched.shutdown(grace=1)
        await pool.close()
