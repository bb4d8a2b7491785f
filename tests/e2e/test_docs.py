"""The documentation, run: the README tour step by step, every command of docs/cli.md and every endpoint of
docs/http.md through the examples written there, against a real daemon in its own LMS_HOME.

An example is a ```console block: each `$ ` line is a command (a line after an unclosed quote continues it), the
lines under it are what it prints. A command runs in bash, as a user's shell would run it, when it is one of ours
(`lms`, `lmsd`, or `curl` at the HTTP endpoint, possibly after `echo ... |` or `VAR=value`); other programs
(`systemctl`, `loginctl`) are shown for the user and not run, and so is one whose comment says `on a terminal`
(an interactive `lms chat`: tests/e2e/test_chat.py drives it on a pseudo-terminal). A command succeeds unless its
comment says `# exits N`. Of what the doc shows a command printing, a table's header must be the program's word
for word, and every other line must start as one of the program's lines do (sizes, timings and TTLs differ from
run to run). ```python blocks run as they are. Port 1234 becomes a free port; HOME is the test's, so nothing
touches `~`.
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO, SMOLLM2_DEST, Home, Lms
from tests.e2e.conftest import free_port
from tests.fakehub import FakeHub, tiny_gguf

OURS = {"lms", "lmsd", "curl"}
SHOWN = {"systemctl", "loginctl"}  # the system's tools: shown to the user, never run by a test
STREAMING = ("lms log stream",)  # run until they print their first line, then Ctrl-C as a user would
HEADING = re.compile(r"^#{2,3} ", re.MULTILINE)


@dataclass
class Step:
    where: str  # file:line, for the failure message
    command: str
    output: list[str] = field(default_factory=list)

    @property
    def program(self) -> str:
        """The program the command runs: after `VAR=value` assignments and an `echo ... |`."""
        line = self.command.split("|")[-1] if re.match(r"^\s*echo\b", self.command) else self.command
        words = [w for w in shlex.split(line, comments=True) if not re.match(r"^[A-Z_]+=", w)]
        return words[0] if words else ""

    @property
    def runs(self) -> bool:
        assert self.program in OURS | SHOWN, f"{self.where}: `{self.program}` is neither ours nor a known system tool"
        return self.program in OURS and not re.search(r"#.*\bon a terminal\b", self.command)

    @property
    def exit_code(self) -> int:
        m = re.search(r"#.*\bexits (\d)", self.command)
        return int(m[1]) if m else 0


def blocks(text: str, lang: str) -> Iterator[tuple[int, str]]:
    """The fenced blocks of one language, with the line each starts on."""
    for m in re.finditer(rf"^```{lang}\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        yield text.count("\n", 0, m.start()) + 2, m[1]


def steps(name: str, text: str, offset: int = 0) -> list[Step]:
    """The steps of every console block in text, which starts on line offset + 1 of the file `name`."""
    found: list[Step] = []
    for first, block in blocks(text, "console"):
        first += offset
        open_quote = False
        for n, line in enumerate(block.splitlines(), first):
            if open_quote:
                found[-1].command += "\n" + line
            elif line.startswith("$ "):
                found.append(Step(f"{name}:{n}", line[2:]))
            elif found and line.strip():
                found[-1].output.append(line)
            open_quote = bool(found) and _unclosed(found[-1].command)
    return found


def _unclosed(command: str) -> bool:
    try:
        shlex.split(command, comments=True)
    except ValueError:
        return True
    return False


def sections(text: str) -> list[tuple[str, str, int]]:
    """(heading, body, lines before it) for every `##` or `###` section."""
    starts = [m.start() for m in HEADING.finditer(text)] + [len(text)]
    return [(text[a:b].split("\n", 1)[0], text[a:b], text.count("\n", 0, a))
            for a, b in zip(starts, starts[1:], strict=False)]


_COLOUR = ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR", "CLICOLOR_FORCE", "TERM")


class Runner:
    """Runs steps in one shell environment: the test's LMS_HOME, HOME and XDG folders (install-service and
    --install-completion write there), no colour settings from the caller, `lms` of this checkout first on PATH."""

    def __init__(self, home: Home, port: int, extra_env: dict[str, str] | None = None) -> None:
        self.port = port
        user = home.root / "user-home"
        env = {k: v for k, v in {**home.env, **(extra_env or {})}.items()
               if not k.startswith("XDG_") and k not in _COLOUR}
        self.env = {**env, "HOME": str(user), "USER": "lms-test", "XDG_CONFIG_HOME": str(user / ".config"),
                    "XDG_DATA_HOME": str(user / ".local" / "share"), "XDG_CACHE_HOME": str(user / ".cache"),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        user.mkdir(exist_ok=True)

    def local(self, text: str) -> str:
        return text.replace("localhost:1234", f"localhost:{self.port}").replace("--port 1234", f"--port {self.port}")

    def run(self, step: Step) -> str:
        """Runs the step and checks it; returns what it printed."""
        command = self.local(step.command)
        if step.program == "curl":  # the status too, so that an error page cannot pass for an answer
            assert shutil.which("curl"), "the HTTP examples are curl commands: install curl to run them"
            command = re.sub(r"\bcurl ", "curl -sS -w '\\nHTTP %{http_code}\\n' ", command, count=1)
        streaming = any(step.command.startswith(s) for s in STREAMING)
        if streaming:
            out, code = self._interrupted(command)
            stdout = ""
        else:
            # `exit $?` after the command keeps bash from exec'ing it: bash stays its parent, as in a user's shell
            # (shell completion looks at its parent to tell which shell to install for).
            proc = subprocess.run(["bash", "-c", f"{command}\nexit $?"], env=self.env, capture_output=True,
                                  text=True, timeout=180, stdin=subprocess.DEVNULL)
            out, code, stdout = proc.stdout + proc.stderr, proc.returncode, proc.stdout
        context = f"{step.where}: `{step.command}` printed:\n{out}"
        assert code == step.exit_code, f"exit {code}, the doc says {step.exit_code} — {context}"
        assert "Traceback" not in out, context
        if step.program == "curl":
            status = int(out.rsplit("HTTP ", 1)[1])
            assert 200 <= status < 300, f"HTTP {status} — {context}"
        elif "--json" in shlex.split(step.command, comments=True) and code == 0 and not streaming:
            try:
                json.loads(stdout)  # what scripts read is JSON
            except ValueError as exc:
                raise AssertionError(f"not JSON on stdout ({exc}) — {context}") from None
        check_output(step, out, context)
        return out

    def _interrupted(self, command: str) -> tuple[str, int]:
        """Runs a command that follows something until Ctrl-C: once it has said it is following (its first line)
        it gets SIGINT as from a terminal. It must still be following then."""
        proc = subprocess.Popen(["bash", "-c", f"exec {command}"], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            first = proc.stdout.readline() if ready else ""
            assert proc.poll() is None, f"`{command}` ended by itself: {first}{proc.stdout.read()}"
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return first + out, 0 if proc.returncode in (0, 130, -signal.SIGINT) else proc.returncode

    def python(self, where: str, code: str) -> None:
        proc = subprocess.run([sys.executable, "-c", self.local(code)], env=self.env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"{where}: the Python example failed:\n{proc.stdout}{proc.stderr}"


def _shape(line: str) -> list[str]:
    """A line's words with what differs between runs made alike: a run of words with digits (sizes, times, pids,
    versions, TTLs: `9m 59s`) is `#`, a path is `/…`."""
    words: list[str] = []
    for word in line.split():
        path = word.lstrip("('\"`").startswith(("/", "~/"))
        shaped = "/…" if path else "#" if any(c.isdigit() for c in word) else word
        if not (shaped == "#" and words and words[-1] == "#"):
            words.append(shaped)
    return words


def check_output(step: Step, out: str, context: str) -> None:
    """Each line the doc shows is one the program printed: word for word, but for numbers and paths; a line the doc
    ends with `…` only as far as it goes."""
    lines = [_shape(line) for line in out.splitlines() if line.strip()]
    for shown in step.output:
        words = _shape(shown.split("  #", 1)[0])
        if not words:
            continue
        if words[-1] == "…":
            prefix = words[:-1]
            assert any(line[: len(prefix)] == prefix for line in lines), f"the doc shows `{shown}` — {context}"
        else:
            assert words in lines, f"the doc shows `{shown}` — {context}"


# ---------------------------------------------------------------- the tests


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as h:
        yield h


@pytest.fixture
def runner(home: Home, lms: Lms, smollm2_file: Path, hub: FakeHub) -> Iterator[Runner]:
    """The state a new user has after `lms get smollm2-135m-instruct` (the file is put in place beforehand: the
    step then checks its checksum instead of fetching 98 MB), with a Hugging Face Hub that has the repos the docs
    name."""
    home.add(smollm2_file, SMOLLM2_DEST)
    hub.add_repo("bartowski/Qwen2.5-0.5B-Instruct-GGUF",
                 {f"Qwen2.5-0.5B-Instruct-{q}.gguf": tiny_gguf(f"qwen-{q}") for q in ("Q4_K_M", "Q8_0")})
    run = Runner(home, free_port(), {"HF_ENDPOINT": hub.url, "HF_HOME": str(home.root / "hf-home"),
                                     "HF_HUB_DISABLE_TELEMETRY": "1"})
    downloads = Path(run.env["HOME"]) / "Downloads"  # what `lms import ~/Downloads/...` imports
    downloads.mkdir()
    os.symlink(smollm2_file, downloads / smollm2_file.name)
    yield run
    lms("daemon", "down")


def test_the_readme_tour_runs_step_by_step(runner: Runner) -> None:
    readme = (REPO / "README.md").read_text()
    start = readme.index("## A short tour")
    tour = readme[start : readme.index("\n## ", start + 1)]
    tour_steps = steps("README.md", tour, readme.count("\n", 0, start))
    assert len(tour_steps) >= 15
    for step in tour_steps:
        if step.runs:
            runner.run(step)
    for n, code in blocks(tour, "python"):
        runner.python(f"README.md tour, Python block {n}", code)


def test_every_cli_command_has_an_example_that_runs(runner: Runner) -> None:
    text = (REPO / "docs" / "cli.md").read_text()
    commands = [(heading, steps("docs/cli.md", body, offset)) for heading, body, offset in sections(text)
                if heading.startswith("## `lms") or heading == "## Shell completion"]
    assert len(commands) >= 14
    missing = [heading for heading, found in commands if not any(s.runs and s.program != "curl" for s in found)]
    assert not missing, f"sections of docs/cli.md without an example that runs: {missing}"
    for _heading, found in commands:
        for step in found:
            if step.runs:
                runner.run(step)


ENDPOINT = re.compile(r"^\| `((?:GET|POST) [^|]*?)` \|", re.MULTILINE)


def test_every_http_endpoint_has_an_example_that_runs(runner: Runner, lms: Lms) -> None:
    text = (REPO / "docs" / "http.md").read_text()
    endpoints = [e for row in ENDPOINT.findall(text) for e in _endpoints(row)]
    assert len(endpoints) >= 14
    examples = [s for s in steps("docs/http.md", text) if s.runs]
    requests = [_request(s) for s in examples if s.program == "curl"]
    missing = [f"{method} {path}" for method, path in endpoints
               if not any(method == m and re.fullmatch(re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(path)), p)
                          for m, p in requests)]
    assert not missing, f"endpoints of docs/http.md without a curl example: {missing}"
    # The examples start the endpoint on its default port, 1234 on a user's machine: here a free one.
    lms("server", "start", "--port", str(runner.port), check=True)
    lms("server", "stop", check=True)
    for step in examples:
        runner.run(step)
    for n, code in blocks(text, "python"):
        runner.python(f"docs/http.md, Python block {n}", code)


def _endpoints(row: str) -> list[tuple[str, str]]:
    """`GET /api/v0/models`, `GET /api/v0/models/{model}` -> both; `POST /a`, `/b` -> POST both."""
    found: list[tuple[str, str]] = []
    method = ""
    for part in re.split(r"`,\s*`", row):
        words = part.split()
        if words[0] in ("GET", "POST"):
            method, words = words[0], words[1:]
        found.append((method, words[0]))
    return found


def _request(step: Step) -> tuple[str, str]:
    words = shlex.split(step.command, comments=True)
    url = next(w for w in words if "localhost:" in w)
    method = "POST" if {"-d", "--data", "--json"} & set(words) else "GET"
    if "-X" in words:
        method = words[words.index("-X") + 1]
    return method, "/" + url.split("/", 1)[1].split("?")[0]
