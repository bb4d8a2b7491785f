"""Request bodies: JSON parsing and validation errors turned into OpenAI-shaped 400s that name the field."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from lmsd.http.errors import HttpError

M = TypeVar("M", bound=BaseModel)


_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE = re.compile("[\ud800-\udfff]")  # what json.loads leaves of an unpaired surrogate escape


def _has_lone_surrogate(value: object) -> bool:
    if isinstance(value, str):
        return _LONE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON (NaN and Infinity are not numbers a request may carry)")


async def parse_body(request: Request, model: type[M]) -> M:
    return validate(model, await read_json(request))


async def read_json(request: Request) -> dict[str, object]:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    raw = await request.body()
    try:
        text = raw.decode("utf-8")  # strict: JSON over HTTP is UTF-8, and raw surrogate bytes are not text
        data = json.loads(text, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HttpError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    except RecursionError:
        raise HttpError(400, "the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise HttpError(400, "the request body must be a JSON object", code="invalid_request_error")
    if _SURROGATE.search(text) and _has_lone_surrogate(data):  # an escaped surrogate: text if half of a pair
        raise HttpError(400, "the request body contains a lone UTF-16 surrogate escape (such as \\ud800), which "
                             "is not text", code="invalid_json")
    return data


def renamed(rules: list[tuple[str, str]]) -> Callable[[str], str]:
    """A field of a translated request named as its client sent it: the first rule (a regex, its replacement)
    that matches the field's path."""
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]

    def rename(param: str) -> str:
        for pattern, replacement in compiled:
            if pattern.match(param):
                return pattern.sub(replacement, param, count=1)
        return param

    return rename


def validate(model: type[M], data: object, rename: Callable[[str], str] | None = None) -> M:
    """`data` as `model`, or a 400 that names the first offending field (as `rename` says the client calls it, for a
    request translated from another API's)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"] if not str(p).startswith(("function-", "constrained-"))]
        param = ".".join(loc) or None
        if param and rename is not None:
            param = rename(param)
        msg = str(first["msg"]).removeprefix("Value error, ")
        if first["type"] == "missing":
            msg = "this field is required"
        value = first.get("input")
        shown = "" if first["type"] == "missing" or isinstance(value, dict | list) else f" (got {value!r})"
        raise HttpError(400, f"{param}: {msg}{shown}" if param else msg, param=param,
                        code="invalid_request_error") from None
