"""The models folder at 50 and at 500 models: listing and resolving, side by side, in one run.

Each folder holds hard links of one real GGUF (SmolLM2-135M-Instruct Q4_1, 98 MB, a 49k-token vocabulary)
spread over 50 publishers (`pubNN/repoNNN/mNNN-smollm2.Q4_1.gguf`), the shape of an LM Studio folder. Hard links
share their data, so the page cache holds the headers after the first read, as it would on a daemon restart; the
header reader still parses every file (no cache is keyed by inode).

Measures, for 50 and for 500 models, and their ratio:
  - first listing, no cache file: the daemon's catalog is started (the index built in the background) and
    `scan()` returns once every header is read. Target for 500: 2 s or less. Its CPU time (all threads) is shown
    too: on a shared machine the wall time also counts the others' work.
  - first request during that cold start: `resolve(exact key)` right after `start()`, no cache file. It waits for
    the walk of names and reads its own header, not the others'.
  - listing after a restart: a new catalog started with the cache file the first listing wrote.
  - listing once indexed: `scan()` of a built index (what `lms ls` costs the daemon).
  - resolve by exact key, and by a unique prefix, on the built index (median of many calls). Target: the same at
    50 and at 500.
  - the same two lookups without the index (a catalog not started walks the folder on every call: what every
    request cost before the index).

Run: python bench/bench_catalog.py [--models 500] [--rounds 3] [--source FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmsd.catalog import Catalog  # noqa: E402 - after the path is set

SOURCE = Path.home() / ".cache/lms-dev/test-assets/models/HuggingFaceTB/SmolLM2-135M-Instruct-GGUF" \
    / "SmolLM2-135M-Instruct.Q4_1.gguf"
PUBLISHERS = 50


def build_folder(root: Path, source: Path, count: int) -> Path:
    """count links of source under PUBLISHERS publishers; hard links where the file system allows, else symlinks."""
    models = root / f"models-{count}"
    for i in range(count):
        dest = models / f"pub{i % PUBLISHERS:02d}" / f"repo{i:03d}" / f"m{i:03d}-smollm2.Q4_1.gguf"
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, dest)
        except OSError:
            os.symlink(source, dest)
    return models


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def per_call(fn: Callable[[], object], calls: int) -> float:
    """Median seconds per call over `calls` calls, in batches (the clock costs as much as a dictionary lookup)."""
    batch = 50
    samples = []
    for _ in range(max(1, calls // batch)):
        started = time.perf_counter()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter() - started) / batch)
    return statistics.median(samples)


def cold_listing(models: Path, cache: Path) -> tuple[float, float, int]:
    """Wall and CPU seconds (of every thread: the machine may be busy with others) of the first listing."""
    cache.unlink(missing_ok=True)
    catalog = Catalog(models, cache)
    try:
        started, cpu = time.perf_counter(), time.process_time()
        catalog.start()
        entries = catalog.scan()
        return time.perf_counter() - started, time.process_time() - cpu, len(entries)
    finally:
        catalog.stop()


def first_request(models: Path, cache: Path, key: str) -> float:
    cache.unlink(missing_ok=True)
    catalog = Catalog(models, cache)
    try:
        started = time.perf_counter()
        catalog.start()
        entry = catalog.resolve(key)
        took = time.perf_counter() - started
        assert entry.key == key and entry.arch == "llama", entry
        return took
    finally:
        catalog.stop()


def restart_listing(models: Path, cache: Path) -> float:
    catalog = Catalog(models, cache)
    try:
        started = time.perf_counter()
        catalog.start()
        catalog.scan()
        return time.perf_counter() - started
    finally:
        catalog.stop()


def measure(models: Path, count: int, calls: int, rounds: int) -> dict[str, float]:
    """Each start-up measure is the median of `rounds` runs; each lookup, the median of batches of calls."""
    cache = models.parent / f"catalog-{count}.json"
    key, prefix = f"m{count - 1:03d}-smollm2", f"m{count - 1:03d}-smol"
    runs: dict[str, list[float]] = {"first request, cold start": [], "first listing, no cache": [],
                                    "  its CPU time (all threads)": [], "listing after a restart": []}
    for _ in range(rounds):
        runs["first request, cold start"].append(first_request(models, cache, key))
        took, cpu, listed = cold_listing(models, cache)
        assert listed == count, (listed, count)
        runs["first listing, no cache"].append(took)
        runs["  its CPU time (all threads)"].append(cpu)
        runs["listing after a restart"].append(restart_listing(models, cache))
    out = {name: statistics.median(times) for name, times in runs.items()}
    catalog = Catalog(models, cache)
    try:
        catalog.start()
        out["listing once indexed"] = per_call(catalog.scan, 200)
        assert catalog.resolve(key).key == key and catalog.resolve(prefix).key == key
        out["resolve exact key"] = per_call(lambda: catalog.resolve(key), calls)
        out["resolve unique prefix"] = per_call(lambda: catalog.resolve(prefix), calls)
    finally:
        catalog.stop()
    unindexed = Catalog(models, cache)  # not started: walks and stats the folder on every call
    out["exact key, folder walked per call"] = per_call(lambda: unindexed.resolve(key), 100)
    out["prefix, folder walked per call"] = per_call(lambda: unindexed.resolve(prefix), 100)
    return out


def fmt(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.1f} µs"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=500, help="the large folder's size (the small one is 50)")
    parser.add_argument("--source", type=Path, default=SOURCE, help="the GGUF file to link")
    parser.add_argument("--calls", type=int, default=5000, help="calls per resolve measure")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each start-up measure (the median is shown)")
    args = parser.parse_args()
    if not args.source.is_file():
        print(f"no {args.source}: run `make demo` or the tests once to fetch SmolLM2", file=sys.stderr)
        return 1
    # Next to the source, so hard links work (they cannot cross file systems).
    tmp = Path(tempfile.mkdtemp(prefix="bench-catalog-", dir=args.source.parent.parent.parent))
    try:
        sizes = (PUBLISHERS, args.models)
        load = os.getloadavg()[0]
        results = {n: measure(build_folder(tmp, args.source, n), n, args.calls, args.rounds) for n in sizes}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    small, large = sizes
    print(f"models folder: {large} hard links of {args.source.name} under {PUBLISHERS} publishers "
          f"({os.cpu_count()} CPUs, load average {load:.1f} -> {os.getloadavg()[0]:.1f}; medians of {args.rounds})")
    print(f"{'':36} {f'{small} models':>12} {f'{large} models':>12} {f'{large}/{small}':>8}")
    for name in results[small]:
        a, b = results[small][name], results[large][name]
        print(f"{name:36} {fmt(a):>12} {fmt(b):>12} {b / a:>7.1f}x")
    target = results[large]["first listing, no cache"]
    print(f"first listing of {large}: {fmt(target)} (target 2 s); per header {fmt(target / large)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
