"""Running one inference request through the scheduler: checks before any load, the lease on an instance,
the worker's stream, client disconnects, and the `request` event for `lms log stream`.

Routes (openai.py, lmstudio.py) only shape what this returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from lmsd.catalog import ModelEntry
from lmsd.errors import LmsError
from lmsd.http.errors import HttpError, from_lms_error
from lmsd.http.schemas import ChatRequest, CompletionRequest, EmbeddingRequest
from lmsd.instance import WorkerStream
from lmsd.scheduler import Lease, Scheduler, SchedulerEvent

log = logging.getLogger(__name__)
T = TypeVar("T")
_DISCONNECT_POLL = 0.1  # seconds between checks that a waiting (non-streaming) client is still there


class ClientGone(Exception):
    """The client disconnected; nobody is left to answer."""


@dataclass
class Generation:
    """One running generation: the lease it holds and the worker's event stream, first event already read."""

    lease: Lease
    entry: ModelEntry
    stream: WorkerStream
    first: dict[str, Any]
    started: float
    endpoint: str
    done: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"
    closed: bool = False

    @property
    def identifier(self) -> str:
        return self.lease.instance.identifier

    def stats(self) -> dict[str, Any]:
        d = self.done
        ttft = float(d.get("time_to_first_token", 0.0))
        gen = float(d.get("generation_time", 0.0))
        tokens = int(d.get("completion_tokens", 0))
        decode = gen - ttft
        tps = tokens / decode if decode > 0 and tokens > 1 else (tokens / gen if gen > 0 else 0.0)
        return {"tokens_per_second": round(tps, 3), "time_to_first_token": round(ttft, 4),
                "generation_time": round(gen, 4), "stop_reason": _stop_reason(d.get("finish_reason", "stop")),
                "cached_prompt_tokens": int(d.get("prompt_cached_tokens", 0))}

    def usage(self) -> dict[str, Any]:
        """OpenAI's usage; `prompt_tokens_details.cached_tokens` counts the prompt tokens the prompt cache served."""
        p = int(self.done.get("prompt_tokens", 0))
        c = int(self.done.get("completion_tokens", 0))
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": int(self.done.get("prompt_cached_tokens", 0))}}


def _stop_reason(finish: str) -> str:
    return {"stop": "eosFound", "length": "maxPredictedTokensReached", "cancelled": "userStopped"}.get(finish, finish)


class Inference:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    async def check(self, body: ChatRequest | CompletionRequest | EmbeddingRequest, kind: str,
                    jit: bool | None = None) -> ModelEntry:
        """Everything that can be refused before a load: unknown model, JIT off, wrong kind of model,
        max_tokens beyond the context the model has or would get."""
        try:
            entry, n_ctx, _loaded = await self.scheduler.target(body.model, jit=jit)
        except LmsError as exc:
            raise from_lms_error(exc) from None
        if kind in ("chat", "completion") and entry.type == "embedding":
            raise HttpError(400, f"'{entry.key}' is an embedding model; use /v1/embeddings", param="model",
                            code="model_not_supported")
        max_tokens = getattr(body, "max_tokens", None)
        if max_tokens is not None and max_tokens > n_ctx and getattr(body, "cap_max_tokens", False):
            # Anthropic's clients must send max_tokens and send their own model's (32000): here it means "as much
            # as the context leaves", as a request without max_tokens gets.
            body.max_tokens = None  # type: ignore[union-attr]
        elif max_tokens is not None and max_tokens > n_ctx:
            raise HttpError(400, f"max_tokens is {max_tokens}, more than the context length of '{entry.key}' "
                                 f"({n_ctx} tokens)", param="max_tokens", code="context_length_exceeded")
        return entry

    async def start(self, request: Request, body: ChatRequest | CompletionRequest, kind: str,
                    endpoint: str) -> Generation:
        """Takes a slot (JIT-loading if needed) and waits for the first token, giving up if the client leaves."""
        entry = await self.check(body, kind)
        started = time.perf_counter()
        try:
            return await until_disconnect(request, self.begin(entry, body, kind, endpoint, started),
                                          orphan=self.finish)
        except LmsError as exc:
            raise self._record_failure(body.model, endpoint, exc, started) from None

    async def begin(self, entry: ModelEntry, body: ChatRequest | CompletionRequest, kind: str, endpoint: str,
                    started: float, jit: bool | None = None) -> Generation:
        """Takes a slot (JIT-loading if needed, or if `jit`) and waits for the first token. The caller owns the
        result: it must `finish` it."""
        lease = await self.scheduler.acquire(body.model, body.ttl, jit=jit)
        try:
            stream = lease.worker.generate(kind, body.worker_params())
        except BaseException:
            self.scheduler.release(lease)  # never reached the worker
            raise
        try:
            first = await stream.__anext__()
        except BaseException:
            await _close(stream)
            self.scheduler.release(lease, until=stream.ended)  # the slot is free when the worker says so
            raise
        return Generation(lease, entry, stream, first, started, endpoint)

    async def collect(self, request: Request, gen: Generation) -> str:
        """Runs a non-streaming generation to its end; returns the text."""
        parts: list[str] = []

        async def drain() -> None:
            async for piece in self.tokens(gen):
                if isinstance(piece, HttpError):
                    raise piece
                parts.append(piece)

        try:
            await until_disconnect(request, drain())
        except ClientGone:
            gen.status = "client disconnected"
            raise
        finally:
            await self.finish(gen)
        return "".join(parts)

    async def tokens(self, gen: Generation) -> AsyncIterator[str | HttpError]:
        """The text pieces of a streaming generation; `gen.done` is set when it ends normally. A failure after
        the response has started (the worker crashed) comes last, as an HttpError for the stream to report."""
        event = gen.first
        try:
            while True:
                if event["ev"] == "token":
                    yield event["text"]
                elif event["ev"] == "done":
                    gen.done = event
                    return
                event = await gen.stream.__anext__()
        except asyncio.CancelledError:
            gen.status = "client disconnected"
            raise
        except LmsError as exc:
            gen.status = f"error: {exc.message}"
            yield from_lms_error(exc)

    async def finish(self, gen: Generation) -> None:
        """Gives the slot back (exactly once) and reports the request."""
        if gen.closed:
            return
        gen.closed = True
        await _close(gen.stream)
        self.scheduler.release(gen.lease, until=gen.stream.ended)
        if not gen.done and gen.status == "ok":
            gen.status = "client disconnected"
        usage, stats = gen.usage(), gen.stats()
        fields = {
            "endpoint": gen.endpoint, "status": gen.status, "prompt_tokens": str(usage["prompt_tokens"]),
            "completion_tokens": str(usage["completion_tokens"]),
            "tokens_per_second": f"{stats['tokens_per_second']:.1f}",
            "duration": f"{time.perf_counter() - gen.started:.3f}",
        }
        if gen.done:
            fields["time_to_first_token"] = f"{stats['time_to_first_token']:.4f}"
        log.info("request %s %s: %s, %s in / %s out tokens, %s tok/s", gen.endpoint, gen.identifier, gen.status,
                 fields["prompt_tokens"], fields["completion_tokens"], fields["tokens_per_second"])
        self.scheduler.emit(SchedulerEvent("request", gen.identifier, gen.entry.key, fields=fields))

    async def embed(self, request: Request, body: EmbeddingRequest) -> tuple[dict[str, Any], str]:
        entry = await self.check(body, "embedding")
        started = time.perf_counter()

        async def run() -> tuple[dict[str, Any], str]:
            lease = await self.scheduler.acquire(body.model, body.ttl)
            try:
                answer = lease.worker.embed(body.inputs, embedding_model=entry.type == "embedding")
            except BaseException:
                self.scheduler.release(lease)  # never reached the worker
                raise
            try:
                # Embeddings cannot be cancelled: if the client leaves, the slot stays taken until the worker is done.
                result = await asyncio.shield(answer)
                return result, lease.instance.identifier
            finally:
                self.scheduler.release(lease, until=answer)

        try:
            result, identifier = await until_disconnect(request, run())
        except LmsError as exc:
            raise self._record_failure(body.model, request.url.path, exc, started) from None
        self.scheduler.emit(SchedulerEvent("request", identifier, entry.key, fields={
            "endpoint": request.url.path, "status": "ok", "prompt_tokens": str(result.get("prompt_tokens", 0)),
            "completion_tokens": "0", "inputs": str(len(body.inputs)),
            "duration": f"{time.perf_counter() - started:.3f}"}))
        return result, identifier

    def _record_failure(self, model: str, endpoint: str, exc: LmsError, started: float) -> HttpError:
        """Reports a request that failed as a request event; returns the HTTP error to answer with."""
        err = from_lms_error(exc)
        self.scheduler.emit(SchedulerEvent("request", model, model, fields={
            "endpoint": endpoint, "status": f"error: {exc.message}", "http_status": str(err.status),
            "duration": f"{time.perf_counter() - started:.3f}"}))
        err.recorded = True
        return err


async def _close(stream: AsyncIterator[dict[str, Any]]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


async def until_disconnect(request: Request, work: Awaitable[T],
                           orphan: Callable[[T], Awaitable[None]] | None = None) -> T:
    """Awaits `work`, cancelling it (and raising ClientGone) if the client disconnects meanwhile. If this handler is
    itself cancelled just as `work` finished, `orphan(result)` gives back what the result holds (a lease)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                try:
                    result = await task
                except (asyncio.CancelledError, Exception):
                    raise ClientGone() from None
                # The work finished in the same instant the client left (the cancel came too late): hand the result
                # on, so whatever it holds (a lease, a stream) is given back by the caller's usual clean-up.
                return result
    except asyncio.CancelledError:
        task.cancel()
        if orphan is not None:
            task.add_done_callback(lambda t: _orphaned(t, orphan))
        raise


def _orphaned(task: asyncio.Future[T], orphan: Callable[[T], Awaitable[None]]) -> None:
    if not task.cancelled() and task.exception() is None:
        asyncio.ensure_future(orphan(task.result()))


class CleanupStreamingResponse(StreamingResponse):
    """A StreamingResponse that always runs `cleanup` — after a normal end, a client disconnect, or an error —
    so a streaming request's slot on its instance is given back in every case."""

    def __init__(self, content: AsyncIterator[str], cleanup: Callable[[], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(content, media_type="text/event-stream", **kwargs)
        self._cleanup = cleanup
        self.headers["Cache-Control"] = "no-cache"
        self.headers["X-Accel-Buffering"] = "no"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(self._cleanup())
