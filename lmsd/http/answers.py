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


async def stream(inference: Inference, gen: Generation,
                 names: set[str]) -> AsyncIterator[str | tools.ToolCall | HttpError]:
    """The answer as it comes: text pieces, then the calls (once each is complete); an HttpError ends it."""
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
        for call in calls:
            yield call


def finish_reason(gen: Generation, calls: bool) -> str:
    return "tool_calls" if calls else str(gen.done.get("finish_reason", "stop"))
