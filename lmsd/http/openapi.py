"""The endpoint's OpenAPI description, served at /openapi.json (behind the API key when one is set).

Request bodies are parsed by hand (parsing.py: OpenAI-shaped 400s naming the field), so FastAPI cannot see
them; this declares each one from the same pydantic models that validate it, and every error as OpenAI's
`{"error": {...}}` shape. A client generator or a fuzzer (tests/slow/test_fuzz_http.py runs schemathesis on
it) then reaches every field.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from lmsd.http.anthropic import MessagesRequest
from lmsd.http.errors import speaks_anthropic
from lmsd.http.responses import ResponsesRequest
from lmsd.http.rest_v1 import LoadRequest, UnloadRequest
from lmsd.http.schemas import ChatRequest, CompletionRequest, EmbeddingRequest

BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
    "/api/v0/chat/completions": ChatRequest,
    "/api/v0/completions": CompletionRequest,
    "/api/v0/embeddings": EmbeddingRequest,
    "/api/v1/models/load": LoadRequest,
    "/api/v1/models/unload": UnloadRequest,
    "/v1/responses": ResponsesRequest,
    "/v1/messages": MessagesRequest,
}
STREAMING = {"/v1/chat/completions", "/v1/completions", "/api/v0/chat/completions", "/api/v0/completions",
             "/v1/responses", "/v1/messages"}

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string", "minLength": 1}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}
ANTHROPIC_ERROR = {  # /v1/messages answers errors as Anthropic's API does
    "type": "object",
    "required": ["type", "error"],
    "properties": {"type": {"const": "error"}, "error": {
        "type": "object",
        "required": ["type", "message"],
        "properties": {"type": {"type": "string"}, "message": {"type": "string", "minLength": 1}},
    }},
}
_ERRORS = {
    "400": "invalid request: the field is named in `param`",
    "401": "missing or wrong API key",
    "403": "a web page's request (an Origin CORS does not allow, or a foreign Host while bound to loopback)",
    "404": "no such model or endpoint",
    "405": "method not allowed",
    "413": "request body larger than the limit",
    "429": "queue full or no room to load; see Retry-After",
    "500": "internal error, or the model's worker died",
    "503": "waited too long, or the model is unloading; see Retry-After",
}


def install(app: FastAPI) -> None:
    """Makes `app.openapi()` describe the hand-parsed request bodies and the error shape."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(title="lmsd", version="1", routes=app.routes,
                         description="OpenAI-compatible and LM Studio-compatible (REST v0, v1) endpoint of lmsd")
    refs, defs = models_json_schema([(m, "validation") for m in set(BODIES.values())],
                                    ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(defs["$defs"])
    components["Error"] = ERROR
    components["AnthropicError"] = ANTHROPIC_ERROR
    retry_after = {"Retry-After": {"description": "seconds to wait before trying again",
                                   "schema": {"type": "string", "pattern": "^[0-9]+$"}}}
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            model = BODIES.get(path) if method == "post" else None
            if model is not None:
                op["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": refs[(model, "validation")]}}}
            content: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
            if path in STREAMING:
                content["text/event-stream"] = {"schema": {  # each server-sent event
                    "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}}
            op["responses"] = {"200": {"description": "OK", "content": content}}
            error_ref = {"$ref": "#/components/schemas/" + ("AnthropicError" if speaks_anthropic(path) else "Error")}
            for status, why in _ERRORS.items():
                response: dict[str, Any] = {"description": why, "content": {"application/json": {"schema": error_ref}}}
                if status in ("429", "503"):
                    response["headers"] = retry_after
                op["responses"][status] = response
    return schema
