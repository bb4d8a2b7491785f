"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with honest status codes."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from lmsd.errors import LmsError, ModelLoadFailed

_STATUS = {
    "not_found": 404,
    "invalid_argument": 400,
    "failed_precondition": 400,
    "resource_exhausted": 429,
    "unavailable": 503,
    "internal": 500,
}
_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
         413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 500: "server_error"}


class HttpError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers
        self.recorded = False  # already reported as a request event (lms log stream, metrics)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPE.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


_ANTHROPIC_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def anthropic_error(exc: HttpError) -> dict[str, Any]:
    """The error in Anthropic's shape, for /v1/messages (the `anthropic` SDK reads `error.type`)."""
    kind = _ANTHROPIC_TYPE.get(exc.status, "api_error" if exc.status >= 500 else "invalid_request_error")
    # Anthropic's shape has no `param`: the message names the field.
    named = exc.param and not exc.message.startswith(exc.param)
    return {"type": "error", "error": {"type": kind, "message": f"{exc.param}: {exc.message}" if named
                                       else exc.message}}


def speaks_anthropic(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def shaped(exc: HttpError, path: str) -> dict[str, Any]:
    """The error body in the shape the endpoint's clients read: Anthropic's on /v1/messages, else OpenAI's."""
    if speaks_anthropic(path):
        return anthropic_error(exc)
    return error_body(exc.status, exc.message, exc.param, exc.code)


def error_response(exc: HttpError, path: str = "") -> JSONResponse:
    return JSONResponse(shaped(exc, path), status_code=exc.status, headers=exc.headers)


def from_lms_error(exc: LmsError) -> HttpError:
    status = exc.http_status or _STATUS[exc.kind]
    if isinstance(exc, ModelLoadFailed):
        status = 400  # the named model cannot be loaded: not a fault of the server
    headers = {"Retry-After": str(exc.retry_after or 1)} if status in (429, 503) else None
    about_model = exc.kind == "not_found" or exc.code in ("model_ambiguous", "model_load_failed", "invalid_model")
    param = "model" if about_model else None
    return HttpError(status, exc.message, param=param, code=exc.code, headers=headers)
