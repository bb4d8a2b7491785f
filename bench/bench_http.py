"""Side-by-side benchmark, one run, same model, prompt and token count:

  streaming decode tokens/s and time to first token
    - through lmsd's HTTP endpoint (/v1/completions, SSE, measured at the client)
    - in-process llama-cpp-python (create_completion(stream=True))
    - llama-cpp-python's own server (python -m llama_cpp.server), when it is installed
  cold start: the first request to an unloaded model (JIT load + first token) versus a bare Llama() load
  plus its first token in-process.

Prints a table of medians and ratios (lms / in-process). Run: `make bench` (or python bench/bench_http.py).
Uses its own LMS_HOME under /tmp; the model is SmolLM2-135M-Instruct from the test-asset cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
MODEL_KEY = "smollm2-135m-instruct"
N_CTX = 4096


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def physical_cores() -> int:
    import psutil

    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)


class Timing:
    """Times of a streamed generation: request sent, first token, every token."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.token_times: list[float] = []

    def token(self) -> None:
        self.token_times.append(time.perf_counter())

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def decode_tps(self) -> float:
        """Tokens per second after the first token (prompt processing excluded)."""
        if len(self.token_times) < 2:
            return 0.0
        return (len(self.token_times) - 1) / (self.token_times[-1] - self.token_times[0])


def sse_tokens(client: httpx.Client, url: str, body: dict[str, Any]) -> Iterator[None]:
    with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                yield None


def measure_http(base: str, model: str, tokens: int, extra: dict[str, Any]) -> Timing:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True, **extra}
    with httpx.Client(timeout=300) as client:
        t = Timing()
        for _ in sse_tokens(client, base + "/v1/completions", body):
            t.token()
    return t


def measure_inprocess(llm: Any, tokens: int) -> Timing:
    t = Timing()
    for chunk in llm.create_completion(PROMPT, max_tokens=tokens, temperature=0, stream=True,
                                       logit_bias={llm.token_eos(): -1e9}):
        if chunk["choices"][0]["text"]:
            t.token()
    return t


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def lms(home: Path, *args: str) -> str:
    env = {**os.environ, "LMS_HOME": str(home)}
    exe = Path(sys.executable).parent / "lms"
    return subprocess.run([str(exe), *args], env=env, check=True, capture_output=True, text=True).stdout


def start_llama_cpp_server(model: Path, port: int) -> subprocess.Popen[bytes] | None:
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError:
        return None
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--port", str(port), "--n_ctx", str(N_CTX),
         "--n_threads", str(physical_cores()), "--n_threads_batch", str(os.cpu_count() or 1)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (the median is reported)")
    args = parser.parse_args()

    from lmscli.fetch import SOURCES
    from tests.conftest import test_cache

    model = SOURCES[MODEL_KEY].fetch(test_cache() / "models")
    home = Path(tempfile.mkdtemp(prefix="lms-bench-", dir="/tmp"))
    (home / "models" / "bench").mkdir(parents=True)
    os.symlink(model, home / "models" / "bench" / model.name)
    port = free_port()
    timings: dict[str, list[Timing]] = {}
    cold_runs: dict[str, list[float]] = {"lms JIT first request": [], "bare Llama() + first token": []}
    server: subprocess.Popen[bytes] | None = None
    try:
        import llama_cpp

        lms(home, "daemon", "up")
        lms(home, "server", "start", "--port", str(port))
        base = f"http://127.0.0.1:{port}"
        extra = {"ignore_eos": True}

        # Cold start, interleaved: each JIT request comes to an idle daemon (as the first request after a TTL
        # expiry does); the pause lets the daemon's spare worker finish starting, which is the point of it.
        for _ in range(args.runs):
            time.sleep(7)
            cold_runs["lms JIT first request"].append(measure_http(base, MODEL_KEY, 1, extra).ttft)
            lms(home, "unload", "--all")
            started = time.perf_counter()
            cold_llm = llama_cpp.Llama(str(model), n_ctx=N_CTX, n_threads=physical_cores(),
                                       n_threads_batch=os.cpu_count() or 1, verbose=False)
            next(iter(cold_llm.create_completion(PROMPT, max_tokens=1, stream=True)))
            cold_runs["bare Llama() + first token"].append(time.perf_counter() - started)
            cold_llm.close()

        # Warm streaming: every contender loaded at once (idle ones cost no CPU) and measured round-robin, so
        # the machine's ups and downs fall on all of them alike.
        warm = llama_cpp.Llama(str(model), n_ctx=N_CTX, n_threads=physical_cores(),
                               n_threads_batch=os.cpu_count() or 1, verbose=False)
        contenders: dict[str, Callable[[], Timing]] = {
            "lms HTTP (SSE)": lambda: measure_http(base, MODEL_KEY, args.tokens, extra),
            "in-process llama-cpp-python": lambda: measure_inprocess(warm, args.tokens),
        }
        other_port = free_port()
        server = start_llama_cpp_server(model, other_port)
        if server is not None:
            other = f"http://127.0.0.1:{other_port}"
            bias = {"logit_bias": {"2": -1e9}}  # SmolLM2's EOS id, as ignore_eos does
            contenders["llama_cpp.server (SSE)"] = lambda: measure_http(other, "x", args.tokens, bias)
        for run in contenders.values():
            run()  # warm-up: loads the model (JIT for lms), fills caches
        for _ in range(args.runs):
            for name, run in contenders.items():
                timings.setdefault(name, []).append(run())
        warm.close()
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        subprocess.run([str(Path(sys.executable).parent / "lms"), "daemon", "down"],
                       env={**os.environ, "LMS_HOME": str(home)}, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)

    results = {name: (median([t.ttft for t in ts]), median([t.decode_tps for t in ts])) for name, ts in timings.items()}
    cold = {name: median(values) for name, values in cold_runs.items()}
    report(results, cold, args)


def report(results: dict[str, tuple[float, float]], cold: dict[str, float], args: argparse.Namespace) -> None:
    ref_ttft, ref_tps = results["in-process llama-cpp-python"]
    print(f"\nSmolLM2-135M-Instruct Q4_1, {args.tokens} tokens, median of {args.runs} interleaved runs, "
          f"{os.cpu_count()} CPUs, n_ctx {N_CTX}\n")
    print(f"{'streaming':32} {'TTFT ms':>9} {'decode tok/s':>13} {'TTFT ratio':>11} {'tok/s ratio':>12}")
    for name, (ttft, tps) in results.items():
        print(f"{name:32} {ttft * 1000:9.1f} {tps:13.1f} {ttft / ref_ttft:10.2f}x {tps / ref_tps:11.2f}x")
    print(f"\n{'cold start':32} {'seconds':>9} {'ratio':>13}")
    ref = cold["bare Llama() + first token"]
    for name, seconds in cold.items():
        print(f"{name:32} {seconds:9.3f} {seconds / ref:12.2f}x")
    print("\nratios are against in-process llama-cpp-python (TTFT: lower is better; tok/s: higher is better)")


if __name__ == "__main__":
    main()
