"""`lms log stream`: follow the daemon's lifecycle events and requests as they happen."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from lmscli.client import EXIT_UNREACHABLE, CliError, boundary, connect
from lmscli.output import event_json, event_line

app = typer.Typer(help="Follow what the daemon does.", no_args_is_help=True)


@app.command()
@boundary
def stream(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line, for scripts.")] = False,
) -> None:
    """Print loads, unloads (with the reason: ttl, evict, manual, crash) and one line per request."""
    import json

    import grpc

    from lmsd.api.v1 import control_pb2 as pb

    client = connect()
    print("streaming lmsd events (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        for event in client.stub.WatchEvents(pb.WatchEventsRequest()):
            line = json.dumps(event_json(event)) if as_json else event_line(event)
            print(line, flush=True)
    except grpc.RpcError as exc:
        # The daemon ends every stream when it shuts down (with UNAVAILABLE, CANCELLED or ABORTED).
        if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED):
            raise
    raise CliError("lmsd stopped; the event stream ended", EXIT_UNREACHABLE)
