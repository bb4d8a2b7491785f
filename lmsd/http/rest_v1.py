"""LM Studio's REST API v1 for model management: GET /api/v1/models, POST /api/v1/models/load and
POST /api/v1/models/unload, with LM Studio's request and response shapes (lmstudio.ai/docs/developer/rest) and
the semantics of `lms load` / `lms unload`. Ours, beside LM Studio's fields: `ttl`, `parallel` and `identifier`
on a load (LM Studio's `config.context_length` or a top-level `context_length`), and `ttl_seconds` / `parallel`
on a loaded instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from lmsd.catalog import ModelEntry
from lmsd.config import MAX_PARALLEL, UNLOAD_GRACE
from lmsd.errors import LmsError
from lmsd.http.errors import from_lms_error
from lmsd.http.inference import ClientGone, until_disconnect
from lmsd.http.parsing import parse_body
from lmsd.http.schemas import MAX_MODEL_NAME, MAX_TTL
from lmsd.instance import Instance
from lmsd.scheduler import Scheduler

Models = Callable[[], Awaitable[tuple[list[ModelEntry], list[Instance]]]]


class LoadConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")  # LM Studio's GPU and batch options have no meaning here

    context_length: StrictInt | None = Field(default=None, ge=0, le=1 << 24)


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME)
    config: LoadConfig | None = None
    context_length: StrictInt | None = Field(default=None, ge=0, le=1 << 24)
    ttl: StrictInt | None = Field(default=None, ge=1, le=MAX_TTL)
    parallel: StrictInt | None = Field(default=None, ge=1, le=MAX_PARALLEL)
    identifier: str | None = Field(default=None, min_length=1, max_length=MAX_MODEL_NAME)


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    instance_id: str = Field(min_length=1, max_length=MAX_MODEL_NAME)


def _params_string(n: int) -> str | None:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}".replace(".0", "")
    return None


def _bits(quant: str) -> float | None:
    digits = "".join(c for c in quant.split("_")[0] if c.isdigit())
    return float(digits) if digits else None


def _instance(inst: Instance) -> dict[str, Any]:
    return {"id": inst.identifier, "config": {"context_length": inst.context_length, "parallel": inst.parallel},
            "ttl_seconds": inst.ttl}


def _model(entry: ModelEntry, instances: list[Instance]) -> dict[str, Any]:
    m: dict[str, Any] = {
        "type": "embedding" if entry.type == "embedding" else "llm",
        "publisher": entry.publisher or "local",
        "key": entry.key,
        "display_name": entry.key,
        "quantization": {"name": entry.quantization or None, "bits_per_weight": _bits(entry.quantization)},
        "size_bytes": entry.size_bytes,
        "params_string": _params_string(entry.params),
        "loaded_instances": [_instance(i) for i in instances],
        "max_context_length": entry.max_context_length,
        "format": "gguf",
    }
    if entry.type != "embedding":
        m["architecture"] = entry.arch or None
    return m


def router(scheduler: Scheduler, models: Models) -> APIRouter:
    r = APIRouter(prefix="/api/v1")

    @r.get("/models")
    async def list_models() -> Response:
        entries, instances = await models()
        return JSONResponse({"models": [_model(e, [i for i in instances if i.key == e.key]) for e in entries]})

    @r.post("/models/load")
    async def load(request: Request) -> Response:
        """Loads a new instance (origin manual, as `lms load`) and answers once it is ready. A client that leaves
        before that withdraws the load, as Ctrl-C on `lms load` does."""
        body = await parse_body(request, LoadRequest)
        context = body.context_length if body.context_length is not None else \
            (body.config.context_length if body.config and body.config.context_length is not None else 0)
        started = time.perf_counter()
        try:
            inst = await scheduler.begin_load(body.model, ttl=body.ttl, identifier=body.identifier or "",
                                              context_length=context, parallel=body.parallel or 0)
        except LmsError as exc:
            raise from_lms_error(exc) from None
        try:
            await until_disconnect(request, asyncio.shield(inst.ready))
        except ClientGone:
            with contextlib.suppress(LmsError):
                await scheduler.unload(inst.identifier, reason="manual")
            raise
        except LmsError as exc:
            raise from_lms_error(exc) from None
        return JSONResponse({"model_instance_id": inst.identifier, "type": "llm" if inst.entry.type != "embedding"
                             else "embedding", **_instance(inst),
                             "load_time_seconds": round(time.perf_counter() - started, 3)})

    @r.post("/models/unload")
    async def unload(request: Request) -> Response:
        """Unloads one instance as `lms unload` does: running requests get UNLOAD_GRACE seconds to finish."""
        body = await parse_body(request, UnloadRequest)
        try:
            await scheduler.unload(body.instance_id.strip(), reason="manual", grace=UNLOAD_GRACE)
        except LmsError as exc:
            raise from_lms_error(exc) from None
        return JSONResponse({"instance_id": body.instance_id.strip()})

    return r
