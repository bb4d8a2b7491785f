"""`lms server ...`: the daemon's settings (and, with the HTTP endpoint, start/stop/status)."""

from typing import Annotated

import typer

from lmscli.client import EXIT_USAGE, CliError, boundary, connect
from lmscli.durations import ttl_callback
from lmscli.output import err, http_json, print_http, print_json, print_settings, settings_json

app = typer.Typer(help="The HTTP endpoint and the daemon's settings.", no_args_is_help=True)


def _memory_limit(value: str | None) -> str | None:
    """A bad --memory-limit is a usage error (exit 2) that says what is allowed."""
    if value is None:
        return None
    from lmsd.memory import parse_memory_limit

    try:
        return str(parse_memory_limit(value))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command()
@boundary
def settings(
    jit: Annotated[bool | None, typer.Option("--jit/--no-jit", help="Load models just in time on request.")] = None,
    auto_evict: Annotated[
        bool | None, typer.Option("--auto-evict/--no-auto-evict", help="Unload other JIT models before a JIT load.")
    ] = None,
    default_ttl: Annotated[
        str | None,
        typer.Option("--default-ttl", callback=ttl_callback, help="Idle TTL of JIT loads, e.g. 600, 10m, 1h."),
    ] = None,
    memory_limit: Annotated[
        str | None,
        typer.Option("--memory-limit", callback=_memory_limit,
                     help="Memory budget of all loaded models: auto, off, or a size such as 6GB, 512MiB."),
    ] = None,
    max_loaded: Annotated[
        int | None, typer.Option("--max-loaded", min=0, max=10000, help="At most N models loaded (0: no limit).")
    ] = None,
    load_timeout: Annotated[
        str | None,
        typer.Option("--load-timeout", callback=ttl_callback, help="Kill a load without progress this long: 5m."),
    ] = None,
    max_wait: Annotated[
        str | None,
        typer.Option("--max-wait", callback=ttl_callback, help="How long a request may wait for its model: 5m."),
    ] = None,
    default_parallel: Annotated[
        int | None, typer.Option("--default-parallel", min=1, max=64,
                                 help="Requests one model decodes together, for loads that do not say (JIT too).")
    ] = None,
    api_key_set: Annotated[
        bool, typer.Option("--api-key-set", help="Require an API key for HTTP; reads it from stdin or a prompt.")
    ] = False,
    api_key_clear: Annotated[bool, typer.Option("--api-key-clear", help="Stop requiring an API key.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show the settings; the options change them at once, persistently."""
    from lmsd.api.v1 import control_pb2 as pb

    client = connect()
    request = pb.UpdateSettingsRequest()
    if jit is not None:
        request.jit = jit
    if auto_evict is not None:
        request.auto_evict = auto_evict
    if default_ttl is not None:
        request.default_ttl = int(default_ttl)
    if memory_limit is not None:
        request.memory_limit = memory_limit
    if max_loaded is not None:
        request.max_loaded_models = max_loaded
    if load_timeout is not None:
        request.load_timeout = int(load_timeout)
    if max_wait is not None:
        request.max_wait = int(max_wait)
    if default_parallel is not None:
        request.default_parallel = default_parallel
    if api_key_set and api_key_clear:
        raise CliError("--api-key-set and --api-key-clear contradict each other", EXIT_USAGE)
    if api_key_set:
        request.api_key = _read_api_key()
    if api_key_clear:
        request.api_key = ""
    changed = request.ListFields()
    result = client.stub.UpdateSettings(request, timeout=10) if changed else client.stub.GetSettings(
        pb.GetSettingsRequest(), timeout=10)
    if changed:
        err("settings saved")
    if as_json:
        print_json(settings_json(result))
    else:
        print_settings(result)


def _read_api_key() -> str:
    """The key from a hidden prompt on a terminal, else the first line of stdin: never from argv (ps shows it)."""
    import sys

    if sys.stdin.isatty():
        import getpass

        key = getpass.getpass("API key: ")
    else:
        key = sys.stdin.readline()
    key = key.strip()
    if not key:
        raise CliError("no API key given (type it at the prompt, or pipe it on stdin)", EXIT_USAGE)
    return key


@app.command()
@boundary
def start(
    port: Annotated[int | None, typer.Option("--port", "-p", min=1, max=65535, help="TCP port (default 1234).")] = None,
    bind: Annotated[str | None, typer.Option("--bind", help="Address to listen on (default 127.0.0.1).")] = None,
    cors: Annotated[bool | None, typer.Option("--cors/--no-cors", help="Answer cross-origin requests.")] = None,
) -> None:
    """Start the HTTP endpoint (OpenAI-compatible /v1 and LM Studio /api/v0); remembered across restarts."""
    from lmsd.api.v1 import control_pb2 as pb

    request = pb.ServerStartRequest()
    if port is not None:
        request.port = port
    if bind is not None:
        request.bind = bind
    if cors is not None:
        request.cors = cors
    status = connect().stub.ServerStart(request, timeout=30)
    err(f"HTTP endpoint listening on {status.url} (cors {'on' if status.cors else 'off'}"
        f"{', API key required' if status.api_key_set else ''})")
    if status.bind not in ("127.0.0.1", "localhost", "::1"):
        err(f"warning: bound to {status.bind}: other machines on the network can reach it"
            + ("" if status.api_key_set else " and no API key is set (lms server settings --api-key-set)"))


@app.command()
@boundary
def stop() -> None:
    """Stop the HTTP endpoint (loaded models stay loaded)."""
    from lmsd.api.v1 import control_pb2 as pb

    connect().stub.ServerStop(pb.ServerStopRequest(), timeout=30)
    err("HTTP endpoint stopped")


@app.command()
@boundary
def status(as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False) -> None:
    """Say whether the HTTP endpoint runs, and where."""
    from lmsd.api.v1 import control_pb2 as pb

    result = connect().stub.GetServerStatus(pb.ServerStatusRequest(), timeout=10)
    if as_json:
        print_json(http_json(result))
    else:
        print_http(result)
