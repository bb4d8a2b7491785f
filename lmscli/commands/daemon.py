"""`lms daemon up|down|status|install-service`: the lmsd process itself."""

import os
import time
from typing import Annotated

import typer

from lmscli.client import EXIT_UNREACHABLE, CliError, DaemonClient, boundary, probe
from lmscli.output import err, format_duration, http_json, print_json, stdout

app = typer.Typer(help="Start, stop and inspect the lmsd daemon.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


@app.command()
@boundary
def up() -> None:
    """Start lmsd in the background; returns once it answers."""
    client = DaemonClient()
    if client.healthy():
        err(f"lmsd is already running (pid {client.pid()})")
        return
    pid = client.start()
    if client.started_here:
        err(f"lmsd started (pid {pid}); socket {client.paths.socket}")
    else:  # another `lms daemon up` (or an autostart) won the race
        err(f"lmsd is already running (pid {pid})")


@app.command()
@boundary
def down(
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a clean stop.")] = 30.0,
) -> None:
    """Stop lmsd gracefully: running requests finish, models are unloaded, workers end."""
    from lmsd.api.v1 import control_pb2 as pb

    client = DaemonClient()
    if not client.healthy():
        err("lmsd is not running")
        return
    pid = client.pid()
    client.stub.Shutdown(pb.ShutdownRequest(), timeout=10)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid) and probe(client.paths) == "absent":
            err("lmsd stopped")
            return
        time.sleep(0.05)
    raise CliError(f"lmsd (pid {pid}) did not stop within {timeout:.0f}s")


@app.command()
@boundary
def status(as_json: JsonOpt = False) -> None:
    """Say whether lmsd runs, with its pid, uptime and loaded models."""
    client = DaemonClient()
    data = daemon_status(client, as_json)
    if as_json:
        print_json(data)
        return
    stdout.print(describe(data), markup=False)


def daemon_status(client: DaemonClient, as_json: bool) -> dict[str, object]:
    """The daemon's state; when it is not running, says so (as JSON too) and exits 3."""
    from lmsd.api.v1 import control_pb2 as pb

    if not client.healthy():
        state = probe(client.paths)
        why = "its socket exists but nobody answers" if state == "refused" else "not running"
        if as_json:
            print_json({"running": False, "reason": why, "socket": str(client.paths.socket)})
        else:
            err(f"lmsd is {why} ({client.paths.socket}). Start it with `lms daemon up`.")
        raise typer.Exit(EXIT_UNREACHABLE)
    health = client.stub.Health(pb.HealthRequest(), timeout=5)
    version = client.stub.Version(pb.VersionRequest(), timeout=5)
    http = client.stub.GetServerStatus(pb.ServerStatusRequest(), timeout=5)
    return {
        "running": True,
        "pid": health.pid,
        "uptime_seconds": round(health.uptime_seconds, 1),
        "loaded": health.loaded,
        "version": version.version,
        "llama_cpp_python": version.llama_cpp_python,
        "socket": str(client.paths.socket),
        "lms_home": health.lms_home,
        "http": http_json(http),
    }


def describe(data: dict[str, object]) -> str:
    http = data["http"]
    assert isinstance(http, dict) and isinstance(data["uptime_seconds"], float | int)
    return (f"lmsd {data['version']} is running (pid {data['pid']}, up {format_duration(data['uptime_seconds'])}, "
            f"{data['loaded']} model(s) loaded)\nsocket {data['socket']}\n"
            + (f"HTTP endpoint {http['url']}" if http.get("running") else "HTTP endpoint stopped (lms server start)"))


UNIT = """\
# lmsd as a systemd user service, written by `lms daemon install-service`.
[Unit]
Description=lmsd, the lms local model server
After=network.target

[Service]
Type=simple
ExecStart={exe}
{environment}Restart=on-failure
RestartSec=2
# SIGTERM drains: running requests finish, models unload, workers end
KillSignal=SIGTERM
TimeoutStopSec=90

[Install]
WantedBy=default.target
"""


def unit_text() -> str:
    """The unit for this installation: this lmsd, and the LMS_HOME / LMS_MODELS_DIR the caller runs with."""
    import shlex
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "lmsd"
    env = "".join(f"Environment={shlex.quote(f'{k}={os.environ[k]}')}\n"
                  for k in ("LMS_HOME", "LMS_MODELS_DIR") if os.environ.get(k))
    return UNIT.format(exe=shlex.quote(str(exe)), environment=env)


@app.command("install-service")
@boundary
def install_service(
    print_only: Annotated[bool, typer.Option("--print", help="Print the unit; write nothing.")] = False,
) -> None:
    """Write a systemd user unit (~/.config/systemd/user/lmsd.service) so lmsd starts at login and restarts if
    it fails; prints how to enable it."""
    from pathlib import Path

    text = unit_text()
    if print_only:
        stdout.print(text, markup=False, end="")
        return
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    path = config / "systemd" / "user" / "lmsd.service"
    from lmsd.config import write_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, text)
    stdout.print(str(path), markup=False)
    err("Enable it (and stop a daemon started by hand first: `lms daemon down`):\n"
        "  systemctl --user daemon-reload && systemctl --user enable --now lmsd\n"
        "To keep it running after you log out: loginctl enable-linger $USER")


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
