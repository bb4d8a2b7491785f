"""`lms chat` end to end: the real CLI and daemon, the HTTP endpoint off, one-shot (-p, piped) and an interactive
session on a pseudo-terminal (history commands, Ctrl-C stopping an answer but not the session)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from pathlib import Path

from tests.conftest import SMOLLM2_DEST, Home, Lms, wait_until


def test_one_prompt_answers_on_stdout_loading_the_model_with_its_ttl(home: Home, lms: Lms,
                                                                     smollm2_file: Path) -> None:
    home.add(smollm2_file, SMOLLM2_DEST)
    out = lms("chat", "smollm2", "-p", "What is the capital of France?", "-s", "Answer in one word.", "--stats",
              "--ttl", "90", check=True)
    assert "Paris" in out.stdout
    assert "tok/s" in out.stderr and "time to first token" in out.stderr
    [inst] = lms.json("ps")
    assert inst["origin"] == "jit" and inst["ttl_seconds"] == 90
    assert lms.json("server", "status")["running"] is False  # no HTTP endpoint was needed


def test_piped_prompt_and_jit_off_still_answer(home: Home, lms: Lms, tiny_file: Path) -> None:
    home.add(tiny_file, "test/alpha/alpha.F16.gguf")
    lms("server", "settings", "--no-jit", check=True)
    proc = subprocess.run([lms.exe, "chat", "alpha", "--max-tokens", "5"], input="hello there\n", env=home.env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
    assert [i["identifier"] for i in lms.json("ps")] == ["alpha"]
    missing = lms("chat", "nope", "-p", "hi")
    assert missing.returncode == 1 and "no model 'nope'" in missing.stderr and "Traceback" not in missing.stderr


class Terminal:
    """`lms chat` on a pseudo-terminal, as a person runs it."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env={**env, "COLUMNS": "100"},
                                     close_fds=True)
        os.close(slave)
        self.seen = ""

    def read_until(self, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {text!r} on the terminal within {timeout} s; it shows:\n{self.seen[-2000:]}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    self.seen += os.read(self.master, 4096).decode(errors="replace")
                except OSError:  # the process ended
                    break
        return self.seen

    def send(self, data: str) -> None:
        os.write(self.master, data.encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.master)


def test_an_interactive_session_keeps_going_after_ctrl_c_stops_an_answer(home: Home, lms: Lms,
                                                                         tiny_file: Path) -> None:
    import signal

    home.add(tiny_file, "test/alpha/alpha.F16.gguf")
    term = Terminal([lms.exe, "chat", "alpha", "--stats"], home.env)
    try:
        term.read_until("/clear forgets")
        term.send("write a very long story\r")  # the tiny model does not stop by itself for a long while
        wait_until(lambda: any(i["in_flight"] for i in lms.json("ps")), what="the answer to stream")
        term.proc.send_signal(signal.SIGINT)  # Ctrl-C
        term.read_until("(stopped)")
        wait_until(lambda: lms.json("ps")[0]["in_flight"] == 0, timeout=10, what="the slot to be given back")
        term.send("/clear\r")
        term.read_until("Conversation cleared.")
        term.send("/model nope\r")
        term.send("hi\r")
        term.read_until("no model 'nope'")  # one failed turn: the session goes on
        term.send("/system Be brief.\r")
        term.read_until("System prompt set.")
        term.send("/exit\r")
        assert term.proc.wait(30) == 0, term.seen[-2000:]
    finally:
        term.close()
