"""End to end on the real daemon: a lifecycle that cannot be broken, and the memory-aware eviction policy.

Interrupted unloads, the shortest grace, clients alternating models with auto-evict on, the memory budget,
--max-loaded and --estimate-only, driven through the real `lms` and plain HTTP.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import wait_until
from tests.e2e.conftest import Server

SMOL = "smollm2-135m-instruct"
HI = [{"role": "user", "content": "hi"}]


def chat(server: Server, model: str, **extra: Any) -> httpx.Response:
    with server.client() as c:
        return c.post("/v1/chat/completions", json={"model": model, "messages": HI, "max_tokens": 4, **extra})


def states(server: Server) -> dict[str, str]:
    return {i["identifier"]: i["status"] for i in server.loaded()}


def test_ctrl_c_on_lms_unload_still_unloads_once_the_request_ends(server: Server) -> None:
    """Defect 1: the unload belongs to the daemon, not to the `lms unload` that asked for it."""
    server.lms("load", SMOL, check=True)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(chat, server, SMOL, max_tokens=300, ignore_eos=True)
        wait_until(lambda: server.loaded()[0]["in_flight"] == 1, what="the request to run")
        unload = subprocess.Popen([server.lms.exe, "unload", SMOL, "--grace", "60"], env=server.home.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: states(server).get(SMOL) == "unloading", what="the drain to begin")
        unload.send_signal(signal.SIGINT)  # Ctrl-C while it waits for the running request
        unload.communicate(timeout=30)
        assert running.result().status_code == 200  # the request was never cut off
    wait_until(lambda: server.loaded() == [], timeout=30, what="the interrupted unload to finish")
    assert chat(server, SMOL).status_code == 200  # and the model is usable again (JIT)


def test_shorter_grace_ends_an_eviction_drain(server: Server) -> None:
    """Defect 2: an eviction drain has no time limit of its own; `lms unload --grace 1` bounds it."""
    with ThreadPoolExecutor(2) as pool:
        endless = pool.submit(chat, server, SMOL, max_tokens=3000, ignore_eos=True)
        wait_until(lambda: [i["in_flight"] for i in server.loaded()] == [1], what="the long request to run")
        other = pool.submit(chat, server, "alpha")  # JIT alpha: auto-evict drains SmolLM2 and waits for it
        wait_until(lambda: states(server).get(SMOL) == "unloading", what="the eviction drain")
        started = time.monotonic()
        server.lms("unload", SMOL, "--grace", "1", check=True)
        assert time.monotonic() - started < 15
        r = endless.result()
        assert r.status_code == 503 and "grace period of 1.0s" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "model_unloaded" and r.headers["retry-after"]
        assert other.result().status_code == 200  # the request that asked for alpha is served
    assert [i["identifier"] for i in server.loaded()] == ["alpha"]


def test_two_clients_alternating_two_models_are_all_served(server: Server) -> None:
    """Defect 3 and the FIFO swaps: auto-evict on, two clients each alternating alpha and beta for 20 s."""
    results: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 20

    def client(models: list[str]) -> None:
        n = 0
        with server.client() as c:
            while time.monotonic() < deadline:
                model = models[n % 2]
                n += 1
                r = c.post("/v1/chat/completions", json={"model": model, "messages": HI, "max_tokens": 3})
                with lock:
                    results.append(r.status_code)
                    if r.status_code != 200:
                        errors.append(f"{model}: {r.status_code} {r.text}")

    threads = [threading.Thread(target=client, args=(m,)) for m in (["alpha", "beta"], ["beta", "alpha"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:5]
    assert len(results) >= 10, results  # traffic really flowed
    log = (server.home.root / "logs" / "lmsd.log").read_text()
    assert "corrupt" not in log and "unloaded while loading" not in log


def _add_smol_copies(server: Server, smollm2_file: Path, names: list[str]) -> None:
    for name in names:
        server.home.add(smollm2_file, f"test/{name}/{name}.Q4_1.gguf")


def test_memory_budget_that_fits_two_evicts_the_lru_and_refuses_manual_overflow(server: Server,
                                                                                smollm2_file: Path) -> None:
    _add_smol_copies(server, smollm2_file, ["smol-a", "smol-b", "smol-c"])
    est = server.lms.json("load", "smol-a", "--estimate-only")
    assert set(est) == {"model", "context_length", "estimated_memory_bytes", "budget_bytes", "available_bytes",
                        "fits"}
    assert est["model"] == "smol-a" and est["context_length"] == 4096 and est["fits"] is True
    per_model = est["estimated_memory_bytes"]
    assert 100 * 2**20 < per_model < 2 * 2**30
    assert server.loaded() == []  # --estimate-only loads nothing
    budget = int(per_model * 2.5)
    server.lms("server", "settings", "--no-auto-evict", "--memory-limit", str(budget), check=True)

    for name in ("smol-a", "smol-b"):
        assert chat(server, name).status_code == 200
    assert sorted(states(server)) == ["smol-a", "smol-b"]
    assert chat(server, "smol-a").status_code == 200  # smol-b is now the least recently used
    assert chat(server, "smol-c").status_code == 200  # a third does not fit: the LRU one goes
    assert sorted(states(server)) == ["smol-a", "smol-c"]
    table = server.lms("ps", check=True)
    assert "Memory:" in table.stderr and "budget" in table.stderr

    with server.client() as c:
        v0 = c.get("/api/v0/models").json()
    assert v0["memory"]["budget_bytes"] == budget and v0["memory"]["used_bytes"] >= 2 * per_model

    server.lms("unload", "--all", check=True)
    server.lms("load", "smol-a", check=True)
    server.lms("load", "smol-b", check=True)
    out = server.lms("load", "smol-c")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "needs an estimated" in out.stderr and "memory budget is" in out.stderr, out.stderr
    assert sorted(states(server)) == ["smol-a", "smol-b"]  # manual instances are never evicted
    r = chat(server, "smol-c")  # JIT gets the same refusal over HTTP
    assert r.status_code == 503 and r.json()["error"]["code"] == "insufficient_memory" and r.headers["retry-after"]
    est = server.lms("load", "smol-c", "--estimate-only", "--json")
    assert est.returncode == 1 and '"fits": false' in est.stdout


def test_max_loaded_evicts_lru_jit_and_refuses_when_only_manual_are_left(server: Server) -> None:
    server.home.add(server.home.models / "test/alpha/alpha.F16.gguf", "test/gamma/gamma.F16.gguf")
    server.lms("server", "settings", "--no-auto-evict", "--max-loaded", "2", check=True)
    for name in ("alpha", "beta"):
        assert chat(server, name).status_code == 200
    assert chat(server, "gamma").status_code == 200
    assert sorted(states(server)) == ["beta", "gamma"]  # alpha was the least recently used
    server.lms("load", "alpha", "--identifier", "m1", check=True)  # manual at the limit: evicts a JIT one
    server.lms("load", "alpha", "--identifier", "m2", check=True)
    assert sorted(states(server)) == ["m1", "m2"]
    out = server.lms("load", "beta")
    assert out.returncode == 1 and "max_loaded_models is 2" in out.stderr, out.stderr
    r = chat(server, "beta")
    assert r.status_code == 503 and r.json()["error"]["code"] == "max_loaded_models"


def test_ps_shows_a_failed_load_until_the_next_request(server: Server) -> None:
    # A header that reads fine but names an architecture llama.cpp does not know: the load itself fails.
    bad = server.home.models / "test" / "broken" / "broken.F16.gguf"
    bad.parent.mkdir(parents=True)
    bad.write_bytes((server.home.models / "test/alpha/alpha.F16.gguf").read_bytes().replace(b"llama", b"llamz"))
    r = chat(server, "broken")
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_load_failed", r.text
    rows = server.lms.json("ps")
    assert [(i["identifier"], i["status"]) for i in rows] == [("broken", "failed")]
    assert "could not load broken.F16.gguf" in rows[0]["message"], rows[0]["message"]
    assert "load failed" in server.lms("ps", check=True).stderr
    assert chat(server, "alpha").status_code == 200  # the daemon carries on; the record stays until...
    assert chat(server, "broken").status_code == 400  # ...the next request for that model, which tries again


def test_a_request_cut_off_by_daemon_down_is_a_503_not_a_crash(server: Server) -> None:
    """`lms daemon down` gives running requests their grace, then ends them: that is a shutdown (503,
    model_unloaded, retry later), never a 500 `worker_gone` as if the worker had crashed."""
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(chat, server, SMOL, max_tokens=3000, ignore_eos=True)
        wait_until(lambda: [i["in_flight"] for i in server.loaded()] == [1], what="the long request to run")
        server.lms("daemon", "down", check=True)
        r = long.result(timeout=60)
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_unloaded", r.text
    assert "shut down" in r.json()["error"]["message"]
