"""End to end: the real lmsd, driven by the real `lms` as a subprocess, in an isolated LMS_HOME."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import SMOLLM2_DEST, SMOLLM2_KEY, TINY_KEY, TINY_NAME, Home, Lms, pid_alive, wait_until


def loaded(lms: Lms) -> list[dict]:
    return lms.json("ps")


def test_get_ls_load_ps_unload_with_smollm2(home: Home, lms: Lms, smollm2_file: Path) -> None:
    got = lms("get", "smollm2-135m-instruct", check=True)
    assert Path(got.stdout.strip()) == home.models / SMOLLM2_DEST
    again = lms("get", "smollm2", check=True)  # the alias; the file is there and verified: nothing fetched
    assert "already in" in again.stderr and "checksum verified" in again.stderr
    assert not [p for p in home.models.rglob("*") if p.name.startswith(".")]  # no temp files left
    first = lms("ls", "--json", check=True)
    assert "lmsd is not running; starting it" in first.stderr  # autostart, said on stderr
    models = json.loads(first.stdout)
    assert [m["key"] for m in models] == [SMOLLM2_KEY]
    m = models[0]
    assert (m["arch"], m["quantization"], m["max_context_length"], m["type"], m["loaded"]) == (
        "llama", "Q4_1", 8192, "llm", False)
    assert m["params"] == 134515008 and m["size_bytes"] == 98362432

    out = lms("load", SMOLLM2_KEY, "--ttl", "3600", check=True)
    assert out.stdout.strip() == SMOLLM2_KEY  # the identifier to use, alone on stdout

    table = lms("ps", check=True).stdout
    assert re.search(r"smollm2-135m-instruct\s+smollm2-135m-instruct\s+idle\s+manual", table)
    assert re.search(r"(59m 5\ds|1h) / 1h", table), table
    [inst] = loaded(lms)
    assert set(inst) == {"identifier", "model", "status", "origin", "ttl_seconds", "ttl_remaining_seconds",
                         "context_length", "size_bytes", "memory_bytes", "pid", "in_flight", "queued", "parallel",
                         "estimated_memory_bytes", "last_used_unix", "message"}
    assert inst["ttl_seconds"] == 3600 and inst["origin"] == "manual" and inst["memory_bytes"] > 50_000_000
    assert lms.json("ls")[0]["loaded"] is True

    lms("unload", SMOLLM2_KEY, check=True)
    assert loaded(lms) == []
    assert not pid_alive(inst["pid"])  # the worker process, and its memory, are gone


def test_ttl_expiry_and_unload_all(home: Home, lms: Lms, tiny_file: Path) -> None:
    home.add(tiny_file, f"test/tiny/{TINY_NAME}")
    lms("daemon", "up", check=True)
    assert lms("load", TINY_KEY, check=True).stdout.strip() == TINY_KEY  # no TTL: stays
    out = lms("load", TINY_KEY, "--ttl", "2", check=True)  # a second instance, 2 s idle TTL
    assert out.stdout.strip() == f"{TINY_KEY}:2" and "idle TTL 2s" in out.stderr
    log = home.root / "logs" / "lmsd.log"
    match = re.search(rf"loaded {TINY_KEY}:2 \(.*ttl 2, pid (\d+)[,)]", log.read_text())
    assert match, log.read_text()
    expiring_pid = int(match.group(1))
    wait_until(lambda: [i["identifier"] for i in loaded(lms)] == [TINY_KEY], timeout=15,
               what="the 2 s TTL to expire")
    assert not pid_alive(expiring_pid)
    assert loaded(lms)[0]["ttl_seconds"] is None
    assert f"TTL of {TINY_KEY}:2 (2s) ran out" in log.read_text()
    lms("load", TINY_KEY, "--identifier", "mine", check=True)
    out = lms("unload", "--all", check=True)
    assert "mine" in out.stderr and loaded(lms) == []


@pytest.mark.parametrize("ttl", ["0", "-5", "abc", "1.5.2", "1.5", "5x"])
def test_bad_ttl_is_a_usage_error_and_loads_nothing(home: Home, lms: Lms, tiny_file: Path, ttl: str) -> None:
    home.add(tiny_file, f"test/tiny/{TINY_NAME}")
    out = lms("load", TINY_KEY, f"--ttl={ttl}")
    assert out.returncode == 2
    assert "is not a TTL" in out.stderr and "90s, 5m, 1h" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (home.root / "run" / "lmsd.sock").exists()  # rejected before anything reached a daemon


def test_ttl_units_are_accepted(home: Home, lms: Lms, tiny_file: Path) -> None:
    home.add(tiny_file, f"test/tiny/{TINY_NAME}")
    for text, seconds in (("90s", 90), ("5m", 300), ("1h", 3600)):
        lms("load", TINY_KEY, "--ttl", text, "--identifier", text, check=True)
        assert {i["identifier"]: i["ttl_seconds"] for i in loaded(lms)}[text] == seconds


def test_unknown_and_ambiguous_models(home: Home, lms: Lms, tiny_file: Path) -> None:
    home.add(tiny_file, "test/a/lms-tiny-alpha.F16.gguf")
    home.add(tiny_file, "test/b/lms-tiny-beta.F16.gguf")
    out = lms("load", "no-such-model")
    assert out.returncode == 1 and "no model matches 'no-such-model'" in out.stderr
    out = lms("load", "lms-tiny")
    assert out.returncode == 2
    assert "ambiguous" in out.stderr and "lms-tiny-alpha" in out.stderr and "lms-tiny-beta" in out.stderr
    assert loaded(lms) == []
    out = lms("load", "lms-tiny", "-y", check=True)
    assert out.stdout.strip() in ("lms-tiny-alpha", "lms-tiny-beta")
    assert lms("load", "lms-tiny-a", check=True).stdout.strip() == "lms-tiny-alpha"  # unique prefix


def test_corrupt_and_truncated_gguf(home: Home, lms: Lms, tiny_file: Path) -> None:
    home.add(tiny_file, f"test/tiny/{TINY_NAME}")
    truncated = home.models / "broken" / "truncated.F16.gguf"
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes(tiny_file.read_bytes()[: tiny_file.stat().st_size // 2])
    (home.models / "broken" / "garbage.gguf").write_bytes(b"not a model at all" * 100)
    ls = {m["key"]: m for m in lms.json("ls")}
    assert ls[TINY_KEY]["error"] is None
    assert "truncated" in ls["truncated"]["error"] and "not a GGUF" in ls["garbage"]["error"]
    human = lms("ls", check=True)
    assert "unreadable" in human.stdout and "truncated.F16.gguf cannot be used" in human.stderr
    out = lms("load", "truncated")
    assert out.returncode == 1 and "cannot load 'truncated'" in out.stderr and "truncated" in out.stderr
    assert "Traceback" not in out.stderr
    assert lms("daemon", "status").returncode == 0  # the daemon lives on
    lms("load", TINY_KEY, check=True)
    assert [i["identifier"] for i in loaded(lms)] == [TINY_KEY]


def test_killed_worker_disappears_and_daemon_lives(home: Home, lms: Lms, tiny_file: Path) -> None:
    home.add(tiny_file, f"test/tiny/{TINY_NAME}")
    lms("load", TINY_KEY, check=True)
    lms("load", TINY_KEY, check=True)
    victim = next(i for i in loaded(lms) if i["identifier"] == TINY_KEY)
    os.kill(victim["pid"], signal.SIGKILL)
    wait_until(lambda: [i["identifier"] for i in loaded(lms)] == [f"{TINY_KEY}:2"], timeout=10,
               what="the killed instance to leave lms ps")
    assert lms("daemon", "status").returncode == 0
    log = (home.root / "logs" / "lmsd.log").read_text()
    assert f"worker of {TINY_KEY} (pid {victim['pid']}) died: killed by SIGKILL" in log


def test_no_daemon_without_autostart_exits_3(home: Home, lms: Lms) -> None:
    env = {**home.env, "LMS_NO_AUTOSTART": "1"}
    for args in (("ps",), ("ls",), ("unload", "--all"), ("server", "settings")):
        out = lms(*args, env=env)
        assert out.returncode == 3, (args, out.stderr)
        assert "lms daemon up" in out.stderr and "Traceback" not in out.stderr
    status = lms("daemon", "status")
    assert status.returncode == 3 and "not running" in status.stderr


def test_daemon_up_twice_at_once_makes_one_daemon(home: Home, lms: Lms) -> None:
    import subprocess

    procs = [subprocess.Popen([lms.exe, "daemon", "up"], env=home.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=90) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], results
    said = sorted("started" if "lmsd started" in err else "found" for _out, err in results)
    assert said == ["found", "found", "started"], results  # one of them started it; the others say they found it
    status = json.loads(lms("daemon", "status", "--json", check=True).stdout)
    pid = lms.daemon_pid()
    assert status["pid"] == pid and status["running"] is True
    out = subprocess.run(["pgrep", "-f", "-x", r".*-m lmsd"], capture_output=True, text=True)
    daemons = [int(p) for p in out.stdout.split() if _home_of(int(p)) == str(home.root)]
    assert daemons == [pid]


def _home_of(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"LMS_HOME="):
            return item[len(b"LMS_HOME="):].decode()
    return None


def test_recovers_after_daemon_sigkill(home: Home, lms: Lms, tiny_file: Path) -> None:
    home.add(tiny_file, f"test/tiny/{TINY_NAME}")
    lms("load", TINY_KEY, check=True)
    worker_pid = loaded(lms)[0]["pid"]
    old = lms.daemon_pid()
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: not pid_alive(old), what="the daemon to die")
    # The worker notices its daemon is gone (its pipe closed) and exits: no orphaned model in memory.
    wait_until(lambda: not pid_alive(worker_pid), timeout=10, what="the orphaned worker to exit")
    assert (home.root / "run" / "lmsd.sock").exists()  # stale state left behind
    env = {**home.env, "LMS_NO_AUTOSTART": "1"}
    out = lms("ps", env=env)
    assert out.returncode == 3 and "nobody answers" in out.stderr
    lms("daemon", "up", check=True)
    assert lms.daemon_pid() != old
    assert loaded(lms) == []
    assert "removing stale" in (home.root / "logs" / "lmsd.log").read_text()


def test_sigterm_shuts_down_in_order(home: Home, lms: Lms, tiny_file: Path) -> None:
    home.add(tiny_file, f"test/tiny/{TINY_NAME}")
    lms("load", TINY_KEY, check=True)
    worker_pid = loaded(lms)[0]["pid"]
    pid = lms.daemon_pid()
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid), what="the daemon to stop")
    assert not pid_alive(worker_pid)
    assert not (home.root / "run" / "lmsd.sock").exists() and not (home.root / "run" / "lmsd.pid").exists()
    log = (home.root / "logs" / "lmsd.log").read_text()
    assert "unloaded lms-tiny-test (reason: shutdown)" in log and "lmsd stopped" in log


def test_daemon_down_and_status(home: Home, lms: Lms) -> None:
    lms("daemon", "up", check=True)
    assert lms("daemon", "up", check=True).stderr.startswith("lmsd is already running")
    status = lms("daemon", "status", check=True).stdout
    assert "is running" in status
    lms("daemon", "down", check=True)
    assert lms("daemon", "status").returncode == 3
    assert "lmsd is not running" in lms("daemon", "down", check=True).stderr


def test_socket_and_run_dir_are_private(home: Home, lms: Lms) -> None:
    lms("daemon", "up", check=True)
    assert (home.root / "run").stat().st_mode & 0o777 == 0o700
    assert (home.root / "run" / "lmsd.sock").stat().st_mode & 0o777 == 0o600


def test_ambiguous_model_on_a_terminal_asks_which_one(home: Home, lms: Lms, tiny_file: Path) -> None:
    """At a terminal (a pty here), `lms load` lists the candidates and loads the one the user picks."""
    import pty
    import select
    import subprocess

    home.add(tiny_file, "test/a/lms-tiny-alpha.F16.gguf")
    home.add(tiny_file, "test/b/lms-tiny-beta.F16.gguf")
    lms("daemon", "up", check=True)
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([lms.exe, "load", "lms-tiny"], env=home.env, stdin=terminal, stdout=terminal,
                            stderr=terminal, close_fds=True)
    os.close(terminal)
    seen = b""

    def read_until(marker: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + 30
        while marker not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(controller, 4096)
                except OSError:
                    break
        assert marker in seen, seen.decode(errors="replace")

    read_until(b"Load which one")
    text = seen.decode(errors="replace")
    assert "1. lms-tiny-beta" in text and "2. lms-tiny-alpha" in text  # shorter (closer) match first
    os.write(controller, b"2\n")
    read_until(b"Loaded lms-tiny-alpha")
    assert proc.wait(30) == 0
    os.close(controller)
    assert [i["identifier"] for i in loaded(lms)] == ["lms-tiny-alpha"]


def test_names_from_files_are_printed_as_text_never_as_markup_or_escape_codes(home: Home, lms: Lms,
                                                                               tiny_file: Path) -> None:
    name = "Bad[red]name[link=http:__evil]X\x1b[31m.Q4_1.gguf"
    home.add(tiny_file, f"test/evil/{name}")
    key = "bad[red]name[link=http:__evil]x\x1b[31m"
    assert [m["key"] for m in lms.json("ls")] == [key]  # JSON carries the real key
    table = lms("ls", check=True).stdout
    assert "bad[red]name[link=http:__evil]x\\x1b[31m" in table  # shown as it is, the escape code escaped
    assert "\x1b" not in table
    lms("load", key, check=True)
    ps = lms("ps", check=True)
    assert "bad[red]name" in ps.stdout and "\x1b" not in ps.stdout + ps.stderr
    out = lms("unload", key, check=True)
    assert "\x1b" not in out.stderr and "bad[red]name[link=http:__evil]x\\x1b[31m" in out.stderr


def test_help_and_version_never_start_a_daemon(home: Home, lms: Lms) -> None:
    import subprocess
    import sys

    from lmsd import __version__

    lmsd = str(Path(sys.executable).parent / "lmsd")
    assert lms("--version", check=True).stdout.strip() == f"lms {__version__}"
    for args, code, out in ((["--version"], 0, f"lmsd {__version__}"), (["--help"], 0, "usage: lmsd"),
                            (["--bogus"], 2, "unrecognized arguments: --bogus")):
        proc = subprocess.run([lmsd, *args], env=home.env, capture_output=True, text=True, timeout=30)
        assert proc.returncode == code and out in proc.stdout + proc.stderr, proc
    assert not (home.root / "run" / "lmsd.pid").exists()  # `lmsd --help` used to start a foreground daemon


def test_ls_filters_by_type_and_a_rounded_context_is_said(home: Home, lms: Lms, tiny_file: Path) -> None:
    home.add(tiny_file, f"test/tiny/{TINY_NAME}")
    down = lms("status")
    assert down.returncode == 3 and "lmsd is not running" in down.stderr  # `lms status` never starts it
    assert [m["key"] for m in lms.json("ls", "--llm")] == [TINY_KEY]
    assert lms.json("ls", "--embedding") == []  # the tiny model is a language model
    typo = lms("load", "lms-tiny-tset")
    assert typo.returncode == 1 and f"Did you mean {TINY_KEY}?" in typo.stderr  # a near miss is no ambiguity
    out = lms("load", TINY_KEY, "-c", "100", check=True)
    assert "--context-length 100 became 256" in out.stderr
    assert lms.json("ps")[0]["context_length"] == 256
    status = lms.json("status")
    assert status["daemon"]["running"] is True and status["daemon"]["http"]["running"] is False
    assert [i["identifier"] for i in status["loaded"]] == [TINY_KEY]
    table = lms("status", check=True)
    assert "is running" in table.stdout and TINY_KEY in table.stdout and "Memory:" in table.stderr
    lms("unload", "lms-tiny", check=True)  # a unique prefix of a loaded identifier, as `lms load` takes keys
    assert lms.json("ps") == []


def test_shell_completion_offers_models_from_the_daemon_and_nothing_when_it_is_down(home: Home, lms: Lms,
                                                                                  tiny_file: Path) -> None:
    import subprocess

    home.add(tiny_file, f"test/tiny/{TINY_NAME}")

    def complete(shell: str, words: str) -> str:
        env = {**home.env, "_LMS_COMPLETE": f"complete_{shell}", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - 1), "_TYPER_COMPLETE_ARGS": words}
        proc = subprocess.run([lms.exe], env=env, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc
        return proc.stdout

    assert complete("bash", "lms load lms-t").split() == []  # the daemon is down: nothing, and it is not started
    assert not (home.root / "run" / "lmsd.pid").exists()
    lms("daemon", "up", check=True)
    assert complete("bash", "lms load lms-t").split() == [TINY_KEY]
    assert TINY_KEY in complete("zsh", "lms load lms")
    assert complete("bash", "lms unload lms").split() == []  # nothing loaded yet
    lms("load", TINY_KEY, check=True)
    assert complete("bash", "lms unload l").split() == [TINY_KEY]
    assert complete("bash", "lms chat lms").split() == [TINY_KEY]
