"""The gRPC control plane: thin translation between protobuf messages and scheduler calls."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

import grpc

from lmsd import __version__
from lmsd.api.v1 import control_pb2 as pb
from lmsd.api.v1 import control_pb2_grpc
from lmsd.config import UNLOAD_GRACE
from lmsd.errors import LmsError
from lmsd.scheduler import InstanceView, SchedulerEvent

if TYPE_CHECKING:
    from lmsd.app import Daemon

log = logging.getLogger(__name__)

_STATUS = {
    "not_found": grpc.StatusCode.NOT_FOUND,
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "internal": grpc.StatusCode.INTERNAL,
}
_HTTP_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
                429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE,
                500: grpc.StatusCode.INTERNAL}


def instance_pb(v: InstanceView) -> pb.Instance:
    msg = pb.Instance(
        identifier=v.identifier, model=v.model, status=v.status, origin=v.origin, context_length=v.context_length,
        size_bytes=v.size_bytes, memory_bytes=v.memory_bytes, pid=v.pid, in_flight=v.in_flight, queued=v.queued,
        last_used_unix=v.last_used_unix, path=v.path, estimated_memory_bytes=v.estimated_memory_bytes,
        parallel=v.parallel, message=v.message,
    )
    if v.ttl_seconds is not None:
        msg.ttl_seconds = v.ttl_seconds
    if v.ttl_remaining_seconds is not None:
        msg.ttl_remaining_seconds = v.ttl_remaining_seconds
    return msg


async def _abort(context: grpc.aio.ServicerContext, exc: LmsError) -> None:
    await context.abort(_STATUS[exc.kind], exc.message)


class ControlServicer(control_pb2_grpc.ControlServicer):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.scheduler = daemon.scheduler

    async def Load(self, request: pb.LoadRequest, context: Any) -> AsyncIterator[pb.LoadEvent]:
        progress: asyncio.Queue[float] = asyncio.Queue()
        ttl = request.ttl_seconds if request.HasField("ttl_seconds") else None
        if request.estimate_only:
            try:
                est = await self.scheduler.estimate_load(request.model, request.context_length, request.parallel)
            except LmsError as exc:
                await _abort(context, exc)
                return
            msg = pb.MemoryEstimate(model=est.model, context_length=est.context_length,
                                    estimated_memory_bytes=est.estimated_memory_bytes,
                                    available_bytes=est.available_bytes, fits=est.fits, detail=est.detail)
            if est.budget_bytes is not None:
                msg.budget_bytes = est.budget_bytes
            yield pb.LoadEvent(estimate=msg)
            return
        try:
            inst = await self.scheduler.begin_load(
                request.model, ttl=ttl, identifier=request.identifier, context_length=request.context_length,
                parallel=request.parallel, progress=progress.put_nowait,
            )
        except LmsError as exc:
            await _abort(context, exc)
            return
        try:
            yield pb.LoadEvent(progress=pb.LoadProgress(fraction=0.0, stage="starting"))
            while not inst.ready.done():
                getter = asyncio.ensure_future(progress.get())
                await asyncio.wait([cast("asyncio.Future[Any]", inst.ready), getter],
                                   return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield pb.LoadEvent(progress=pb.LoadProgress(fraction=getter.result(), stage="loading"))
                else:
                    getter.cancel()
        except asyncio.CancelledError:
            # The client went away (Ctrl-C on `lms load`): a load nobody waits for is abandoned.
            if not inst.ready.done():
                log.info("load of %s cancelled by the client", inst.identifier)
                with contextlib.suppress(LmsError):
                    await self.scheduler.unload(inst.identifier, reason="manual")
            raise
        error = inst.ready.exception()
        if isinstance(error, LmsError):
            await _abort(context, error)
            return
        yield pb.LoadEvent(instance=instance_pb(self.scheduler.view(inst)))

    async def Unload(self, request: pb.UnloadRequest, context: Any) -> pb.UnloadResponse:
        grace = request.grace_seconds if request.HasField("grace_seconds") else UNLOAD_GRACE
        try:
            if request.all:
                ids = await self.scheduler.unload_all(reason="manual", grace=grace)
            else:
                await self.scheduler.unload(request.identifier, reason="manual", grace=grace)
                ids = [request.identifier]
        except LmsError as exc:
            await _abort(context, exc)
            return pb.UnloadResponse()
        return pb.UnloadResponse(identifiers=ids)

    async def ListLoaded(self, request: pb.ListLoadedRequest, context: Any) -> pb.ListLoadedResponse:
        # On the loop, like every read of the instance table (a thread could see it change mid-iteration).
        mem = self.scheduler.memory_view()
        memory = pb.MemoryStatus(used_bytes=mem.used_bytes, available_bytes=mem.available_bytes, limit=mem.limit)
        if mem.budget_bytes is not None:
            memory.budget_bytes = mem.budget_bytes
        return pb.ListLoadedResponse(instances=[instance_pb(v) for v in self.scheduler.list_loaded()],
                                     memory=memory)

    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        entries = await asyncio.to_thread(self.daemon.catalog.scan)
        loaded = {i.entry.path for i in self.scheduler.instances()}
        models = [
            pb.ModelInfo(
                key=e.key, path=e.rel_path, size_bytes=e.size_bytes, arch=e.arch, quantization=e.quantization,
                params=e.params, max_context_length=e.max_context_length, type=e.type,
                has_chat_template=e.has_chat_template, loaded=e.path in loaded, error=e.error,
            )
            for e in entries
        ]
        return pb.ListModelsResponse(models=models, models_dir=str(self.daemon.catalog.models_dir))

    def _settings_pb(self) -> pb.Settings:
        store = self.daemon.settings_store
        s = store.settings
        return pb.Settings(jit=s.jit, auto_evict=s.auto_evict, default_ttl=s.default_ttl, port=s.port, bind=s.bind,
                           cors=s.cors, settings_path=str(store.path),
                           warning=store.warning or store.pop_notice(),
                           api_key_set=self.daemon.api_key.get() is not None, memory_limit=str(s.memory_limit),
                           max_loaded_models=s.max_loaded_models, load_timeout=s.load_timeout, max_wait=s.max_wait,
                           default_parallel=s.default_parallel)

    async def GetSettings(self, request: pb.GetSettingsRequest, context: Any) -> pb.Settings:
        return self._settings_pb()

    async def UpdateSettings(self, request: pb.UpdateSettingsRequest, context: Any) -> pb.Settings:
        fields = ("jit", "auto_evict", "default_ttl", "port", "bind", "cors", "max_loaded_models", "load_timeout",
                  "max_wait", "default_parallel")
        changes: dict[str, Any] = {f: getattr(request, f) for f in fields if request.HasField(f)}  # type: ignore[arg-type]
        key = request.api_key.strip() if request.HasField("api_key") else None
        try:
            if request.HasField("memory_limit"):
                from lmsd.memory import parse_memory_limit

                changes["memory_limit"] = parse_memory_limit(request.memory_limit)
            # Everything is checked before anything is written: a refused request changes nothing.
            if key and (len(key) < 8 or any(c.isspace() for c in key)):
                raise ValueError("an API key needs at least 8 characters and no spaces")
            candidate = dataclasses.replace(self.daemon.settings_store.settings, **changes)
            candidate.validate()
            if self.daemon.http.running and {"port", "bind", "cors"} & set(changes):
                # If the new address cannot be bound, or the settings not saved, the old endpoint keeps serving.
                await self.daemon.move_http(changes)
            else:
                self.daemon.settings_store.update(**changes)
            if key is not None:
                self.daemon.api_key.set(key or None)
                log.info("API key %s", "set" if key else "cleared")  # the key itself is never logged
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except LmsError as exc:
            await _abort(context, exc)
        except OSError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"could not save settings to {self.daemon.settings_store.path}: "
                                f"{exc.strerror or exc}; nothing was changed")
        shown = {k: json.dumps(v) for k, v in changes.items()}  # true, not True: what the CLI and settings say
        if key is not None:
            shown["api_key"] = "set" if key else "cleared"  # the key itself is never shown
        if changes:
            log.info("settings changed: %s", ", ".join(f"{k}={v}" for k, v in shown.items()))
            self.scheduler.settings_changed()
        if shown:
            self.scheduler.emit(SchedulerEvent("settings", "", "", message=", ".join(
                f"{k}={v}" for k, v in shown.items()), fields=shown))
        return self._settings_pb()

    async def WatchEvents(self, request: pb.WatchEventsRequest, context: Any) -> AsyncIterator[pb.Event]:
        queue = self.scheduler.subscribe()
        try:
            while True:
                ev = await queue.get()
                yield pb.Event(time_unix=ev.time_unix, kind=ev.kind, identifier=ev.identifier, model=ev.model,
                               reason=ev.reason, message=ev.message, fields=ev.fields)
        finally:
            self.scheduler.unsubscribe(queue)

    def _http_pb(self) -> pb.HttpStatus:
        http = self.daemon.http
        s = self.daemon.settings_store.settings
        running = http.running
        return pb.HttpStatus(running=running, port=http.port if running else s.port,
                             bind=http.bind if running else s.bind, cors=http.cors if running else s.cors,
                             url=http.url(), api_key_set=self.daemon.api_key.get() is not None)

    async def ServerStart(self, request: pb.ServerStartRequest, context: Any) -> pb.HttpStatus:
        s = self.daemon.settings_store.settings
        port = request.port if request.HasField("port") else s.port
        bind = request.bind if request.HasField("bind") else s.bind
        cors = request.cors if request.HasField("cors") else s.cors
        try:
            was = self.daemon.http.url()
            await self.daemon.start_http(port, bind, cors)
            if self.daemon.http.url() != was or not was:
                self.scheduler.emit(SchedulerEvent("server", "", "", message=f"HTTP endpoint started on "
                                                   f"{self.daemon.http.url()} (cors {'on' if cors else 'off'})",
                                                   fields={"url": self.daemon.http.url()}))
        except LmsError as exc:
            await _abort(context, exc)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except OSError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"could not save settings: {exc}")
        return self._http_pb()

    async def ServerStop(self, request: pb.ServerStopRequest, context: Any) -> pb.HttpStatus:
        try:
            running = self.daemon.http.running
            await self.daemon.stop_http()
            if running:
                self.scheduler.emit(SchedulerEvent("server", "", "", message="HTTP endpoint stopped"))
        except OSError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"could not save settings: {exc}")
        return self._http_pb()

    async def GetServerStatus(self, request: pb.ServerStatusRequest, context: Any) -> pb.HttpStatus:
        return self._http_pb()

    async def Health(self, request: pb.HealthRequest, context: Any) -> pb.HealthResponse:
        return pb.HealthResponse(
            status="shutting_down" if self.daemon.stopping.is_set() else "ok",
            pid=os.getpid(),
            uptime_seconds=time.time() - self.daemon.started_at,
            loaded=len(self.scheduler.instances()),
            lms_home=str(self.daemon.paths.home),
        )

    async def Version(self, request: pb.VersionRequest, context: Any) -> pb.VersionResponse:
        from importlib.metadata import PackageNotFoundError, version

        try:
            llama = version("llama-cpp-python")
        except PackageNotFoundError:
            llama = "not installed"
        return pb.VersionResponse(version=__version__, llama_cpp_python=llama)

    async def Chat(self, request: pb.ChatRequest, context: Any) -> AsyncIterator[pb.ChatEvent]:
        """`lms chat`: one turn, streamed, as /v1/chat/completions serves it (same checks, slots, events), with the
        model loaded just in time even when JIT is off for HTTP — the user asked for this model by name."""
        from pydantic import ValidationError

        from lmsd.http.errors import HttpError
        from lmsd.http.inference import Inference
        from lmsd.http.schemas import ChatRequest

        model = request.model.strip() or self._only_llm()
        if not model:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "name a model: none or several are loaded (see `lms ps`, `lms ls`)")
        fields: dict[str, Any] = {"model": model, "messages": [{"role": m.role, "content": m.content}
                                                              for m in request.messages]}
        for name in ("ttl_seconds", "max_tokens", "temperature"):
            if request.HasField(name):
                fields["ttl" if name == "ttl_seconds" else name] = getattr(request, name)
        try:
            body = ChatRequest.model_validate(fields)
        except ValidationError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc.errors()[0]["msg"]))
        inference = Inference(self.scheduler)
        started = time.perf_counter()
        try:
            entry = await inference.check(body, "chat", jit=True)
            gen = await inference.begin(entry, body, "chat", "lms chat", started, jit=True)
        except LmsError as exc:
            inference._record_failure(model, "lms chat", exc, started)
            await _abort(context, exc)
            return
        except HttpError as exc:
            await context.abort(_HTTP_STATUS.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT), exc.message)
            return
        try:
            async for text in inference.tokens(gen):
                if isinstance(text, HttpError):
                    await context.abort(_HTTP_STATUS.get(text.status, grpc.StatusCode.INTERNAL), text.message)
                    return
                yield pb.ChatEvent(text=text)
            stats, usage = gen.stats(), gen.usage()
            yield pb.ChatEvent(done=pb.ChatDone(
                identifier=gen.identifier, finish_reason=str(gen.done.get("finish_reason", "stop")),
                prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"],
                time_to_first_token=stats["time_to_first_token"], tokens_per_second=stats["tokens_per_second"],
                generation_time=stats["generation_time"]))
        finally:
            await asyncio.shield(inference.finish(gen))  # gives the slot back, stops a cancelled generation

    def _only_llm(self) -> str:
        llms = [i.identifier for i in self.scheduler.instances() if i.entry.type != "embedding" and not i.draining]
        return llms[0] if len(llms) == 1 else ""

    async def Shutdown(self, request: pb.ShutdownRequest, context: Any) -> pb.ShutdownResponse:
        log.info("shutdown requested over the control socket")
        asyncio.get_running_loop().call_soon(self.daemon.request_stop)
        return pb.ShutdownResponse()
