"""`lms server ...`: the daemon's settings (and, with the HTTP endpoint, start/stop/status)."""

from __future__ import annotations

from typing import Annotated

import typer

from lmscli.client import boundary, connect
from lmscli.durations import ttl_callback
from lmscli.output import err, print_json, print_settings, settings_json

app = typer.Typer(help="The HTTP endpoint and the daemon's settings.", no_args_is_help=True)


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
    changed = request.ListFields()
    result = client.stub.UpdateSettings(request, timeout=10) if changed else client.stub.GetSettings(
        pb.GetSettingsRequest(), timeout=10)
    if changed:
        err("settings saved")
    if as_json:
        print_json(settings_json(result))
    else:
        print_settings(result)
