"""LM Studio's REST API v0: /api/v0/models[/{model}], chat/completions, completions and embeddings, with
`stats`, `model_info` and `runtime` added to completions."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from lmsd.http.errors import HttpError
from lmsd.http.inference import Generation, Inference
from lmsd.http.openai import chat_completion, embeddings, text_completion


def _runtime() -> dict[str, Any]:
    try:
        v = version("llama-cpp-python")
    except PackageNotFoundError:
        v = "unknown"
    return {"name": "llama-cpp-python", "version": v, "supported_formats": ["gguf"]}


def _extras(gen: Generation) -> dict[str, Any]:
    e = gen.entry
    return {
        "stats": gen.stats(),
        "model_info": {"arch": e.arch, "quant": e.quantization, "format": "gguf",
                       "context_length": gen.lease.instance.context_length},
        "runtime": _runtime(),
    }


def router(inference: Inference, list_models: Callable[[], Awaitable[list[dict[str, Any]]]],
           memory: Callable[[], dict[str, Any]]) -> APIRouter:
    r = APIRouter(prefix="/api/v0")

    @r.get("/models")
    async def models() -> Response:
        # `memory` is ours, not LM Studio's: what the loaded models use against the budget.
        return JSONResponse({"object": "list", "data": await list_models(), "memory": memory()})

    @r.get("/models/{model:path}")
    async def model(model: str) -> Response:
        # a model key, or the identifier of a loaded instance (`key:2`, or one chosen at load): /v1/models lists both
        keys = {model.lower()} | {i.key.lower() for i in inference.scheduler.instances() if i.identifier == model}
        for m in await list_models():
            if m["id"].lower() in keys:
                return JSONResponse(m)
        raise HttpError(404, f"no model '{model}'; GET /api/v0/models lists them", param="model",
                        code="model_not_found")

    @r.post("/chat/completions")
    async def chat(request: Request) -> Response:
        return await chat_completion(request, inference, "/api/v0/chat/completions", _extras)

    @r.post("/completions")
    async def completions(request: Request) -> Response:
        return await text_completion(request, inference, "/api/v0/completions", _extras)

    @r.post("/embeddings")
    async def embed(request: Request) -> Response:
        return await embeddings(request, inference)

    return r
