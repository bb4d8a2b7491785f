"""A chat answer as the agent APIs take it: text and tool calls, whole or as a stream. Shared by
/v1/chat/completions (openai.py), /v1/responses (responses.py) and /v1/messages (anthropic.py), which differ only
in how they shape it."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request

from lmsd import tools
from lmsd.http.errors import HttpError
from lmsd.http.inference import Generation, Inference


async def collect(request: Request, inference: Inference, gen: Generation,
                  names: set[str]) -> tuple[str, list[tools.ToolCall]]:
    """The whole answer: its text, and the calls it makes when the request offered functions (`names`)."""
    text = await inference.collect(request, gen)
    return tools.parse(text, gen.done.get("tool_format", "generic"), names) if names else (text, [])


async def stream(inference: Inference, gen: Generation, names: set[str],
                 forced: bool = False) -> AsyncIterator[str | tools.CallPart | HttpError]:
    """The answer as it comes: text pieces and the parts of its calls; an HttpError ends it. A forced call
    (`forced`: the grammar makes the answer one) streams its arguments as they are decoded; a call the model chose
    to make is held until it is complete and checked, so that malformed output is still sent as text."""
    if forced:
        reader = tools.ForcedStream()
        async for piece in inference.tokens(gen):
            if isinstance(piece, HttpError):
                yield piece
                return
            for part in reader.feed(piece):
                yield part
        rest, ends = reader.finish()
        if rest:
            yield rest
        for part in ends:
            yield part
        return
    held = tools.ToolStream() if names else None
    async for piece in inference.tokens(gen):
        if isinstance(piece, HttpError):
            yield piece
            return
        text = held.feed(piece) if held is not None else piece
        if text:
            yield text
    if held is not None:
        rest, calls = held.finish(gen.done.get("tool_format", "generic"), names)
        if rest:
            yield rest
        for index, call in enumerate(calls):
            for part in tools.parts(index, call):
                yield part


def finish_reason(gen: Generation, calls: bool) -> str:
    """`tool_calls` when the answer made (complete) calls, else why it stopped."""
    return "tool_calls" if calls else str(gen.done.get("finish_reason", "stop"))
