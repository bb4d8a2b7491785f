"""Contention benchmark: many clients at once, spread over more models than are kept loaded (issue 6).

A real lmsd in a fresh LMS_HOME under /tmp serves three copies of SmolLM2-135M-Instruct (keys smol-a, smol-b,
smol-c) over HTTP. N client threads each loop until the duration ends: client i asks the models round-robin
starting at i % 3 for a short chat completion (max_tokens 8); half the clients stream (SSE, which must end
with `data: [DONE]` and carry no error chunk), half do not. A refused request (429/503) is an honest answer:
the client waits its Retry-After (bounded by the time left) and goes on with its next model.

With the default settings (auto-evict on: one JIT model at a time) every change of model is a swap;
`--no-auto-evict --max-loaded 3` keeps all three warm for comparison. Options are passed through to
`lms server settings`.

Measures: requests sent, served, refused (by error code), failed (any other status, a stream with an error
chunk or without [DONE], a connection error), p50 / p99 / max latency of served requests, and swaps (model
loads counted in the daemon log). Exits 1 when any request failed. Run: python bench/bench_contention.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("smol-a", "smol-b", "smol-c")
SOURCE_KEY = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Say hi"}]
MAX_TOKENS = 8
CLIENT_TIMEOUT = 600.0
REFUSED = (429, 503)
LOAD_LINE = re.compile(r": loaded (\S+) \(")


@dataclass
class Outcome:
    """One request as the client saw it."""

    client: int
    model: str
    stream: bool
    status: int  # 0: no HTTP response (connection error)
    latency: float
    kind: str  # "served", "refused" or "failed"
    code: str = ""  # the error code of a refusal or failure
    retry_after: str | None = None
    body: str = ""  # the response (or exception) text of a failure or refusal


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon_env(home: Path) -> dict[str, str]:
    """As tests/conftest.py's Home: this checkout's code, this LMS_HOME, nothing inherited that redirects it."""
    env = {k: v for k, v in os.environ.items() if k not in ("LMS_MODELS_DIR", "LMS_NO_AUTOSTART")}
    env["LMS_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def lms(home: Path, *args: str) -> str:
    exe = Path(sys.executable).parent / "lms"
    proc = subprocess.run([str(exe), *args], env=daemon_env(home), capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"lms {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def make_home() -> Path:
    """A fresh LMS_HOME with three symlinked copies of SmolLM2 under different keys."""
    from lmscli.fetch import SOURCES
    from tests.conftest import test_cache

    model = SOURCES[SOURCE_KEY].fetch(test_cache() / "models")
    home = Path(tempfile.mkdtemp(prefix="lms-cont-", dir="/tmp"))
    for key in MODELS:
        dest = home / "models" / "test" / key / f"{key}.Q4_1.gguf"
        dest.parent.mkdir(parents=True)
        os.symlink(model, dest)
    return home


def settings_args(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    if args.auto_evict is not None:
        out.append("--auto-evict" if args.auto_evict else "--no-auto-evict")
    if args.max_loaded is not None:
        out += ["--max-loaded", str(args.max_loaded)]
    if args.max_wait is not None:
        out += ["--max-wait", args.max_wait]
    return out


def stop_daemon(home: Path) -> None:
    try:
        lms(home, "daemon", "down")
    except (RuntimeError, subprocess.TimeoutExpired):
        pass
    try:  # whatever is left of it (as tests/conftest.py does)
        os.kill(int((home / "run" / "lmsd.pid").read_text()), signal.SIGKILL)
    except (OSError, ValueError):
        pass


# ---------------------------------------------------------------- clients


def error_of(text: str) -> tuple[str, str]:
    """(code, text) of an OpenAI-style error body; ("", text) when it is not one."""
    try:
        err = json.loads(text).get("error") or {}
        return str(err.get("code") or err.get("type") or ""), text
    except (ValueError, AttributeError):
        return "", text


def is_error_chunk(data: str) -> bool:
    try:
        chunk = json.loads(data)
    except ValueError:
        return True  # not JSON: as bad as an error
    return not isinstance(chunk, dict) or "error" in chunk


def request_once(http: httpx.Client, url: str, client: int, model: str, stream: bool) -> Outcome:
    body = {"model": model, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "stream": stream}
    started = time.perf_counter()

    def outcome(status: int, kind: str, code: str = "", text: str = "", retry: str | None = None) -> Outcome:
        return Outcome(client, model, stream, status, time.perf_counter() - started, kind, code, retry, text)

    try:
        with http.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                code, text = error_of(r.read().decode(errors="replace"))
                kind = "refused" if r.status_code in REFUSED else "failed"
                return outcome(r.status_code, kind, code, text, r.headers.get("retry-after"))
            if not stream:
                text = r.read().decode(errors="replace")
                try:
                    ok = json.loads(text)["choices"][0]["message"]["content"] is not None
                except (ValueError, KeyError, IndexError, TypeError):
                    ok = False
                return outcome(200, "served") if ok else outcome(200, "failed", "bad_body", text)
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    except httpx.HTTPError as e:
        return outcome(0, "failed", type(e).__name__, repr(e))
    errors = [line for line in lines if line != "data: [DONE]" and is_error_chunk(line[6:])]
    if errors:
        code, _ = error_of(errors[0][6:])
        return outcome(200, "failed", f"stream:{code}", "\n".join(lines[-3:]))
    if not lines or lines[-1] != "data: [DONE]":
        return outcome(200, "failed", "no_done", "\n".join(lines[-3:]))
    return outcome(200, "served")


def client_loop(base: str, client: int, deadline: float, results: list[Outcome], lock: threading.Lock) -> None:
    """Client `client`: models round-robin from client % 3, even clients stream, until the deadline."""
    stream = client % 2 == 0
    turn = client % len(MODELS)
    with httpx.Client(timeout=CLIENT_TIMEOUT) as http:
        while time.monotonic() < deadline:
            result = request_once(http, base + "/v1/chat/completions", client, MODELS[turn], stream)
            turn = (turn + 1) % len(MODELS)
            with lock:
                results.append(result)
            if result.kind == "refused":
                retry = result.retry_after or ""
                wait = float(retry) if retry.isdigit() else 1.0
                time.sleep(max(0.0, min(wait, deadline - time.monotonic())))


def run_clients(base: str, clients: int, seconds: float) -> tuple[list[Outcome], float]:
    results: list[Outcome] = []
    lock = threading.Lock()
    started = time.monotonic()
    deadline = started + seconds
    threads = [threading.Thread(target=client_loop, args=(base, i, deadline, results, lock), daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.monotonic() - started


# ---------------------------------------------------------------- report


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered), math.ceil(p / 100 * len(ordered))) - 1)]


def loads_in_log(log: str) -> Counter[str]:
    return Counter(m.group(1) for m in LOAD_LINE.finditer(log))


def report(results: list[Outcome], wall: float, loads: Counter[str], ps: list[dict[str, Any]],
           config: dict[str, Any], args: argparse.Namespace) -> None:
    served = [r for r in results if r.kind == "served"]
    refused = Counter(f"{r.status} {r.code or '?'}" for r in results if r.kind == "refused")
    failed = [r for r in results if r.kind == "failed"]
    lat = [r.latency for r in served]
    swaps = sum(loads.values())
    print(f"\ncontention: {args.clients} clients ({(args.clients + 1) // 2} streaming), {args.seconds:g} s, "
          f"models {', '.join(MODELS)} (SmolLM2-135M Q4_1), max_tokens {MAX_TOKENS}, {os.cpu_count()} CPUs")
    print(f"configuration: auto_evict={'on' if config['auto_evict'] else 'off'} "
          f"max_loaded_models={config['max_loaded_models'] or 'no limit'} memory_limit={config['memory_limit']} "
          f"max_wait={config['max_wait']}s  (wall {wall:.1f} s incl. the last requests)\n")
    rows = [
        ("requests sent", str(len(results))),
        ("served (200)", str(len(served))),
        *((f"refused {key}", str(n)) for key, n in sorted(refused.items())),
        ("refused with Retry-After", f"{sum(1 for r in results if r.kind == 'refused' and r.retry_after)}"
                                     f" / {sum(refused.values())}"),
        ("failed", str(len(failed))),
        ("latency p50 (served)", f"{percentile(lat, 50):.2f} s"),
        ("latency p99 (served)", f"{percentile(lat, 99):.2f} s"),
        ("latency max (served)", f"{max(lat, default=float('nan')):.2f} s"),
        ("swaps (loads in log)", f"{swaps}  ({', '.join(f'{k} {n}' for k, n in sorted(loads.items()))})"),
        ("requests served per swap", f"{len(served) / swaps:.1f}" if swaps else "-"),
        ("served per model", ", ".join(f"{m} {sum(1 for r in served if r.model == m)}" for m in MODELS)),
        ("loaded at the end (lms ps)", ", ".join(f"{i['identifier']} {i['origin']} {i['status']}" for i in ps)
         or "none"),
    ]
    for name, value in rows:
        print(f"{name:28} {value}")
    for key in sorted(refused):
        example = next(r for r in results if r.kind == "refused" and f"{r.status} {r.code or '?'}" == key)
        print(f"example refusal {key} (Retry-After {example.retry_after}): {example.body[:300]}")
    print(f"\nRESULT served={len(served)} refused={sum(refused.values())} failed={len(failed)} "
          f"p50={percentile(lat, 50):.2f}s p99={percentile(lat, 99):.2f}s swaps={swaps}")


def report_failures(failed: list[Outcome], log: str) -> None:
    distinct = Counter((r.status, r.model, r.stream, r.code, r.body) for r in failed)
    print(f"\nFAILURES ({len(failed)}, {len(distinct)} distinct):")
    for (status, model, stream, code, body), n in distinct.most_common(10):
        print(f"--- {n}x status {status} model {model} stream={stream} code {code or '-'}\n{body}")
    lines = [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]
    print(f"\nlmsd.log WARNING/ERROR lines ({len(lines)}):")
    print("\n".join(lines[-60:]) or "(none)")


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients (default 20)")
    parser.add_argument("--seconds", type=float, default=25.0, help="how long clients send requests (default 25)")
    parser.add_argument("--auto-evict", action=argparse.BooleanOptionalAction, default=None,
                        help="lms server settings --auto-evict/--no-auto-evict (default: the daemon's, on)")
    parser.add_argument("--max-loaded", type=int, default=None, help="lms server settings --max-loaded N")
    parser.add_argument("--max-wait", default=None, help="lms server settings --max-wait T (e.g. 60, 5m)")
    parser.add_argument("--keep-home", action="store_true", help="leave the temporary LMS_HOME for inspection")
    args = parser.parse_args()

    home = make_home()
    port = free_port()
    try:
        lms(home, "daemon", "up")
        extra = settings_args(args)
        config = json.loads(lms(home, "server", "settings", *extra, "--json"))
        lms(home, "server", "start", "--port", str(port))
        keys = {m["key"] for m in json.loads(lms(home, "ls", "--json"))}
        if not set(MODELS) <= keys:
            raise RuntimeError(f"expected keys {MODELS}, the daemon sees {sorted(keys)}")
        results, wall = run_clients(f"http://127.0.0.1:{port}", args.clients, args.seconds)
        ps = json.loads(lms(home, "ps", "--json"))
        log_path = home / "logs" / "lmsd.log"
        log = log_path.read_text(errors="replace") if log_path.exists() else ""
    finally:
        stop_daemon(home)
        if args.keep_home:
            print(f"LMS_HOME kept: {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)

    report(results, wall, loads_in_log(log), ps, config, args)
    failed = [r for r in results if r.kind == "failed"]
    if failed:
        report_failures(failed, log)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
