"""The OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.

The shapes of responses and stream chunks live here; LM Studio's /api/v0 (lmstudio.py) reuses them and adds
its `stats`, `model_info` and `runtime`.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from lmsd.http import answers
from lmsd.http.errors import HttpError, error_body
from lmsd.http.inference import CleanupStreamingResponse, Generation, Inference
from lmsd.http.parsing import parse_body
from lmsd.http.schemas import ChatRequest, CompletionRequest, EmbeddingRequest

Extra = Callable[[Generation], dict[str, Any]]


def _no_extra(_gen: Generation) -> dict[str, Any]:
    return {}


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


async def chat_completion(request: Request, inference: Inference, endpoint: str, extra: Extra = _no_extra) -> Response:
    body = await parse_body(request, ChatRequest)
    gen = await inference.start(request, body, "chat", endpoint)
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    base = {"id": rid, "created": created, "model": gen.identifier, "system_fingerprint": gen.identifier}
    if not body.stream:
        content, calls = await answers.collect(request, inference, gen, body)
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
        if calls:
            message["tool_calls"] = [c.openai() for c in calls]
        return JSONResponse({
            **base, "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": answers.finish_reason(gen, bool(calls))}],
            "usage": gen.usage(), **extra(gen),
        })

    async def events() -> AsyncIterator[str]:
        chunk = {**base, "object": "chat.completion.chunk"}

        def delta(d: dict[str, Any], finish: str | None = None) -> str:
            return sse({**chunk, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]})

        yield delta({"role": "assistant", "content": ""})
        told = answers.Told()
        async for piece in answers.stream(inference, gen, body, told):
            if isinstance(piece, HttpError):
                yield sse(error_body(piece.status, piece.message, piece.param, piece.code))
                return
            if isinstance(piece, str):
                yield delta({"content": piece})
            elif piece.first:  # a call: its id and name first, then its arguments in pieces, as OpenAI streams them
                call = piece.call
                yield delta({"tool_calls": [{**call.openai(piece.index), "function": {"name": call.name,
                                                                                      "arguments": ""}}]})
            elif piece.delta:
                yield delta({"tool_calls": [{"index": piece.index, "function": {"arguments": piece.delta}}]})
        finish = answers.finish_reason(gen, told.calls > 0, told.cut)
        yield sse({**chunk, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}],
                   **extra(gen)})
        if body.include_usage:
            yield sse({**chunk, "choices": [], "usage": gen.usage()})
        yield sse("[DONE]")

    return CleanupStreamingResponse(events(), cleanup=lambda: inference.finish(gen))


async def text_completion(request: Request, inference: Inference, endpoint: str, extra: Extra = _no_extra) -> Response:
    body = await parse_body(request, CompletionRequest)
    gen = await inference.start(request, body, "completion", endpoint)
    base = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": gen.identifier, "system_fingerprint": gen.identifier}
    if not body.stream:
        text = await inference.collect(request, gen)
        return JSONResponse({
            **base,
            "choices": [{"index": 0, "text": text, "logprobs": None,
                         "finish_reason": gen.done.get("finish_reason", "stop")}],
            "usage": gen.usage(), **extra(gen),
        })

    async def events() -> AsyncIterator[str]:
        async for text in inference.tokens(gen):
            if isinstance(text, HttpError):
                yield sse(error_body(text.status, text.message, text.param, text.code))
                return
            yield sse({**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]})
        yield sse({**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                        "finish_reason": gen.done.get("finish_reason", "stop")}], **extra(gen)})
        if body.include_usage:
            yield sse({**base, "choices": [], "usage": gen.usage()})
        yield sse("[DONE]")

    return CleanupStreamingResponse(events(), cleanup=lambda: inference.finish(gen))


async def embeddings(request: Request, inference: Inference) -> Response:
    body = await parse_body(request, EmbeddingRequest)
    result, identifier = await inference.embed(request, body)
    tokens = int(result.get("prompt_tokens", 0))
    encode = _base64_floats if body.encoding_format == "base64" else (lambda v: v)
    return JSONResponse({
        "object": "list",
        "data": [{"object": "embedding", "embedding": encode(vec), "index": i} for i, vec in enumerate(result["data"])],
        "model": identifier,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })


def _base64_floats(vec: list[float]) -> str:
    """OpenAI's `encoding_format: base64`: little-endian float32s, base64-encoded (the openai SDK's default)."""
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()


def router(inference: Inference, list_models: Callable[[], Any]) -> APIRouter:
    r = APIRouter(prefix="/v1")

    @r.get("/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": await list_models()})

    @r.post("/chat/completions")
    async def chat(request: Request) -> Response:
        return await chat_completion(request, inference, "/v1/chat/completions")

    @r.post("/completions")
    async def completions(request: Request) -> Response:
        return await text_completion(request, inference, "/v1/completions")

    @r.post("/embeddings")
    async def embed(request: Request) -> Response:
        return await embeddings(request, inference)

    return r
