"""The memory estimate against real llama.cpp: a real worker loads a model, serves requests, and its resident
memory is measured. The estimate must never be below it (a budget built on it must not let the OOM killer in) and
not absurdly above it (or it would refuse loads that fit).

Run with -s to see the table for docs: measured RSS after load, after a short request, after a prompt that fills
the context (which touches the worst-case compute buffer and the whole KV cache), the peak (VmHWM), and the
estimate by part.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lmsd.catalog import Catalog, ModelEntry
from lmsd.memory import WORKER_BASE, MiB, estimate
from lmsd.worker.handle import WorkerProcess


def peak_rss(pid: int) -> int:
    """The process's high-water mark of resident memory (VmHWM): what it needed at its worst, not just now."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def entry_of(path: Path, tmp_path: Path) -> ModelEntry:
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    (models / path.name).symlink_to(path)
    (entry,) = Catalog(models).scan()
    assert not entry.error and entry.n_layer and entry.n_vocab, entry
    return entry


async def drain(worker: WorkerProcess, params: dict) -> dict:
    done: dict = {}
    async for ev in worker.generate("completion", params):
        if ev["ev"] == "done":
            done = ev
    return done


def mib(n: int) -> str:
    return f"{n / MiB:7.1f}"


async def test_an_idle_worker_fits_the_overhead(tmp_path: Path) -> None:
    worker = await WorkerProcess.spawn(tmp_path / "workers.log")
    try:
        idle = worker.memory_bytes()
    finally:
        await worker.stop("test over")
    print(f"\nidle worker (python + llama_cpp imported): RSS {mib(idle)} MiB; WORKER_BASE {mib(WORKER_BASE)} MiB")
    assert 0 < idle <= WORKER_BASE


# A short prompt that still has a prefix to reuse (a single-token prompt has none: its last token is always read)
SHORT = {"prompt": "Hello there, tell me a story about a cat.", "max_tokens": 4, "temperature": 0, "ignore_eos": True}

@pytest.mark.smollm2
@pytest.mark.parametrize("n_ctx", [512, 4096])
@pytest.mark.parametrize("model", ["tiny_file", "smollm2_file"])
async def test_estimate_covers_what_llama_cpp_really_takes(model: str, n_ctx: int, tmp_path: Path,
                                                           request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(model)
    entry = entry_of(path, tmp_path)
    est = estimate(entry, n_ctx, parallel=2)
    worker = await WorkerProcess.spawn(tmp_path / "workers.log")
    try:
        idle = worker.memory_bytes()
        assert await worker.load(str(path), n_ctx, lambda f: None, parallel=2) == n_ctx
        loaded = worker.memory_bytes()
        short = await drain(worker, SHORT)
        assert short["completion_tokens"] >= 1
        after_short = worker.memory_bytes()
        # A prompt that fills most of the context: full micro-batches of 512 tokens against a long KV cache, the
        # graph llama.cpp sized its compute buffer for. " hello" is one token in SmolLM2's vocabulary.
        full = await drain(worker, {"prompt": " hello" * (n_ctx - 64), "max_tokens": 8, "temperature": 0})
        assert full["prompt_tokens"] > n_ctx * 3 // 4, full
        after_full = worker.memory_bytes()
        # The short prompt again: it goes on in its own slot, and the long one's idle cells move to RAM meanwhile.
        again = await drain(worker, SHORT)
        assert again["prompt_cached_tokens"] >= 1, again
        parked = worker.memory_bytes()
        peak = peak_rss(worker.pid)
    except BaseException:
        log = tmp_path / "workers.log"
        print(log.read_text(errors="replace")[-5000:] if log.exists() else "(no worker log)")
        raise
    finally:
        await worker.stop("test over")
    measured = max(loaded, after_short, after_full, parked, peak)
    print(
        f"\n{entry.key:24} n_ctx {n_ctx:5}  RSS MiB: idle {mib(idle)} loaded {mib(loaded)} "
        f"short {mib(after_short)} full {mib(after_full)} parked {mib(parked)} peak {mib(peak)}  |  "
        f"estimate {mib(est.total)} = weights {mib(est.weights)} + kv {mib(est.kv_cache)} + compute {mib(est.compute)} "
        f"+ overhead {mib(est.overhead)} + prompt cache {mib(est.prompt_cache)}  |  "
        f"ratio {est.total / measured:.2f}"
    )
    assert est.total >= measured, "the estimate is below what the worker really took"
    assert est.total <= 3 * measured + 64 * MiB, "the estimate is absurdly above what the worker took"
