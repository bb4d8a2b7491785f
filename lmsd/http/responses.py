"""OpenAI's Responses API, `POST /v1/responses`, on top of the chat path (the same template, tools, JIT, TTL).

A request's `input` (a string, or messages and `function_call` / `function_call_output` items) and `instructions`
become chat messages; `tools` (function tools), `tool_choice`, `max_output_tokens`, `temperature`, `top_p` and
`text.format` map to their chat equivalents. The answer comes back as `output` items: a `message` with
`output_text`, and one `function_call` per call; streamed as the typed events of the Responses API.

`previous_response_id` continues a conversation: every stored response (`store`, true by default) keeps its input
and output messages in memory, at most `KEEP_COUNT` responses, `KEEP_SECONDS` old and `KEEP_BYTES` in all (the
oldest go first), and none across a daemon restart. Built-in tools (web search, file search, computer use ...),
images and files are refused with a 400 that says so.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from lmsd import tools
from lmsd.http import answers
from lmsd.http.errors import HttpError
from lmsd.http.inference import CleanupStreamingResponse, Generation, Inference
from lmsd.http.parsing import read_json, renamed, validate
from lmsd.http.schemas import MAX_MODEL_NAME, MAX_TOOLS, MAX_TTL, AgentChatRequest, ChatRequest, Number

KEEP_COUNT = 1000  # stored responses
KEEP_SECONDS = 3600.0  # how long a stored response can be continued
KEEP_BYTES = 64 * 1024 * 1024  # the stored conversations together (JSON size)


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME)
    ttl: StrictInt | None = Field(default=None, ge=1, le=MAX_TTL)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    max_output_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, ge=0, le=1)
    stream: StrictBool = False
    store: StrictBool = True
    previous_response_id: str | None = Field(default=None, max_length=256)
    text: dict[str, Any] | None = None
    conversation: str | dict[str, Any] | None = None
    background: StrictBool | None = None


class Store:
    """Stored conversations by response id, bounded in count, age and size (module docstring)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._items: OrderedDict[str, tuple[float, list[dict[str, Any]], int]] = OrderedDict()
        self._bytes = 0
        self._clock = clock

    def get(self, rid: str) -> list[dict[str, Any]] | None:
        self._expire()
        item = self._items.get(rid)
        return None if item is None else list(item[1])

    def put(self, rid: str, messages: list[dict[str, Any]]) -> None:
        size = len(json.dumps(messages))
        if size > KEEP_BYTES:
            return
        self._items[rid] = (self._clock(), messages, size)
        self._bytes += size
        self._expire()

    def _expire(self) -> None:
        too_old = self._clock() - KEEP_SECONDS
        while self._items and (len(self._items) > KEEP_COUNT or self._bytes > KEEP_BYTES
                               or next(iter(self._items.values()))[0] < too_old):
            _rid, (_t, _m, size) = self._items.popitem(last=False)
            self._bytes -= size


def _refuse(message: str, param: str) -> HttpError:
    return HttpError(400, message, param=param, code="unsupported_parameter")


def _text(content: Any, param: str, tool_output: bool = False) -> str:
    """A message's content: a string, or parts of type input_text / output_text (text); a refusal part (another
    model's) is left out. In a function's output, images and files become a line saying they were left out: the
    output stays in the conversation, so refusing it would refuse every later turn."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _refuse("content must be a string or a list of parts", param)
    texts = []
    for n, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "refusal":
            continue
        if tool_output and kind in ("input_image", "input_file"):
            texts.append(answers.omitted("image" if kind == "input_image" else "file"))
            continue
        if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise _refuse(f"content parts of type '{kind}' are not supported; send input_text (this server runs "
                          "text models)", f"{param}.{n}")
        texts.append(part["text"])
    return "\n".join(texts)


def to_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The input as chat messages (OpenAI chat shape): consecutive function calls become one assistant message."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for n, item in enumerate(items):
        kind = item.get("type", "message")
        param = f"input.{n}"
        if kind == "reasoning":  # another model's reasoning: not for this one
            continue
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise _refuse(f"unknown role '{role}'", f"{param}.role")
            messages.append({"role": role, "content": _text(item.get("content", ""), f"{param}.content")})
        elif kind == "function_call":
            if not isinstance(item.get("name"), str) or not isinstance(item.get("arguments", "{}"), str):
                raise _refuse("a function_call item needs `name` and `arguments` (a string)", param)
            call = {"id": str(item.get("call_id") or item.get("id") or f"call_{n}"), "type": "function",
                    "function": {"name": item["name"], "arguments": item.get("arguments", "{}")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # the text and the calls of one answer
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output", "")
            text = output if isinstance(output, str) else _text(output, f"{param}.output", tool_output=True)
            messages.append({"role": "tool", "tool_call_id": str(item.get("call_id", "")), "content": text})
        else:
            raise _refuse(f"input items of type '{kind}' are not supported; send messages, function_call and "
                          "function_call_output items", f"{param}.type")
    return messages


def _tools(body: ResponsesRequest) -> tuple[list[dict[str, Any]] | None, Any]:
    """Responses' flat function tools and tool_choice in the chat shape."""
    out = []
    for n, tool in enumerate(body.tools or []):
        if tool.get("type") != "function":
            raise _refuse(f"tools of type '{tool.get('type')}' are not supported: this server has no built-in tools "
                          "(web search, file search, computer use ...); send function tools", f"tools.{n}.type")
        out.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters")
                                                      if k in tool}})
    choice = body.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise _refuse(f"tool_choice of type '{choice.get('type')}' is not supported", "tool_choice")
        choice = {"type": "function", "function": {"name": str(choice.get("name", ""))}}
    return out or None, choice


def _response_format(body: ResponsesRequest) -> dict[str, Any] | None:
    fmt = (body.text or {}).get("format")
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {"schema": fmt.get("schema"), "name": fmt.get("name")}}
    return {"type": fmt.get("type")}


# The chat request's fields as this API calls them (the input's items and the messages do not line up one to one).
_OUR_FIELDS = renamed([(r"tools\.(\d+)\.function", r"tools.\1"), (r"max_tokens\b", "max_output_tokens"),
                       (r"messages\b.*", "input"), (r"response_format\b.*", "text.format"),
                       (r"tool_choice\b.*", "tool_choice")])


def to_chat(body: ResponsesRequest, history: list[dict[str, Any]]) -> tuple[ChatRequest, list[dict[str, Any]]]:
    """The chat request the response is made with, and the conversation to store (without the instructions:
    a continued response does not inherit them, as OpenAI's)."""
    conversation = [*history, *to_messages(body.input)]
    head = [{"role": "system", "content": body.instructions}] if body.instructions else []
    tool_list, choice = _tools(body)
    chat: dict[str, Any] = {"model": body.model, "messages": head + conversation, "ttl": body.ttl,
                            "max_tokens": body.max_output_tokens, "temperature": body.temperature,
                            "top_p": body.top_p, "tools": tool_list, "tool_choice": choice,
                            "parallel_tool_calls": body.parallel_tool_calls, "response_format": _response_format(body)}
    return validate(AgentChatRequest, {k: v for k, v in chat.items() if v is not None}, _OUR_FIELDS), conversation


def _usage(gen: Generation) -> dict[str, Any]:
    u = gen.usage()
    return {"input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
            "total_tokens": u["total_tokens"],
            "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens_details": {"reasoning_tokens": 0}}


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    """The answer's text as an output item (`incomplete` when max_output_tokens cut it; no content yet while
    `in_progress`)."""
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [] if status == "in_progress" else [_text_part(text)]}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _text_status(gen: Generation) -> str:
    return "incomplete" if gen.done.get("finish_reason") == "length" else "completed"


def _item_id(call: tools.ToolCall) -> str:
    return f"fc_{call.id.removeprefix('call_')}"


def _call_item(call: tools.ToolCall, status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": _item_id(call), "call_id": call.id,
            "name": call.name, "arguments": call.arguments if status != "in_progress" else "", "status": status}


def _calls_as_messages(content: str, calls: list[tools.ToolCall]) -> list[dict[str, Any]]:
    """The output as the chat messages a continuation sends back."""
    message: dict[str, Any] = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = [c.openai() for c in calls]
    return [message]


def router(inference: Inference, store: Store | None = None) -> APIRouter:
    r = APIRouter()
    kept = store or Store()

    @r.post("/v1/responses")
    async def responses(request: Request) -> Response:
        body = validate(ResponsesRequest, await read_json(request))
        if body.conversation is not None or body.background:
            param = "conversation" if body.conversation is not None else "background"
            raise _refuse(f"`{param}` is not supported: this server keeps no conversations or background "
                          "responses; continue one with previous_response_id", param)
        history: list[dict[str, Any]] = []
        if body.previous_response_id:
            found = kept.get(body.previous_response_id)
            if found is None:
                raise HttpError(400, f"previous_response_id '{body.previous_response_id}' is not known: responses "
                                     f"are kept for {int(KEEP_SECONDS)} s, at most {KEEP_COUNT}, and not across a "
                                     "daemon restart", param="previous_response_id", code="previous_response_not_found")
            history = found
        chat, conversation = to_chat(body, history)
        gen = await inference.start(request, chat, "chat", "/v1/responses")
        rid, created = f"resp_{uuid.uuid4().hex[:24]}", int(time.time())
        # As the answer is made: a forced call is one unless asked for several; otherwise several unless refused.
        parallel = bool(chat.parallel_tool_calls) if chat.forced else chat.parallel_tool_calls is not False
        shell = {"id": rid, "object": "response", "created_at": created, "model": gen.identifier,
                 "instructions": body.instructions, "previous_response_id": body.previous_response_id,
                 "tools": body.tools or [], "tool_choice": body.tool_choice or "auto",
                 "parallel_tool_calls": parallel, "temperature": body.temperature,
                 "top_p": body.top_p, "max_output_tokens": body.max_output_tokens, "store": body.store,
                 "text": body.text or {"format": {"type": "text"}}, "truncation": "disabled", "metadata": {},
                 "error": None, "incomplete_details": None, "usage": None}

        def final(output: list[dict[str, Any]], content: str, calls: list[tools.ToolCall],
                  calls_cut: bool = False) -> dict[str, Any]:
            if body.store:
                kept.put(rid, conversation + _calls_as_messages(content, calls))
            cut = calls_cut or (gen.done.get("finish_reason") == "length" and not calls)
            return {**shell, "status": "incomplete" if cut else "completed", "output": output,
                    "incomplete_details": {"reason": "max_output_tokens"} if cut else None, "usage": _usage(gen)}

        if not body.stream:
            content, calls = await answers.collect(request, inference, gen, chat)
            message = _message_item(f"msg_{uuid.uuid4().hex[:24]}", content, _text_status(gen) if not calls
                                    else "completed")
            output = ([message] if content or not calls else []) + \
                [_call_item(c) for c in calls]
            return JSONResponse(final(output, content, calls))

        async def events() -> AsyncIterator[str]:
            seq = 0

            def event(kind: str, **data: Any) -> str:
                nonlocal seq
                seq += 1
                return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': seq - 1, **data})}\n\n"

            yield event("response.created", response={**shell, "status": "in_progress", "output": []})
            yield event("response.in_progress", response={**shell, "status": "in_progress", "output": []})
            output: list[dict[str, Any]] = []
            text, calls, msg_id = "", [], f"msg_{uuid.uuid4().hex[:24]}"

            def close_message(status: str = "completed") -> list[str]:
                item = _message_item(msg_id, text, status)
                output.append(item)
                where = {"item_id": msg_id, "output_index": len(output) - 1, "content_index": 0}
                return [event("response.output_text.done", **where, text=text, logprobs=[]),
                        event("response.content_part.done", **where, part=item["content"][0]),
                        event("response.output_item.done", output_index=len(output) - 1, item=item)]

            open_message = False
            told = answers.Told()
            async for piece in answers.stream(inference, gen, chat, told):
                if isinstance(piece, HttpError):
                    yield event("error", code=piece.code, message=piece.message, param=piece.param)
                    yield event("response.failed", response={
                        **shell, "status": "failed", "output": output,
                        "error": {"code": piece.code or "server_error", "message": piece.message}})
                    return
                if isinstance(piece, str):
                    if not open_message:
                        open_message = True
                        yield event("response.output_item.added", output_index=len(output),
                                    item=_message_item(msg_id, "", "in_progress"))
                        yield event("response.content_part.added", item_id=msg_id, output_index=len(output),
                                    content_index=0, part=_text_part(""))
                    text += piece
                    yield event("response.output_text.delta", item_id=msg_id, output_index=len(output),
                                content_index=0, delta=piece, logprobs=[])
                    continue
                if open_message:
                    open_message = False
                    for e in close_message():
                        yield e
                call, index = piece.call, len(output)
                item_id = _item_id(call)
                if piece.first:
                    yield event("response.output_item.added", output_index=index, item=_call_item(call, "in_progress"))
                elif piece.delta:
                    yield event("response.function_call_arguments.delta", item_id=item_id, output_index=index,
                                delta=piece.delta)
                elif piece.last:
                    item = _call_item(call, "completed" if call.complete else "incomplete")
                    yield event("response.function_call_arguments.done", item_id=item_id, output_index=index,
                                arguments=call.arguments)
                    output.append(item)
                    yield event("response.output_item.done", output_index=index, item=item)
                    if call.complete:
                        calls.append(call)
            if open_message or not output:
                if not open_message:  # an empty answer is still one (empty) message, with its one part
                    yield event("response.output_item.added", output_index=0,
                                item=_message_item(msg_id, "", "in_progress"))
                    yield event("response.content_part.added", item_id=msg_id, output_index=0, content_index=0,
                                part=_text_part(""))
                for e in close_message(_text_status(gen)):  # the answer's end: max_output_tokens may have cut it
                    yield e
            done = final(output, text, calls, told.cut)
            yield event("response.completed" if done["status"] == "completed" else "response.incomplete",
                        response=done)

        return CleanupStreamingResponse(events(), cleanup=lambda: inference.finish(gen))

    return r
