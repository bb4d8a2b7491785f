"""DaemonClient: the CLI's one way to reach lmsd — deadlines, autostart, and the one error boundary.

Transport and daemon errors become one sentence on stderr and an exit code here; no command prints a
traceback. Exit codes: 0 success, 1 the operation failed, 2 bad usage, 3 daemon not reachable.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from lmscli.output import err
from lmsd.config import Paths

if TYPE_CHECKING:
    from lmsd.api.v1.control_pb2_grpc import ControlStub

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3
START_TIMEOUT = 60.0
EXIT_ALREADY_RUNNING = 4  # lmsd's exit code when another daemon holds the LMS_HOME lock

P = ParamSpec("P")
R = TypeVar("R")


class CliError(Exception):
    """Ends the command with `message` on stderr and `exit_code`."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def boundary(fn: Callable[P, R]) -> Callable[P, R]:
    """Wraps a command: CliError and gRPC errors become a message and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        import typer

        try:
            return fn(*args, **kwargs)
        except CliError as exc:
            err(exc.message)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the boundary: translate, never show a traceback
            import grpc

            if isinstance(exc, grpc.RpcError):
                message, code = describe_rpc_error(exc)
                err(message)
                raise typer.Exit(code) from None
            if isinstance(exc, typer.Exit):
                raise
            err(f"error: {type(exc).__name__}: {exc}")
            raise typer.Exit(EXIT_FAILED) from None

    return wrapper


def describe_rpc_error(exc: Any) -> tuple[str, int]:
    import grpc

    code = exc.code()
    details = exc.details() or str(code)
    if code == grpc.StatusCode.UNAVAILABLE and ("connect" in details.lower() or "socket" in details.lower()):
        return ("lmsd stopped answering (" + details + "). Check `lms daemon status`; its log is "
                f"{Paths.from_env().log_file}", EXIT_UNREACHABLE)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "lmsd did not answer in time; it may be overloaded. Check `lms daemon status`.", EXIT_UNREACHABLE
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return details, EXIT_USAGE
    return details, EXIT_FAILED


def probe(paths: Paths) -> str:
    """'running', 'absent' (no socket file) or 'refused' (a socket file nobody listens on)."""
    if not paths.socket.exists():
        return "absent"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(str(paths.socket))
        return "running"
    except OSError:
        return "refused"
    finally:
        s.close()


class DaemonClient:
    def __init__(self, paths: Paths | None = None) -> None:
        self.paths = paths or Paths.from_env()
        self._stub: ControlStub | None = None
        self._channel: Any = None
        self.started_here = False  # set by start()

    @property
    def stub(self) -> ControlStub:
        if self._stub is None:
            import grpc

            from lmsd.api.v1.control_pb2_grpc import ControlStub

            self._channel = grpc.insecure_channel(
                f"unix:{self.paths.socket}", options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
            )
            self._stub = ControlStub(self._channel)
        return self._stub

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    # ---------------------------------------------------------------- reaching the daemon

    def healthy(self, timeout: float = 2.0) -> bool:
        if probe(self.paths) != "running":
            return False
        import grpc

        from lmsd.api.v1 import control_pb2 as pb

        try:
            return self.stub.Health(pb.HealthRequest(), timeout=timeout).status == "ok"
        except grpc.RpcError:
            return False

    def ensure(self) -> DaemonClient:
        """Makes sure a daemon answers, starting one unless LMS_NO_AUTOSTART=1."""
        if self.healthy():
            return self
        state = probe(self.paths)
        if os.environ.get("LMS_NO_AUTOSTART") == "1":
            why = ("its socket is there but nobody answers (did it crash?)" if state == "refused"
                   else "it is not running")
            raise CliError(
                f"cannot reach lmsd at {self.paths.socket}: {why}. Start it with `lms daemon up` "
                "(autostart is off because LMS_NO_AUTOSTART=1).",
                EXIT_UNREACHABLE,
            )
        err("lmsd is not running; starting it…")
        self.start()
        return self

    def start(self) -> int:
        """Starts lmsd detached and returns once it is healthy; returns its pid. `started_here` then says whether
        it is the one this call started (two `lms daemon up` at once: one of them starts it, the other finds it)."""
        self.paths.log_dir.mkdir(parents=True, exist_ok=True)
        out_path = self.paths.log_dir / "lmsd.out"
        with open(out_path, "ab") as out:
            proc = subprocess.Popen(
                # -P: the current folder is not put on sys.path (a folder named lmsd there must not shadow
                # the package); the daemon runs from LMS_HOME, so it holds no user folder busy.
                [sys.executable, "-P", "-m", "lmsd"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=self.paths.home,
                start_new_session=True, close_fds=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.healthy(timeout=1.0):
                pid = self.pid() or proc.pid
                self.started_here = pid == proc.pid
                return pid
            code = proc.poll()
            if code is not None and code != EXIT_ALREADY_RUNNING:
                raise CliError(
                    f"lmsd exited at start-up with code {code}. See {out_path} and {self.paths.log_file}.",
                    EXIT_UNREACHABLE,
                )
            time.sleep(0.05)
        raise CliError(f"lmsd did not become healthy within {START_TIMEOUT:.0f}s; see {self.paths.log_file}",
                       EXIT_UNREACHABLE)

    def pid(self) -> int | None:
        try:
            return int(self.paths.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None


def models_dir() -> Path:
    """The models folder the daemon scans: asked of a running daemon (it read LMS_MODELS_DIR when it started,
    and this shell's may differ), else where this environment says a daemon started now would look."""
    from lmsd.api.v1 import control_pb2 as pb

    client = DaemonClient()
    if client.healthy(timeout=2.0):
        import grpc

        try:
            theirs = Path(client.stub.ListModels(pb.ListModelsRequest(), timeout=30).models_dir)
        except grpc.RpcError:
            theirs = None
        if theirs is not None:
            ours = client.paths.models
            if theirs != ours:
                from lmscli.output import err

                err(f"note: the running lmsd uses the models folder {theirs} (not {ours}, which LMS_MODELS_DIR here "
                    "says); using the daemon's")
            return theirs
    return client.paths.models


def connect() -> DaemonClient:
    """A client to a healthy daemon (autostarted if needed)."""
    return DaemonClient().ensure()


class CtrlC:
    """Ctrl-C during a streaming call cancels the call. Left to Python, the KeyboardInterrupt can be raised inside
    gRPC while the call is being set up, be lost there, and the stream waits on (`lms log stream` hung so). Used as
    `with CtrlC() as ctrl_c: call = ctrl_c.watch(stub.X(...))`; the call then ends with a CANCELLED RpcError, and
    `ctrl_c.pressed` says why."""

    def __init__(self) -> None:
        self.pressed = False
        self._call: Any = None
        self._previous: Any = None

    def __enter__(self) -> CtrlC:
        import signal

        self._previous = signal.signal(signal.SIGINT, self._on_interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        signal.signal(signal.SIGINT, self._previous)

    def _on_interrupt(self, _signum: int, _frame: object) -> None:
        self.pressed = True
        if self._call is not None:
            self._call.cancel()

    def watch(self, call: Any) -> Any:
        self._call = call
        if self.pressed:  # pressed while the call was being made
            call.cancel()
        return call
