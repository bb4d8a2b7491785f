"""Request bodies: JSON parsing and validation errors turned into OpenAI-shaped 400s that name the field."""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from lmsd.http.errors import HttpError

M = TypeVar("M", bound=BaseModel)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON (NaN and Infinity are not numbers a request may carry)")


async def parse_body(request: Request, model: type[M]) -> M:
    raw = await request.body()
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HttpError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    except RecursionError:
        raise HttpError(400, "the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise HttpError(400, "the request body must be a JSON object", code="invalid_request_error")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"] if not str(p).startswith(("function-", "constrained-"))]
        param = ".".join(loc) or None
        msg = str(first["msg"]).removeprefix("Value error, ")
        if first["type"] == "missing":
            msg = "this field is required"
        value = first.get("input")
        shown = "" if first["type"] == "missing" or isinstance(value, dict | list) else f" (got {value!r})"
        raise HttpError(400, f"{param}: {msg}{shown}" if param else msg, param=param,
                        code="invalid_request_error") from None
