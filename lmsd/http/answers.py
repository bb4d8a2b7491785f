"""A chat answer as the agent APIs take it: text and tool calls, whole or as a stream. Shared by
/v1/chat/completions (openai.py), /v1/responses (responses.py) and /v1/messages (anthropic.py), which differ only
in how they shape it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from lmsd import tools
from lmsd.http.errors import HttpError
from lmsd.http.inference import Generation, Inference
from lmsd.http.schemas import ChatRequest

log = logging.getLogger(__name__)


def omitted(kind: str) -> str:
    """What a text model reads in place of an image or a file a tool returned (a screenshot an agent took): the
    result stays in the conversation, so refusing it would refuse every later turn of the agent's session."""
    return f"[{kind} omitted: this model reads text only]"


async def collect(request: Request, inference: Inference, gen: Generation,
                  chat: ChatRequest) -> tuple[str, list[tools.ToolCall]]:
    """The whole answer: its text, and the calls it makes when the request offered functions."""
    text = await inference.collect(request, gen)
    names = _offered(chat)
    if not names:
        return text, []
    content, calls = tools.parse(text, gen.done.get("tool_format", "generic"), names)
    return content, _allowed(calls, chat)


def _offered(chat: ChatRequest) -> dict[str, Any]:
    """The functions the answer may call, by name, with their parameters' schemas (they type XML calls' values)."""
    return {f.name: f.parameters for f in chat.functions}


def _allowed(calls: list[tools.ToolCall], chat: ChatRequest) -> list[tools.ToolCall]:
    """With `parallel_tool_calls: false` (Anthropic: `disable_parallel_tool_use`), only the first of several calls
    the model made on its own (a forced one is single by its grammar)."""
    if chat.parallel_tool_calls is False and len(calls) > 1:
        log.info("the model made %d calls where the request allows one: the first is answered", len(calls))
        return calls[:1]
    return calls


@dataclass
class Told:
    """What a streamed answer's calls came to, for its finish reason (filled in by `stream`)."""

    calls: int = 0  # calls sent whole
    cut: bool = False  # max_tokens cut the answer inside its calls: what was sent of them is not all


async def stream(inference: Inference, gen: Generation, chat: ChatRequest,
                 told: Told) -> AsyncIterator[str | tools.CallPart | HttpError]:
    """The answer as it comes: text pieces and the parts of its calls; an HttpError ends it. A forced call
    (`chat.forced`: the grammar makes the answer one) streams its arguments as they are decoded; a call the model chose
    to make is held until it is complete and checked, so that malformed output is still sent as text."""
    async for part in _parts(inference, gen, chat, told):
        if isinstance(part, tools.CallPart) and part.last:
            told.calls += part.call.complete
            told.cut = told.cut or not part.call.complete
        yield part


async def _parts(inference: Inference, gen: Generation, chat: ChatRequest,
                 told: Told) -> AsyncIterator[str | tools.CallPart | HttpError]:
    names = _offered(chat)
    if chat.forced:
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
        told.cut = told.cut or reader.cut  # also between calls: the ones sent are whole, but not all there were
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
        for index, call in enumerate(_allowed(calls, chat)):
            for part in tools.parts(index, call):
                yield part


def finish_reason(gen: Generation, calls: bool, cut: bool = False) -> str:
    """`tool_calls` when the answer made calls, `length` when max_tokens cut them short, else why it stopped."""
    return "length" if cut else "tool_calls" if calls else str(gen.done.get("finish_reason", "stop"))
