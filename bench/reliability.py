"""`make stress`: the slow tier (tests/slow) at full size, and its figures written into docs/reliability.md.

The same tests run in CI at smaller sizes (`make test`); here: load 40 clients for 60 s, soak 200 load/unload
cycles and 1,000 requests, schemathesis with 100 examples per operation, and every fault. Each test saves its
figures as JSON (tests/support/stress.py: write_figures); this script runs them, then replaces the block
between the `figures` markers in docs/reliability.md. Exits non-zero when a test failed (the figures of the
tests that passed are still written, marked with the failure).

Run: python bench/reliability.py [--quick]   (--quick: the CI sizes, for trying the script itself)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"
FULL = {"LMS_LOAD_CLIENTS": "40", "LMS_LOAD_SECONDS": "60", "LMS_SOAK_CYCLES": "200", "LMS_SOAK_REQUESTS": "1000",
        "LMS_FUZZ_EXAMPLES": "100"}
QUICK = {"LMS_LOAD_CLIENTS": "20", "LMS_LOAD_SECONDS": "20", "LMS_SOAK_CYCLES": "50", "LMS_SOAK_REQUESTS": "200",
         "LMS_FUZZ_EXAMPLES": "25"}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def render(figures: dict[str, dict[str, Any]], sizes: dict[str, str], outcome: str, seconds: float) -> str:
    load, soak, fuzz = figures.get("load"), figures.get("soak"), figures.get("fuzz")
    faults = figures.get("faults", {})
    command = "make stress" if sizes == FULL else "python bench/reliability.py --quick"
    lines = [
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}: {os.cpu_count()} CPUs ({cpu_model()}), "
        f"Python {platform.python_version()}, {seconds / 60:.0f} minutes. Outcome of the tests: **{outcome}**.",
        "",
        "| run | size | figures |",
        "|---|---|---|",
    ]
    if load:
        lines.append(
            f"| load | {load['clients']} clients (half streaming), {load['seconds']:g} s, 3 models, auto-evict on | "
            f"{load['sent']} requests: {load['served']} served, {load['refused']} refused (429/503, "
            f"{load['refused_with_retry_after']} with Retry-After), {load['failed']} failed; latency p50 "
            f"{load['p50']:.2f} s, p99 {load['p99']:.2f} s, max {load['max_latency']:.2f} s; {load['swaps']} swaps; "
            f"at most {load['most_instances_of_one_model']} instance of a model; {load['zombies']} zombies, "
            f"{load['orphans']} orphans |")
    if soak:
        first, last = soak["first"], soak["last"]
        lines.append(
            f"| soak | {soak['cycles']} load/unload cycles, {soak['requests']} requests | daemon RSS "
            f"{first['rss_mb']} MB → {last['rss_mb']} MB, open files {first['fds']} → {last['fds']}, threads "
            f"{first['threads']} → {last['threads']}; {soak['served']} served, {soak['failed']} failed; "
            f"{soak['distinct_worker_pids']} worker processes; {soak['zombies']} zombies, {soak['orphans']} orphans; "
            f"{soak['seconds']:.0f} s |")
    if fuzz:
        lines.append(
            f"| fuzz | schemathesis, {fuzz['examples_per_operation']} examples per operation, positive and negative "
            f"| {fuzz['cases']} cases, {fuzz['failures']} failures (no 5xx, no hang, every error in OpenAI's shape) |")
    for name, value in sorted(faults.items()):
        lines.append(f"| fault | {name} | {value} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the CI sizes")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="lms-figures-") as out:
        env = {**os.environ, **sizes, "LMS_FIGURES_DIR": out}
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "pytest", "tests/slow", "-p", "no:cacheprovider", "-q", "-s"],
                              cwd=ROOT, env=env)
        seconds = time.monotonic() - started
        figures: dict[str, dict[str, Any]] = {}
        for path in sorted(Path(out).glob("*.json")):
            data = json.loads(path.read_text())
            if path.stem.startswith("fault-"):
                figures.setdefault("faults", {})[data["name"]] = data["result"]
            else:
                figures[path.stem] = data
    outcome = "all passed" if proc.returncode == 0 else f"FAILED (pytest exit {proc.returncode})"
    block = render(figures, sizes, outcome, seconds)
    text = DOC.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")
    print(f"\n{block}\n\nwritten to {DOC.relative_to(ROOT)}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
