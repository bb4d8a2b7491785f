"""`lms chat`: talk to a model from the terminal, over the control socket (the HTTP endpoint may be off).

With `-p` (or a prompt piped in) it prints one answer to stdout and exits, for scripts. Otherwise an interactive
session: the answer streams in, rendered as Markdown on a terminal; the history is kept for the next turn;
`/clear`, `/model NAME`, `/system TEXT`, `/help`, `/exit`. Ctrl-C stops the answer being written, not the
session; Ctrl-C or Ctrl-D at the prompt ends it.
"""

import sys
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer

from lmscli import completion
from lmscli.client import EXIT_USAGE, CliError, CtrlC, boundary, connect, describe_rpc_error
from lmscli.durations import ttl_callback
from lmscli.output import err, stderr, stdout

DEFAULT_TTL = 3600  # seconds, LM Studio's for `lms chat`
HELP = "/clear forgets the conversation · /model NAME switches model · /system TEXT sets the system prompt · " \
       "/exit ends (or Ctrl-D) · Ctrl-C stops an answer"


@dataclass
class Session:
    model: str
    system: str | None
    ttl: int
    stats: bool
    max_tokens: int | None
    history: list[tuple[str, str]] = field(default_factory=list)

    def messages(self, prompt: str) -> list[tuple[str, str]]:
        head = [("system", self.system)] if self.system else []
        return [*head, *self.history, ("user", prompt)]


def chat(
    model: Annotated[str, typer.Argument(help="The model: identifier, key or unique prefix (default: the only "
                                              "loaded one).", autocompletion=completion.chat_models)] = "",
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Answer this one prompt on stdout and "
                                                                     "exit.")] = None,
    system: Annotated[str | None, typer.Option("--system-prompt", "-s", help="A system prompt.")] = None,
    ttl: Annotated[str | None, typer.Option("--ttl", callback=ttl_callback, help="Idle TTL if the model gets "
                                                                                  "loaded: 90s, 5m, 1h (default "
                                                                                  "1h).")] = None,
    stats: Annotated[bool, typer.Option("--stats", help="Print tokens/s and time to first token after each "
                                                        "answer.")] = False,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", min=1, help="Stop each answer after this many "
                                                                               "tokens.")] = None,
) -> None:
    """Chat with a model in the terminal, or answer one prompt (-p) for scripts."""
    boundary(_chat)(model, prompt, system, ttl, stats, max_tokens)  # type: ignore[arg-type] # the callback: int


def _chat(model: str, prompt: str | None, system: str | None, ttl: int | None, stats: bool,
          max_tokens: int | None) -> None:
    session = Session(model.strip(), system, DEFAULT_TTL if ttl is None else ttl, stats, max_tokens)
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()  # `echo question | lms chat model`
    if prompt is not None:
        if not prompt.strip():
            raise CliError("the prompt is empty", EXIT_USAGE)
        _turn(session, prompt, markdown=False)
        return
    _interactive(session)


def _interactive(session: Session) -> None:
    import grpc

    err(f"Chatting with {session.model or 'the loaded model'}. {HELP}")
    while True:
        try:
            line = stderr.input("[bold]> [/bold]")
        except (EOFError, KeyboardInterrupt):
            stderr.print()
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, arg = text.partition(" ")
            if command in ("/exit", "/quit", "/bye"):
                return
            if command == "/clear":
                session.history.clear()
                err("Conversation cleared.")
            elif command == "/model":
                if not arg.strip():
                    err(f"The model is {session.model or 'the only loaded one'}; /model NAME switches.")
                else:
                    session.model = arg.strip()
                    err(f"Now chatting with {session.model}.")
            elif command == "/system":
                session.system = arg.strip() or None
                err("System prompt " + ("set." if session.system else "cleared."))
            elif command == "/help":
                err(HELP)
            else:
                err(f"unknown command {command}. {HELP}")
            continue
        try:
            _turn(session, line, markdown=stdout.is_terminal)
        except CliError as exc:  # one failed turn (model unknown, load refused) does not end the session
            err(exc.message)
        except grpc.RpcError as exc:
            err(describe_rpc_error(exc)[0])


def _turn(session: Session, prompt: str, *, markdown: bool) -> None:
    """Sends one turn, streams the answer, adds both to the history (an interrupted answer as far as it got)."""
    import grpc

    from lmsd.api.v1 import control_pb2 as pb

    request = pb.ChatRequest(model=session.model, ttl_seconds=session.ttl,
                             messages=[pb.ChatMessage(role=r, content=c) for r, c in session.messages(prompt)])
    if session.max_tokens is not None:
        request.max_tokens = session.max_tokens
    client = connect()
    parts: list[str] = []
    done: Any = None
    live = _live() if markdown else None
    with CtrlC() as ctrl_c:
        try:
            for event in ctrl_c.watch(client.stub.Chat(request)):
                if event.HasField("done"):
                    done = event.done
                else:
                    parts.append(event.text)
                    if live is not None:
                        live.update("".join(parts))
                    else:
                        stdout.file.write(event.text)
                        stdout.file.flush()
        except grpc.RpcError:
            if not ctrl_c.pressed:
                if live is not None:
                    live.stop()
                raise
    if ctrl_c.pressed:  # the call was cancelled: the daemon stops the generation and frees the slot
        if live is not None:
            live.stop()
            live.final("".join(parts))
        stdout.file.write("\n")
        err("(stopped)")
        session.history += [("user", prompt), ("assistant", "".join(parts))]
        return
    if live is not None:
        live.stop()
        live.final("".join(parts))
    else:
        stdout.file.write("\n")
        stdout.file.flush()
    session.history += [("user", prompt), ("assistant", "".join(parts))]
    if done is not None and not session.model:
        session.model = done.identifier  # the one it picked: later turns stay with it
    if session.stats and done is not None:
        err(f"{done.completion_tokens} tokens, {done.tokens_per_second:.1f} tok/s, time to first token "
            f"{done.time_to_first_token * 1000:.0f} ms, {done.prompt_tokens} prompt tokens ({done.identifier}, "
            f"{done.finish_reason})")


class _live:
    """The answer as Markdown, redrawn as it grows (Rich Live; what does not fit the screen yet is cut off while it
    streams), then printed whole once it is complete."""

    def __init__(self) -> None:
        from rich.live import Live

        self._live = Live(console=stdout.console, refresh_per_second=12, vertical_overflow="crop", transient=True)
        self._live.start()

    def update(self, text: str) -> None:
        from rich.markdown import Markdown

        self._live.update(Markdown(text))

    def stop(self) -> None:
        self._live.stop()

    def final(self, text: str) -> None:
        from rich.markdown import Markdown

        stdout.print(Markdown(text))
