"""The daemon's side of a worker process: spawn, load, generate, embed, cancel, stop; death noticed at once."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmsd.errors import (
    InvalidArgument,
    LoadKilled,
    ModelLoadFailed,
    Unavailable,
    WorkerError,
    WorkerGone,
    WorkerStopped,
)

log = logging.getLogger(__name__)

_READY_TIMEOUT = 120.0  # importing llama_cpp on a cold, busy machine can take a while
_STOP_TIMEOUT = 10.0  # a worker told to exit that is still there after this is SIGKILLed
_LINE_LIMIT = 256 * 1024 * 1024  # one protocol line may carry a batch of embeddings
_ids = itertools.count(1)
SPARE_DELAY_MAX = 120.0  # a load that takes longer than this no longer holds back the next spare
SPARE_DELAY = 5.0  # seconds after a load before the next spare worker starts


WORKER_LOG_MAX = 5 * 1024 * 1024  # bytes; like lmsd.log, rotated with 3 old copies
WORKER_LOG_KEEP = 3


def rotate(path: Path, max_bytes: int = WORKER_LOG_MAX, keep: int = WORKER_LOG_KEEP) -> None:
    """Rotates `path` (to .1, .2 ... .keep) once it has grown past max_bytes. Each worker appends to the log it was
    started with; rotating before a start keeps the files bounded without touching a log a worker still writes."""
    try:
        if path.stat().st_size <= max_bytes:
            return
        for n in range(keep - 1, 0, -1):
            older = path.with_name(f"{path.name}.{n}")
            if older.exists():
                os.replace(older, path.with_name(f"{path.name}.{n + 1}"))
        os.replace(path, path.with_name(f"{path.name}.1"))
    except OSError:
        pass  # no log, or it cannot be moved: logging is never a reason to fail a load


class WorkerProcess:
    """One `python -m lmsd.worker` child. Create with `await WorkerProcess.spawn(...)`."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._load: asyncio.Future[dict[str, Any]] | None = None
        self._progress: Callable[[float], None] | None = None
        self._requests: dict[str, _Request] = {}  # request id -> the request, until the worker reports its end
        self._waiting: set[str] = set()  # requests the worker holds until its KV cache has room for them
        self.parallel = 0  # requests the loaded model decodes together, as the worker reports it
        self._exit_callbacks: list[Callable[[str], None]] = []
        self._stop_reason: str | None = None  # set when the daemon asked the worker to end
        self.exited = asyncio.Event()
        self.load_done = asyncio.Event()  # set when a load has finished, however it ended
        self.exit_why = ""
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def spawn(cls, log_file: Path | None = None) -> WorkerProcess:
        stderr: Any = asyncio.subprocess.DEVNULL
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            rotate(log_file)
            stderr = open(log_file, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-P", "-m", "lmsd.worker",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                limit=_LINE_LIMIT,
                start_new_session=True,  # a Ctrl-C in the daemon's terminal is the daemon's to handle
            )
        finally:
            if log_file is not None:
                stderr.close()
        worker = cls(proc)
        try:
            await asyncio.wait_for(asyncio.shield(worker._ready), _READY_TIMEOUT)
        except BaseException:
            await worker.stop("worker did not start")
            raise
        return worker

    # ---------------------------------------------------------------- protocol

    def _send(self, **msg: Any) -> None:
        if self.exited.is_set() or self.proc.stdin is None or self.proc.stdin.is_closing():
            if self._stop_reason is not None:
                raise WorkerStopped(self._stop_reason)
            raise WorkerGone(f"the worker (pid {self.pid}) is gone: {self.exit_why}")
        self.proc.stdin.write((json.dumps(msg, separators=(",", ":")) + "\n").encode())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    break
                try:
                    event = json.loads(line)
                except ValueError:
                    log.warning("worker %s sent a malformed line", self.pid)
                    continue
                self._dispatch(event)
        except (asyncio.LimitOverrunError, ValueError) as exc:
            log.error("worker %s protocol failure: %s", self.pid, exc)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        code = await self.proc.wait()
        self._on_exit(code)

    def _dispatch(self, event: dict[str, Any]) -> None:
        ev = event.get("ev")
        if ev == "ready":
            if not self._ready.done():
                self._ready.set_result(None)
        elif ev == "progress":
            if self._progress is not None:
                self._progress(float(event.get("fraction", 0.0)))
        elif ev in ("loaded", "load_error"):
            if self._load is not None and not self._load.done():
                self._load.set_result(event)
        elif ev == "queued":
            self._waiting.add(str(event.get("id", "")))
        elif ev == "running":
            self._waiting.discard(str(event.get("id", "")))
        else:
            rid = str(event.get("id", ""))
            if ev in _TERMINAL:
                self._waiting.discard(rid)
            req = self._requests.get(rid)
            if req is not None:
                req.deliver(event)

    def _on_exit(self, code: int) -> None:
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            self.exit_why = f"killed by {name}"
        else:
            self.exit_why = f"exited with code {code}"
        self.exited.set()
        gone = {"ev": "gone", "message": self._stop_reason or f"the worker (pid {self.pid}) {self.exit_why}",
                "stopped": self._stop_reason is not None}
        self._waiting.clear()
        for req in list(self._requests.values()):
            req.deliver(gone)
        if self._load is not None and not self._load.done():
            self._load.set_result(gone)
        if not self._ready.done():
            self._ready.set_exception(Unavailable(f"the worker (pid {self.pid}) {self.exit_why} while starting"))
        if self._stop_reason is None:
            for cb in self._exit_callbacks:
                cb(self.exit_why)

    # ---------------------------------------------------------------- the Worker interface

    def on_exit(self, callback: Callable[[str], None]) -> None:
        self._exit_callbacks.append(callback)

    async def load(self, path: str, context_length: int, progress: Callable[[float], None], *,
                   embedding: bool = False, parallel: int = 1) -> int:
        """Loads the model with `parallel` sequences decoded together; returns the context length it got."""
        self._progress = progress
        self._load = asyncio.get_running_loop().create_future()
        try:
            self._send(op="load", path=path, n_ctx=context_length, embedding=embedding, parallel=parallel)
            result = await self._load
        finally:
            self._progress = None
            self.load_done.set()
        if result.get("ev") == "load_error":
            raise ModelLoadFailed(f"llama.cpp could not load {Path(path).name}: {result.get('message')}")
        if result.get("ev") == "gone":
            if self._stop_reason is not None:  # stopped on purpose (an unload): not the file's fault
                raise Unavailable(self._stop_reason)
            # SIGKILL from outside is most often the kernel's out-of-memory killer: worth retrying, not the file's
            # fault. A crash inside llama.cpp (SIGSEGV, SIGABRT, an exit) points at the file.
            if "SIGKILL" in self.exit_why:
                raise LoadKilled(f"the worker loading {Path(path).name} was {self.exit_why} (out of memory? "
                                 "`lms load MODEL --estimate-only` shows what it needs)")
            raise ModelLoadFailed(f"the worker loading {Path(path).name} {self.exit_why} "
                                  "(a corrupt or unsupported model file?)")
        self.parallel = int(result.get("parallel") or 1)
        return int(result["n_ctx"])

    def generate(self, kind: str, params: dict[str, Any]) -> GenerateStream:
        """Yields `token` events, then a final `done` event. Leaving early (aclose) cancels the generation; the
        stream's `ended` resolves when the worker reports it over."""
        req = _Request(self, str(next(_ids)))
        req.send(op="generate", id=req.rid, kind=kind, params=params)
        return GenerateStream(self, req)

    def embed(self, inputs: list[str], *, embedding_model: bool) -> asyncio.Future[dict[str, Any]]:
        """The embeddings, as a future the worker's answer resolves whoever still waits for it."""
        req = _Request(self, str(next(_ids)))
        result: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        def answered(event: dict[str, Any]) -> None:
            if result.done():
                return
            if event.get("ev") == "embeddings":
                result.set_result(event)
            elif event.get("ev") == "gone":
                result.set_exception(_gone_error(event))
            else:
                result.set_exception(_request_error(event))

        req.on_end = answered
        req.send(op="embed", id=req.rid, input=inputs, embedding_model=embedding_model)
        return result

    async def stop(self, reason: str, *, kill: bool = False) -> None:
        """Asks the worker to exit and SIGKILLs it if it is still there after _STOP_TIMEOUT; with `kill`, at
        once (a stuck load: a frozen process cannot read the request)."""
        if self._stop_reason is None:
            self._stop_reason = reason
        if not self.exited.is_set():
            with contextlib.suppress(WorkerGone, ConnectionError, RuntimeError):
                self._send(op="shutdown")
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.exited.wait(), 0 if kill else _STOP_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.exited.wait()
        await asyncio.shield(self._reader)

    def waiting(self) -> int:
        """Requests the worker has but cannot start yet: its KV cache has no room for them until others end."""
        return len(self._waiting)

    def memory_bytes(self) -> int:
        """Resident memory (what `lms ps` shows): private memory plus the pages of the mapped model file."""
        return self._memory(private=False)

    def private_memory_bytes(self) -> int:
        """Resident memory that is the worker's alone (KV cache, compute buffers, the interpreter): without the
        mapped model file, whose pages the system already counts as available (reclaimable page cache)."""
        return self._memory(private=True)

    def _memory(self, *, private: bool) -> int:
        if self.exited.is_set():
            return 0
        try:
            import psutil

            info = psutil.Process(self.pid).memory_info()
            return int(info.rss - getattr(info, "shared", 0)) if private else int(info.rss)
        except Exception:  # noqa: BLE001 - the process may end between the check and the read
            return 0


_TERMINAL = {"done", "error", "embeddings", "gone"}


class _Request:
    """One request on a worker, registered from the moment it is sent until the worker reports its end (or dies),
    whether or not anyone still reads it."""

    def __init__(self, worker: WorkerProcess, rid: str) -> None:
        self.worker = worker
        self.rid = rid
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.on_end: Callable[[dict[str, Any]], None] | None = None
        worker._requests[rid] = self

    def send(self, **msg: Any) -> None:
        try:
            self.worker._send(**msg)
        except WorkerGone as exc:
            # never sent: it has ended already
            self.deliver({"ev": "gone", "message": exc.message, "stopped": isinstance(exc, WorkerStopped)})
            raise

    def deliver(self, event: dict[str, Any]) -> None:
        self.events.put_nowait(event)
        if event.get("ev") in _TERMINAL:
            self.worker._requests.pop(self.rid, None)
            if self.on_end is not None:
                self.on_end(event)
            if not self.ended.done():
                self.ended.set_result(None)


class GenerateStream:
    """The events of one generation (token*, then done); see WorkerProcess.generate."""

    def __init__(self, worker: WorkerProcess, req: _Request) -> None:
        self._worker = worker
        self._req = req
        self._finished = False
        self.ended = req.ended

    def __aiter__(self) -> GenerateStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._finished:
            raise StopAsyncIteration
        event = await self._req.events.get()
        ev = event.get("ev")
        if ev == "token":
            return event
        self._finished = True
        if ev == "done":
            return event
        if ev == "gone":
            raise _gone_error(event)
        raise _request_error(event)

    async def aclose(self) -> None:
        """Stops reading; a generation the worker has not finished is cancelled (before its next token)."""
        self._finished = True
        if not self.ended.done():
            with contextlib.suppress(WorkerGone):
                self._worker._send(op="cancel", id=self._req.rid)


def _gone_error(event: dict[str, Any]) -> WorkerGone:
    """A request ended by the worker's end: a crash (500) or a stop the daemon asked for (503)."""
    return (WorkerStopped if event.get("stopped") else WorkerGone)(str(event["message"]))


def _request_error(event: dict[str, Any]) -> Exception:
    code = str(event.get("code") or "internal_error")
    message = str(event.get("message") or "the worker failed")
    if code == "internal_error":
        return WorkerError(message)
    return InvalidArgument(message, code=code)


class WorkerPool:
    """The worker factory the scheduler uses. Keeps one spare worker that has already imported llama_cpp,
    so a load starts at once instead of paying the interpreter and library start-up."""

    def __init__(self, log_file: Path | None) -> None:
        self.log_file = log_file
        self.spare_enabled = os.environ.get("LMS_SPARE_WORKER", "1") != "0"
        self._spare: asyncio.Task[WorkerProcess] | None = None
        self._pending: set[asyncio.Future[None]] = set()  # "start the next spare later" tasks
        self._closed = False

    def prestart(self) -> None:
        if self.spare_enabled and not self._closed and self._spare is None:
            self._spare = asyncio.ensure_future(WorkerProcess.spawn(self.log_file))

    async def __call__(self) -> WorkerProcess:
        if self._closed:
            raise Unavailable("the daemon is shutting down")
        spare, self._spare = self._spare, None
        worker: WorkerProcess | None = None
        if spare is not None:
            try:
                worker = await spare
            except Exception as exc:  # noqa: BLE001 - a failed spare is replaced by a fresh spawn
                log.warning("spare worker failed to start: %s", exc)
            if worker is not None and worker.exited.is_set():
                worker = None
        if worker is None:
            worker = await WorkerProcess.spawn(self.log_file)
        # The next spare starts a few seconds after this worker's load is over: importing llama_cpp takes a few
        # hundred ms of CPU, and meanwhile it would slow down the load and the first request (on a 2-core
        # machine, llama.cpp's threads need both cores).
        task = asyncio.ensure_future(self._prestart_after(worker))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return worker

    async def _prestart_after(self, worker: WorkerProcess) -> None:
        waits = [asyncio.ensure_future(worker.load_done.wait()), asyncio.ensure_future(worker.exited.wait())]
        try:
            await asyncio.wait(waits, timeout=SPARE_DELAY_MAX, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        await asyncio.sleep(SPARE_DELAY)
        self.prestart()

    async def close(self) -> None:
        self._closed = True
        for task in list(self._pending):
            task.cancel()
        spare, self._spare = self._spare, None
        if spare is not None:
            try:
                worker = await spare
            except Exception:  # noqa: BLE001
                return
            await worker.stop("daemon shutting down")
