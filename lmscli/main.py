"""The root `lms` command. Each group lives in lmscli/commands/; imports there stay lazy."""

from __future__ import annotations

import typer

from lmscli.commands import chat, daemon, log, models, server

app = typer.Typer(
    name="lms",
    help="Drive lmsd, the local model server: load models with idle TTLs, serve them over HTTP.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh and fish
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(daemon.app, name="daemon")
app.add_typer(server.app, name="server")
app.add_typer(log.app, name="log")
models.register(app)
app.command("chat")(chat.chat)


def _version(value: bool) -> None:
    if value:
        from lmsd import __version__

        print(f"lms {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                       callback=_version)) -> None:
    """Drive lmsd, the local model server: load models with idle TTLs, serve them over HTTP."""


@app.command("status")
def status(as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")) -> None:
    """Everything at a glance: the daemon, the HTTP endpoint, the loaded models and memory."""
    from lmscli.client import boundary

    boundary(_status)(as_json)


def _status(as_json: bool) -> None:
    from lmscli.client import DaemonClient
    from lmscli.commands.daemon import daemon_status, describe
    from lmscli.output import instance_json, print_instances, print_json, stdout
    from lmsd.api.v1 import control_pb2 as pb

    client = DaemonClient()
    data = daemon_status(client, as_json)
    loaded = client.stub.ListLoaded(pb.ListLoadedRequest(), timeout=10)
    if as_json:
        print_json({"daemon": data, "loaded": [instance_json(i) for i in loaded.instances]})
        return
    stdout.print(describe(data) + "\n", markup=False)
    print_instances(list(loaded.instances), loaded.memory)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
