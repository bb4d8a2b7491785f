"""CLI start-up: `lms ps` (and `lms --help`, a completion request) against `python -c 'import typer, grpc'`, the
floor any Typer + gRPC CLI pays. Completion and `lms ps` run on every Tab or prompt, so their start-up is what a
user feels. Interleaved runs against one running daemon (its own LMS_HOME); medians; ratios printed.

Run: python bench/bench_cli.py [--runs N] (also in `make bench`). Target (issue 10): lms ps <= 1.5x the floor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def timed(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="lms-bench-cli-", dir="/tmp"))
    env = {**os.environ, "LMS_HOME": str(home)}
    lms = str(BIN / "lms")
    contenders = {
        "python -c 'import typer, grpc'": [sys.executable, "-c", "import typer, grpc"],
        "lms ps": [lms, "ps"],
        "lms --help": [lms, "--help"],
        "completion of `lms load `": [lms],
    }
    completion_env = {**env, "_LMS_COMPLETE": "complete_bash", "COMP_WORDS": "lms load ", "COMP_CWORD": "2"}
    subprocess.run([lms, "daemon", "up"], env=env, check=True, capture_output=True)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    try:
        for _ in range(args.runs):
            for name, cmd in contenders.items():
                times[name].append(timed(cmd, completion_env if name.startswith("completion") else env))
    finally:
        subprocess.run([lms, "daemon", "down"], env=env, capture_output=True)
    floor = statistics.median(times["python -c 'import typer, grpc'"])
    print(f"CLI start-up, median of {args.runs} interleaved runs, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    for name, values in times.items():
        m = statistics.median(values)
        print(f"  {name:34} {m * 1000:7.0f} ms   {m / floor:5.2f}x")


if __name__ == "__main__":
    main()
