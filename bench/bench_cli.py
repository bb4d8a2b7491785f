"""CLI start-up: `lms ps` (and `lms --help`, a completion request) against `python -c 'import typer, grpc'`, the
floor any Typer + gRPC CLI pays. Completion and `lms ps` run on every Tab or prompt, so their start-up is what a
user feels. Interleaved runs against running daemons (their own LMS_HOME): one with nothing loaded, one with
SmolLM2 loaded when the test cache has it (`lms ps` then draws its table with Rich); medians; ratios printed.

Python's bytecode is written and used, as after `pip install` (which compiles it): with PYTHONDONTWRITEBYTECODE set,
an editable install would compile every lms module from source on each run, which no installed user pays.

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
    base = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env = {**base, "LMS_HOME": tempfile.mkdtemp(prefix="lms-bench-cli-", dir="/tmp")}
    lms = str(BIN / "lms")
    contenders = {
        "python -c 'import typer, grpc'": ([sys.executable, "-c", "import typer, grpc"], env),
        "lms ps": ([lms, "ps"], env),
        "lms --help": ([lms, "--help"], env),
        "completion of `lms load `": ([lms], {**env, "_LMS_COMPLETE": "complete_bash", "COMP_WORDS": "lms load ",
                                              "COMP_CWORD": "2"}),
    }
    homes = [env]
    smollm2 = Path(os.environ.get("LMS_TEST_CACHE", Path.home() / ".cache/lms-dev/test-assets")) / "models"
    if list(smollm2.glob("HuggingFaceTB/*/SmolLM2-135M-Instruct*.gguf")):
        loaded = {**base, "LMS_HOME": tempfile.mkdtemp(prefix="lms-bench-cli-", dir="/tmp"),
                  "LMS_MODELS_DIR": str(smollm2)}
        contenders["lms ps (SmolLM2 loaded: a table)"] = ([lms, "ps"], loaded)
        homes.append(loaded)
    for home in homes:
        subprocess.run([lms, "daemon", "up"], env=home, check=True, capture_output=True)
    if len(homes) > 1:
        subprocess.run([lms, "load", "smollm2-135m-instruct", "--ttl", "1h"], env=homes[1], check=True,
                       capture_output=True)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    try:
        for cmd, cmd_env in contenders.values():
            timed(cmd, cmd_env)  # warm-up: the page cache, and bytecode written where it was not
        for _ in range(args.runs):
            for name, (cmd, cmd_env) in contenders.items():
                times[name].append(timed(cmd, cmd_env))
    finally:
        for home in homes:
            subprocess.run([lms, "daemon", "down"], env=home, capture_output=True)
    floor = statistics.median(times["python -c 'import typer, grpc'"])
    print(f"CLI start-up, median of {args.runs} interleaved runs, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    for name, values in times.items():
        m = statistics.median(values)
        print(f"  {name:34} {m * 1000:7.0f} ms   {m / floor:5.2f}x")


if __name__ == "__main__":
    main()
