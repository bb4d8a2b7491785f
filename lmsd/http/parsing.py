"""Request bodies: JSON parsing and validation errors turned into OpenAI-shaped 400s that name the field."""

from __future__ import annotations

import json
import re
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from lmsd.http.errors import HttpError

M = TypeVar("M", bound=BaseModel)


_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


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
    if _SURROGATE.search(raw):  # an escaped surrogate: text only if it is half of a pair
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise HttpError(400, "the request body contains a lone UTF-16 surrogate escape (such as \\ud800), "
                                 "which is not text", code="invalid_json") from None
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
