"""The root `lms` command. Each group lives in lmscli/commands/; imports there stay lazy."""

from __future__ import annotations

import typer

from lmscli.commands import daemon, log, models, server

app = typer.Typer(
    name="lms",
    help="Drive lmsd, the local model server: load models with idle TTLs, serve them over HTTP.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(daemon.app, name="daemon")
app.add_typer(server.app, name="server")
app.add_typer(log.app, name="log")
models.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
