"""The root `lms` command. Each group lives in lmscli/commands/; imports there stay lazy."""

from typing import Any

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


class _AsIs:
    """Typer's coercion of a value it would return unchanged, without building it: nothing (None; () for a multiple
    parameter), or a parameter's own default of its own plain type."""

    @staticmethod
    def coerce(value: object, param: Any, ctx: object) -> object:
        if value is None:
            return () if param.multiple or param.nargs == -1 else None
        return value


def _needs_no_coercion(param: Any, value: object) -> bool:
    if value is None:
        return True
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    return value is param.default and type(value) in (bool, int, float, str) and type(value) is annotation


def _coerce_defaults_cheaply() -> None:
    """Typer (0.2x) coerces every parameter through a pydantic TypeAdapter that it builds on first use, even a
    parameter that was not given (its own --help, --install-completion and --show-completion, on every call; a
    default such as `--grace 10.0`): that imports pydantic, about 200 ms on every `lms ps` and every Tab. For those
    values Typer's coercion returns the value unchanged, so it is answered here without building the adapter; a
    value a user gave is coerced (and checked) by Typer as always. Where Typer has no such lazy coercion (before
    0.2x, or changed), this does nothing and Typer works as it does."""
    param_class = getattr(typer.core, "_TyperParameter", None)
    if param_class is None or not hasattr(param_class, "get_runtime_param"):
        return
    process_value = param_class.process_value

    def process(self: Any, ctx: object, value: object) -> object:
        if getattr(self, "_runtime_param", False) is not None or not _needs_no_coercion(self, value):
            return process_value(self, ctx, value)
        self._runtime_param = _AsIs
        try:
            return process_value(self, ctx, value)
        finally:
            self._runtime_param = None

    param_class.process_value = process


def main() -> None:
    _coerce_defaults_cheaply()
    app()


if __name__ == "__main__":
    main()
