"""Anthropic's Messages API, `POST /v1/messages`, on top of the chat path (the same template, tools, JIT, TTL), for
clients built on the `anthropic` SDK.

`system` (a string or text blocks) and `messages` (text, `tool_use` and `tool_result` blocks) become chat
messages; `tools` (`name`, `description`, `input_schema`), `tool_choice` (`auto`, `any`, `tool`, `none`),
`max_tokens`, `stop_sequences`, `temperature`, `top_p` and `top_k` map to their chat equivalents. The answer is
`content` blocks (`text`, then one `tool_use` per call) with `stop_reason` (`end_turn`, `max_tokens`,
`stop_sequence`, `tool_use`), streamed as Anthropic's events. Errors have Anthropic's shape
(`{"type": "error", "error": {"type", "message"}}`, lmsd/http/errors.py); the API key is also taken from
`x-api-key`. Images and documents are refused with a 400 that says so.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from lmsd import tools
from lmsd.http import answers
from lmsd.http.errors import HttpError, anthropic_error
from lmsd.http.inference import CleanupStreamingResponse, Generation, Inference
from lmsd.http.parsing import read_json, renamed, validate
from lmsd.http.schemas import MAX_MODEL_NAME, MAX_TOOLS, MAX_TTL, AgentChatRequest, ChatRequest, Number


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME)
    ttl: StrictInt | None = Field(default=None, ge=1, le=MAX_TTL)
    max_tokens: StrictInt = Field(ge=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: dict[str, Any] | None = None
    stop_sequences: list[str] | None = Field(default=None, max_length=16)
    temperature: Number | None = Field(default=None, ge=0, le=1)
    top_p: Number | None = Field(default=None, ge=0, le=1)
    top_k: StrictInt | None = Field(default=None, ge=0)
    stream: StrictBool = False


def _refuse(message: str, param: str) -> HttpError:
    return HttpError(400, message, param=param, code="invalid_request_error")


def _blocks(content: Any, param: str) -> list[dict[str, Any]]:
    """The content as blocks, each checked: a wrong type anywhere is a 400 that names it, never a 500."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _refuse("content must be a string or a list of content blocks", param)
    kept = []
    for n, block in enumerate(content):
        where = f"{param}.{n}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in _UNSEEN:  # another model's reasoning, from a conversation begun elsewhere: not for this one
            continue
        kept.append(block)
        if kind not in ("text", "tool_use", "tool_result"):
            raise _refuse(f"content blocks of type '{kind}' are not supported; send text, tool_use and tool_result "
                          "(this server runs text models)", f"{where}.type")
        if kind == "text" and not isinstance(block.get("text"), str):
            raise _refuse("a text block needs `text`, a string", f"{where}.text")
        if kind == "tool_use" and (not isinstance(block.get("name"), str)
                                   or not isinstance(block.get("input", {}), dict)):
            raise _refuse("a tool_use block needs `name` (a string) and `input` (an object)", where)
        if kind == "tool_result":
            _result_text(block.get("content"), f"{where}.content")
    return kept


_UNSEEN = ("thinking", "redacted_thinking")


def _result_text(content: Any, param: str) -> str:
    """A tool result's or a system prompt's text: a string, or text blocks (images and documents in a tool result
    become a line saying they were left out)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _refuse("must be a string or a list of text blocks", param)
    texts = []
    for n, b in enumerate(content):
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text" and isinstance(b.get("text"), str):
            texts.append(b["text"])
        elif kind in ("image", "document") and param != "system":
            texts.append(answers.omitted(kind))
        else:
            raise _refuse("must be a string or a list of text blocks", f"{param}.{n}")
    return "\n".join(texts)


def to_messages(body: MessagesRequest) -> list[dict[str, Any]]:
    """The conversation in OpenAI's chat shape: tool_use blocks become an assistant's tool_calls, tool_result blocks
    `tool` messages (before the user's own text of that turn)."""
    out: list[dict[str, Any]] = []
    if body.system:
        system = _result_text(body.system, "system")
        out.append({"role": "system", "content": system})
    for n, message in enumerate(body.messages):
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise _refuse(f"unknown role '{role}'; use user or assistant", f"messages.{n}.role")
        blocks = _blocks(message.get("content", ""), f"messages.{n}.content")
        text = "\n".join(b["text"] for b in blocks if b["type"] == "text")
        if role == "assistant":
            calls = [{"id": str(b.get("id") or f"toolu_{n}_{i}"), "type": "function",
                      "function": {"name": str(b.get("name", "")), "arguments": json.dumps(b.get("input") or {})}}
                     for i, b in enumerate(blocks) if b["type"] == "tool_use"]
            out.append({"role": "assistant", "content": text or None, **({"tool_calls": calls} if calls else {})})
            continue
        for b in blocks:
            if b["type"] == "tool_result":
                result = _result_text(b.get("content"), f"messages.{n}.content")
                out.append({"role": "tool", "tool_call_id": str(b.get("tool_use_id", "")),
                            "content": f"Error: {result}" if b.get("is_error") else result})
        if text or not any(b["type"] == "tool_result" for b in blocks):
            out.append({"role": "user", "content": text})
    return out


def _tools(body: MessagesRequest) -> tuple[list[dict[str, Any]] | None, Any]:
    out = []
    for n, tool in enumerate(body.tools or []):
        if tool.get("type") not in (None, "custom") or "name" not in tool:
            raise _refuse(f"tools of type '{tool.get('type')}' are not supported: this server has no server tools "
                          "(web search, code execution ...); send tools with name and input_schema", f"tools.{n}")
        out.append({"type": "function", "function": {"name": tool["name"], "description": tool.get("description"),
                                                     "parameters": tool.get("input_schema")}})
    choice: Any = None
    kind = (body.tool_choice or {}).get("type")
    if kind == "any":
        choice = "required"
    elif kind == "tool":
        choice = {"type": "function", "function": {"name": str(body.tool_choice.get("name", ""))}}  # type: ignore[union-attr]
    elif kind in ("auto", "none"):
        choice = kind
    elif kind is not None:
        raise _refuse(f"tool_choice of type '{kind}' is not supported", "tool_choice.type")
    single = bool((body.tool_choice or {}).get("disable_parallel_tool_use", False))
    parallel = False if single else (True if choice == "required" else None)
    return out or None, (choice, parallel)


# The chat request's fields as this API calls them (a message's index moves: the system prompt and tool results
# become messages of their own).
_OUR_FIELDS = renamed([(r"tools\.(\d+)\.function\.parameters", r"tools.\1.input_schema"),
                       (r"tools\.(\d+)\.function", r"tools.\1"), (r"stop\b.*", "stop_sequences"),
                       (r"messages\b.*", "messages"), (r"tool_choice\b.*", "tool_choice")])


def to_chat(body: MessagesRequest) -> ChatRequest:
    tool_list, (choice, parallel) = _tools(body)
    chat: dict[str, Any] = {"model": body.model, "messages": to_messages(body), "ttl": body.ttl,
                            "max_tokens": body.max_tokens, "stop": body.stop_sequences,
                            "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
                            "tools": tool_list, "tool_choice": choice, "parallel_tool_calls": parallel}
    return validate(AgentChatRequest, {k: v for k, v in chat.items() if v is not None}, _OUR_FIELDS)


def _stop(gen: Generation, calls: bool, stops: list[str], cut: bool = False) -> tuple[str, str | None]:
    """stop_reason and stop_sequence (`cut`: max_tokens cut the calls short)."""
    if cut:
        return "max_tokens", None
    if calls:
        return "tool_use", None
    if gen.done.get("finish_reason") == "length":
        return "max_tokens", None
    hit = gen.done.get("stop_sequence")
    return ("stop_sequence", str(hit)) if hit and hit in stops else ("end_turn", None)


def _usage(gen: Generation) -> dict[str, Any]:
    """Anthropic's meaning: `input_tokens` are the prompt's tokens not read from the cache; clients add
    `cache_read_input_tokens` to them for the prompt's size."""
    u = gen.usage()
    cached = u["prompt_tokens_details"]["cached_tokens"]
    return {"input_tokens": u["prompt_tokens"] - cached, "output_tokens": u["completion_tokens"],
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def _tool_use(call: tools.ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": f"toolu_{call.id.removeprefix('call_')}", "name": call.name,
            "input": json.loads(call.arguments) if call.arguments else {}}


def router(inference: Inference) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/messages")
    async def messages(request: Request) -> Response:
        body = validate(MessagesRequest, await read_json(request))
        chat = to_chat(body)
        gen = await inference.start(request, chat, "chat", "/v1/messages")
        stops = body.stop_sequences or []
        shell = {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
                 "model": gen.identifier}
        if not body.stream:
            text, calls = await answers.collect(request, inference, gen, chat)
            reason, sequence = _stop(gen, bool(calls), stops)
            content = ([{"type": "text", "text": text}] if text or not calls else []) + [_tool_use(c) for c in calls]
            return JSONResponse({**shell, "content": content, "stop_reason": reason, "stop_sequence": sequence,
                                 "usage": _usage(gen)})

        async def events() -> AsyncIterator[str]:
            def event(kind: str, **data: Any) -> str:
                return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"

            yield event("message_start", message={**shell, "content": [], "stop_reason": None, "stop_sequence": None,
                                                  "usage": {"input_tokens": 0, "output_tokens": 0}})
            yield event("ping")
            index, text_open, told = 0, False, answers.Told()
            async for piece in answers.stream(inference, gen, chat, told):
                if isinstance(piece, HttpError):
                    yield event("error", error=anthropic_error(piece)["error"])
                    return
                if isinstance(piece, str):
                    if not text_open:
                        text_open = True
                        yield event("content_block_start", index=index, content_block={"type": "text", "text": ""})
                    yield event("content_block_delta", index=index, delta={"type": "text_delta", "text": piece})
                    continue
                if text_open:
                    text_open = False
                    yield event("content_block_stop", index=index)
                    index += 1
                if piece.first:
                    block = {**_tool_use(piece.call), "input": {}}  # its input comes as input_json_delta
                    yield event("content_block_start", index=index, content_block=block)
                elif piece.delta:
                    yield event("content_block_delta", index=index,
                                delta={"type": "input_json_delta", "partial_json": piece.delta})
                elif piece.last:
                    yield event("content_block_stop", index=index)
                    index += 1
            if text_open:
                yield event("content_block_stop", index=index)
            reason, sequence = _stop(gen, told.calls > 0, stops, told.cut)
            # The prompt's size is known once the worker is done: message_start said 0, this says it (the SDKs take
            # the usage of message_delta over message_start's).
            yield event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence}, usage=_usage(gen))
            yield event("message_stop")

        return CleanupStreamingResponse(events(), cleanup=lambda: inference.finish(gen))

    return r
