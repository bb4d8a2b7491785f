"""`lms log stream`: follow the daemon's lifecycle events and requests as they happen."""

import sys
from typing import Annotated

import typer

from lmscli.client import EXIT_UNREACHABLE, EXIT_USAGE, CliError, CtrlC, boundary, connect
from lmscli.output import event_json, event_line

app = typer.Typer(help="Follow what the daemon does.", no_args_is_help=True)


# What each --filter word selects, and which words each --source means (LM Studio's: model or server).
KINDS = {"load": {"loaded", "load_failed"}, "unload": {"unloaded", "crashed"}, "request": {"request"},
         "settings": {"settings"}, "server": {"server"}}
SOURCES = {"model": {"load", "unload", "request"}, "server": {"settings", "server"}}


@app.command()
@boundary
def stream(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line, for scripts.")] = False,
    source: Annotated[str | None, typer.Option("--source", help="model (loads, unloads, requests) or server "
                                                                "(settings, the HTTP endpoint).")] = None,
    filter_: Annotated[str | None, typer.Option("--filter", help="Comma-separated: load, unload, request, "
                                                                 "settings, server.")] = None,
) -> None:
    """Print loads, unloads (with the reason: ttl, evict, manual, crash), one line per request (refused ones too),
    settings changes and the HTTP endpoint starting or stopping."""
    import json

    import grpc

    from lmsd.api.v1 import control_pb2 as pb

    words = set(KINDS)
    if source is not None:
        if source not in SOURCES:
            raise CliError(f"--source is model or server, not '{source}'", EXIT_USAGE)
        words &= SOURCES[source]
    if filter_ is not None:
        asked = {w.strip() for w in filter_.split(",") if w.strip()}
        unknown = asked - set(KINDS)
        if unknown or not asked:
            raise CliError(f"--filter takes {', '.join(KINDS)} (comma-separated), not '{filter_}'", EXIT_USAGE)
        words &= asked
    kinds = set().union(*(KINDS[w] for w in words)) if words else set()
    client = connect()
    with CtrlC() as ctrl_c:
        try:
            call = ctrl_c.watch(client.stub.WatchEvents(pb.WatchEventsRequest()))
            print("streaming lmsd events (Ctrl-C to stop)", file=sys.stderr, flush=True)
            for event in call:
                if event.kind not in kinds:
                    continue
                line = json.dumps(event_json(event)) if as_json else event_line(event)
                print(line, flush=True)
        except grpc.RpcError as exc:
            # The daemon ends every stream when it shuts down (with UNAVAILABLE, CANCELLED or ABORTED).
            if not ctrl_c.pressed and exc.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                                     grpc.StatusCode.UNIMPLEMENTED):
                raise
    if ctrl_c.pressed:
        raise KeyboardInterrupt
    raise CliError("lmsd stopped; the event stream ended", EXIT_UNREACHABLE)
