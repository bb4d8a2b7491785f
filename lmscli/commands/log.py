"""`lms log stream`: follow the daemon's lifecycle events and requests as they happen."""

import signal
import sys
from typing import Annotated, Any

import typer

from lmscli.client import EXIT_UNREACHABLE, EXIT_USAGE, CliError, boundary, connect
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
    # Ctrl-C cancels the call. A KeyboardInterrupt raised inside gRPC while the call is being set up can be lost
    # there, and the stream then waits on; cancelling always ends it.
    interrupted = False
    call: Any = None

    def on_interrupt(_signum: int, _frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        if call is not None:
            call.cancel()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        call = client.stub.WatchEvents(pb.WatchEventsRequest())
        if interrupted:
            call.cancel()
        print("streaming lmsd events (Ctrl-C to stop)", file=sys.stderr, flush=True)
        for event in call:
            if event.kind not in kinds:
                continue
            line = json.dumps(event_json(event)) if as_json else event_line(event)
            print(line, flush=True)
    except grpc.RpcError as exc:
        if interrupted:
            raise KeyboardInterrupt from None
        # The daemon ends every stream when it shuts down (with UNAVAILABLE, CANCELLED or ABORTED).
        if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED):
            raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt
    raise CliError("lmsd stopped; the event stream ended", EXIT_UNREACHABLE)
