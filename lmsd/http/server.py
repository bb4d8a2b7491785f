"""The HTTP endpoint inside the daemon: the FastAPI app and the uvicorn server sharing lmsd's event loop.

The daemon owns the signals, so uvicorn's own signal capture is switched off; the daemon stops the server
as one step of its ordered shutdown. The listening socket is bound here first, so "port in use" becomes a
clear error for `lms server start` instead of uvicorn exiting the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import socket
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmsd.catalog import Catalog, ModelEntry
from lmsd.config import Settings
from lmsd.errors import FailedPrecondition, LmsError
from lmsd.http import anthropic, lmstudio, openai, openapi, responses, rest_v1
from lmsd.http.errors import HttpError, error_response, from_lms_error, shaped
from lmsd.http.inference import ClientGone, Inference
from lmsd.instance import Instance, SchedulerEvent
from lmsd.scheduler import Scheduler

if TYPE_CHECKING:
    from lmsd.metrics import Metrics

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024  # a larger request body gets 413; prompts and embedding batches fit easily
INFERENCE = ("completions", "embeddings", "/v1/responses", "/v1/messages")  # paths whose refusals are reported




class _Guard:
    """Pure ASGI middleware, before any route runs: web pages (403 for an Origin CORS does not allow, and for a
    foreign Host while bound to loopback: DNS rebinding), the API key (401) and the body size limit (413)."""

    def __init__(self, app: ASGIApp, api_key: Callable[[], str | None], limit: int, *, cors: bool,
                 loopback: bool) -> None:
        self.app = app
        self.api_key = api_key
        self.limit = limit
        self.cors = cors
        self.loopback = loopback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = str(scope.get("path", ""))
        refusal = self._foreign(headers)
        if refusal:
            await _send_json(send, 403, shaped(HttpError(403, refusal, code="forbidden"), path), {})
            return
        key = self.api_key()
        if key is not None and scope.get("method") != "OPTIONS":
            given = headers.get("authorization", "")
            # Bearer, as OpenAI's clients send it; x-api-key, as Anthropic's do: either one that matches will do.
            tokens = [given[7:].strip() if given.lower().startswith("bearer ") else "",
                      headers.get("x-api-key", "").strip()]
            matches = [hmac.compare_digest(t.encode(), key.encode()) for t in tokens]  # both compared, in constant time
            if not any(matches):
                why = ("wrong API key" if any(tokens) else
                       "missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')")
                await _send_json(send, 401, shaped(HttpError(401, why, code="invalid_api_key"), path),
                                 {"WWW-Authenticate": "Bearer"})
                return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            await _drain_and_refuse(receive, send, self.limit, path)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HttpError(413, _too_large(self.limit), code="request_too_large")
            return message

        await self.app(scope, limited, send)


    def _foreign(self, headers: dict[str, str]) -> str:
        """Why a request from a web page must be refused, or "". Clients that send no Origin (curl, SDKs) pass."""
        host = headers.get("host", "")
        if self.loopback and host and not _is_local_host(_hostname(host)):
            return (f"Host '{host[:100]}' is not this machine: while bound to loopback the endpoint answers only "
                    "localhost and loopback addresses such as 127.0.0.1 and [::1] (a web page using DNS rebinding?)")
        origin = headers.get("origin")
        if origin is not None and not self.cors:
            return (f"cross-origin request from '{origin[:100]}' refused: CORS is off. Allow web pages with "
                    "`lms server start --cors`")
        return ""


def _hostname(host: str) -> str:
    """The host of a Host header without its port: `localhost:1234` -> `localhost`, `[::1]:80` -> `[::1]`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_local_host(name: str) -> bool:
    """`localhost`, or an IP literal of a loopback address (127.0.0.0/8, ::1 in any spelling): a DNS-rebinding
    page can only send a name it controls, never an IP literal, so every literal of this machine's loopback is
    safe to answer (a daemon bound to 127.0.0.2 is reached as 127.0.0.2)."""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def _too_large(limit: int) -> str:
    return f"the request body is larger than the limit of {limit // (1024 * 1024)} MB"


async def _drain_and_refuse(receive: Receive, send: Send, limit: int, path: str) -> None:
    """Reads (and drops) the body before answering 413: closing a socket with unread data makes the kernel
    reset the connection, and the client would never see the answer. Beyond 8x the limit, just hang up."""
    drained = 0
    while drained <= 8 * limit:
        message = await receive()
        if message["type"] != "http.request":
            return  # the client went away
        drained += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await _send_json(send, 413, shaped(HttpError(413, _too_large(limit), code="request_too_large"), path),
                     {"Connection": "close"})


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
    import json

    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def create_app(scheduler: Scheduler, catalog: Catalog, settings: Callable[[], Settings],
               api_key: Callable[[], str | None], *, cors: bool, bind: str = "127.0.0.1",
               metrics: Metrics | None = None) -> ASGIApp:
    app = FastAPI(title="lmsd", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    inference = Inference(scheduler)

    async def v1_models() -> list[dict[str, Any]]:
        entries, instances = await _models(scheduler, catalog)
        owned = {e.key: e.publisher or "local" for e in entries}
        if settings().jit:
            ids = [e.key for e in entries] + [i.identifier for i in instances if i.identifier not in owned]
        else:
            ids = [i.identifier for i in instances]
        return [{"id": i, "object": "model", "created": 0, "owned_by": owned.get(i.split(":")[0], "local")}
                for i in dict.fromkeys(ids)]

    async def v0_models() -> list[dict[str, Any]]:
        entries, instances = await _models(scheduler, catalog)
        return [_v0_model(e, [i for i in instances if i.key == e.key]) for e in entries]

    def memory() -> dict[str, Any]:
        m = scheduler.memory_view()
        return {"used_bytes": m.used_bytes, "budget_bytes": m.budget_bytes, "available_bytes": m.available_bytes,
                "limit": m.limit}

    if metrics is not None:
        @app.get("/metrics", include_in_schema=False)
        async def _metrics() -> Response:
            """Prometheus text format (behind the API key, like every route)."""
            from lmsd.metrics import CONTENT_TYPE

            return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/health")
    async def _health() -> Response:
        """Liveness for monitors: touches no model, so polling it never keeps one loaded."""
        from lmsd import __version__

        ready = [i for i in scheduler.instances() if i.ready.done() and not i.draining]
        return JSONResponse({"status": "ok", "version": __version__, "loaded": len(ready)})

    app.include_router(openai.router(inference, v1_models))
    app.include_router(rest_v1.router(scheduler, lambda: _models(scheduler, catalog)))
    app.include_router(lmstudio.router(inference, v0_models, memory))
    app.include_router(responses.router(inference))
    app.include_router(anthropic.router(inference))
    openapi.install(app)

    def refused(request: Request, exc: HttpError) -> Response:
        """Answers a refused request, and reports it (lms log stream, metrics) unless inference already did: a
        client whose requests all fail validation must be visible to whoever watches."""
        path = request.url.path
        if not exc.recorded and request.method == "POST" and path.endswith(INFERENCE):
            scheduler.emit(SchedulerEvent("request", "", "", fields={
                "endpoint": path, "status": f"error: {exc.message[:200]}", "http_status": str(exc.status)}))
        return error_response(exc, path)

    @app.exception_handler(HttpError)
    async def _http_error(r: Request, exc: HttpError) -> Response:
        return refused(r, exc)

    @app.exception_handler(LmsError)
    async def _lms_error(r: Request, exc: LmsError) -> Response:
        return refused(r, from_lms_error(exc))

    @app.exception_handler(ClientGone)
    async def _gone(_r: Request, _exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it: the client has left

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(r: Request, exc: StarletteHTTPException) -> Response:
        msg = "no such endpoint; see /v1/models" if exc.status_code == 404 else str(exc.detail)
        return error_response(HttpError(exc.status_code, msg, headers=dict(exc.headers or {}) or None), r.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(r: Request, exc: RequestValidationError) -> Response:
        return error_response(HttpError(400, str(exc)), r.url.path)

    @app.exception_handler(Exception)
    async def _internal(r: Request, exc: Exception) -> Response:
        log.exception("internal error answering a request")
        return error_response(HttpError(500, f"internal error: {type(exc).__name__}: {exc}"), r.url.path)

    guarded: ASGIApp = _Guard(app, api_key, MAX_BODY_BYTES, cors=cors, loopback=_is_loopback(bind))
    if cors:
        guarded = CORSMiddleware(guarded, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
    return guarded


async def _models(scheduler: Scheduler, catalog: Catalog) -> tuple[list[ModelEntry], list[Instance]]:
    entries = [e for e in await asyncio.to_thread(catalog.scan) if not e.error]
    return entries, [i for i in scheduler.instances() if i.ready.done() and not i.draining]


def _v0_model(entry: ModelEntry, instances: list[Instance]) -> dict[str, Any]:
    model: dict[str, Any] = {
        "id": entry.key,
        "object": "model",
        "type": "embeddings" if entry.type == "embedding" else "llm",
        "publisher": entry.publisher or "local",
        "arch": entry.arch,
        "compatibility_type": "gguf",
        "quantization": entry.quantization,
        "state": "loaded" if instances else "not-loaded",
        "max_context_length": entry.max_context_length,
    }
    if instances:
        model["loaded_context_length"] = instances[0].context_length
        model["estimated_memory_bytes"] = instances[0].estimate
        model["parallel"] = instances[0].parallel
    return model


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # lmsd owns SIGINT/SIGTERM and stops this server itself


class HttpService:
    """Starts and stops the HTTP endpoint on the daemon's loop."""

    def __init__(self, make_app: Callable[[bool, str], Any]) -> None:
        self.make_app = make_app
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0
        self.bind = ""
        self.cors = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self, port: int, bind: str, cors: bool) -> None:
        """Starts the endpoint, or moves it to new settings. The new socket is bound before the running endpoint
        is stopped: if it cannot be bound, the old one keeps serving and this raises."""
        if self.running and (port, bind, cors) == (self.port, self.bind, self.cors):
            return
        same_address = self.running and (port, bind) == (self.port, self.bind)
        if same_address:
            await self.stop()  # only CORS changed: the same socket cannot be bound twice
        sock = _bind(bind, port)
        if self.running:
            await self.stop()
        config = uvicorn.Config(self.make_app(cors, bind), log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5, timeout_keep_alive=30)
        server = _EmbeddedServer(config)
        self._server, self.port, self.bind, self.cors = server, port, bind, cors
        self._task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started:
            if self._task.done():
                exc = self._task.exception()
                raise FailedPrecondition(f"the HTTP endpoint could not start on {bind}:{port}: {exc}")
            await asyncio.sleep(0.01)
        log.info("HTTP endpoint listening on http://%s:%d (cors %s)", _host(bind), port, "on" if cors else "off")

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self._task, 10)
        self._server, self._task = None, None
        log.info("HTTP endpoint stopped")

    def url(self) -> str:
        return f"http://{_host(self.bind)}:{self.port}" if self.running else ""


def _is_loopback(bind: str) -> bool:
    if bind.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return False


def _host(bind: str) -> str:
    return f"[{bind}]" if ":" in bind else bind


def _bind(bind: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(bind).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a host name such as "localhost"
    # proto IPPROTO_TCP, not 0: accepted sockets inherit it, and asyncio only sets TCP_NODELAY on sockets whose
    # proto says TCP. Without it, the SSE headers and first chunk meet Nagle + delayed ACK (+40 ms TTFT).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bind, port))
    except OSError as exc:
        sock.close()
        if exc.errno == 98:  # EADDRINUSE
            raise FailedPrecondition(
                f"port {port} on {bind} is already in use; pick another with `lms server start --port N`"
            ) from None
        raise FailedPrecondition(f"cannot listen on {bind}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock
