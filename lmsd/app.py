"""The daemon: start, serve the control plane, shut down in order.

One daemon per LMS_HOME: a flock on run/lmsd.lock is held for the daemon's whole life. The kernel drops it
when the process dies, however it dies, so a pid file or socket found while we hold the lock is stale and
is removed. Signal handlers only set an event; shutdown then runs in order: refuse new work, drain and
unload instances, end workers, stop gRPC, and remove the pid file and socket in `finally`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import logging.handlers
import os
import signal
import sys
import time
from typing import Any

from lmsd import __version__
from lmsd.catalog import Catalog
from lmsd.config import ApiKeyStore, Paths, SettingsStore
from lmsd.errors import LmsError
from lmsd.http.server import HttpService
from lmsd.memory import Measurements
from lmsd.metrics import Metrics
from lmsd.scheduler import Scheduler
from lmsd.worker.handle import WorkerPool

log = logging.getLogger("lmsd")

SHUTDOWN_GRACE = 10.0  # seconds running requests get to finish when the daemon stops
EXIT_ALREADY_RUNNING = 4
_MAX_UNIX_PATH = 107


class AlreadyRunning(Exception):
    pass


class Daemon:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.started_at = time.time()
        self.stopping = asyncio.Event()
        self.settings_store = SettingsStore(paths.settings)
        self.catalog = Catalog(paths.models, paths.cache_dir / "catalog.json")
        self.pool = WorkerPool(paths.log_dir / "workers.log")
        # LMS_MAX_QUEUE: requests one model holds waiting (for a slot, or riding its load) before answering 429.
        # 64 by default: under contention every request for a model waits for its swap, and a few agents with
        # several requests each fill 16 (Ollama's OLLAMA_MAX_QUEUE is 512; max_wait bounds the wait anyway).
        max_queue = _env_int("LMS_MAX_QUEUE", 64, 1, 100_000)
        self.scheduler = Scheduler(self.catalog, self.pool, lambda: self.settings_store.settings,
                                   max_queue=max_queue, measurements=Measurements(paths.cache_dir / "memory.json"))
        self.api_key = ApiKeyStore(paths.home / "api_key")
        self.http = HttpService(self._make_http_app)
        self.metrics = Metrics(self.scheduler)  # counts from start-up, whether the HTTP endpoint runs or not
        self._lock_fd: int | None = None

    def _make_http_app(self, cors: bool, bind: str) -> Any:
        from lmsd.http.server import create_app

        return create_app(self.scheduler, self.catalog, lambda: self.settings_store.settings, self.api_key.get,
                          cors=cors, bind=bind, metrics=self.metrics)

    async def start_http(self, port: int, bind: str, cors: bool) -> None:
        """Starts (or restarts) the HTTP endpoint and remembers it, so the next daemon start brings it back.
        Raises ValueError for a bad port or address before anything is started."""
        dataclasses.replace(self.settings_store.settings, port=port, bind=bind, cors=cors).validate()
        await self.move_http({"port": port, "bind": bind, "cors": cors, "http_enabled": True})

    async def move_http(self, changes: dict[str, object]) -> None:
        """Starts or moves the endpoint to the settings `changes` make, then saves them. The new socket is bound
        first (the old endpoint serves until then); if the settings cannot be saved (a full disk), the endpoint
        goes back to what the saved settings say, and this raises."""
        target = dataclasses.replace(self.settings_store.settings, **changes)  # type: ignore[arg-type]
        was = (self.http.port, self.http.bind, self.http.cors) if self.http.running else None
        await self.http.start(target.port, target.bind, target.cors)
        try:
            self.settings_store.update(**changes)
        except OSError:
            if was is None:
                await self.http.stop()
            else:
                await self.http.start(*was)
            raise

    async def stop_http(self) -> None:
        await self.http.stop()
        self.settings_store.update(http_enabled=False)

    # ---------------------------------------------------------------- single instance

    def acquire_lock(self) -> None:
        """Takes the LMS_HOME lock or raises AlreadyRunning; then clears stale state left by a crash."""
        run = self.paths.run_dir
        run.mkdir(parents=True, exist_ok=True)
        os.chmod(run, 0o700)
        fd = os.open(self.paths.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(
                f"lmsd is already running for {self.paths.home} (pid {_read_pid(self.paths)})") from None
        self._lock_fd = fd
        for stale in (self.paths.socket, self.paths.pid_file):
            if stale.exists() or stale.is_symlink():
                log.warning("removing stale %s left by a daemon that did not shut down cleanly", stale.name)
                stale.unlink()

    def release_lock(self) -> None:
        for path in (self.paths.socket, self.paths.pid_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---------------------------------------------------------------- run

    async def run(self) -> None:
        sock = str(self.paths.socket)
        if len(sock) > _MAX_UNIX_PATH:
            raise SystemExit(f"lmsd: the socket path {sock} is longer than Unix allows; use a shorter LMS_HOME")
        # The models folder is indexed in the background from now on: requests wait only for the walk of its names.
        self.catalog.start()
        try:
            await self._serve(sock)
        finally:
            await asyncio.to_thread(self.catalog.stop)  # a batch of headers being read is finished first

    async def _serve(self, sock: str) -> None:
        import grpc

        from lmsd.api.v1 import control_pb2_grpc
        from lmsd.control.servicer import ControlServicer

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        control_pb2_grpc.add_ControlServicer_to_server(ControlServicer(self), server)
        old_umask = os.umask(0o177)  # the socket is created 0600: only this user may drive the daemon
        try:
            server.add_insecure_port(f"unix:{sock}")
            await server.start()
        finally:
            os.umask(old_umask)
        os.chmod(sock, 0o600)
        self.paths.pid_file.write_text(f"{os.getpid()}\n")
        if self.settings_store.warning:
            log.warning("settings: %s", self.settings_store.warning)
        log.info("lmsd %s listening on %s (pid %d, models in %s)", __version__, sock, os.getpid(), self.paths.models)
        self.pool.prestart()
        timer = asyncio.ensure_future(self.scheduler.run_timer())
        settings = self.settings_store.settings
        if settings.http_enabled:
            try:
                await self.http.start(settings.port, settings.bind, settings.cors)
            except LmsError as exc:
                log.error("the HTTP endpoint was on before the restart but cannot start now: %s", exc.message)
        try:
            await self.stopping.wait()
            # New requests now get 503 (the scheduler refuses them); running ones get the grace period.
            log.info("shutting down: draining requests (up to %ss)", SHUTDOWN_GRACE)
            await self.scheduler.shutdown(grace=SHUTDOWN_GRACE)
            await self.http.stop()
            await self.pool.close()
        finally:
            timer.cancel()
            await server.stop(grace=1.0)
            log.info("lmsd stopped")

    def request_stop(self) -> None:
        self.stopping.set()


def _env_int(name: str, default: int, low: int, high: int) -> int:
    """A whole number from the environment; anything else is logged and the default used (never a traceback)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if text.isdigit() and low <= int(text) <= high:
        return int(text)
    log.warning("%s=%r is not a whole number from %d to %d; using %d", name, text[:40], low, high, default)
    return default


def _read_pid(paths: Paths) -> str:
    try:
        return paths.pid_file.read_text().strip() or "?"
    except OSError:
        return "?"


def setup_logging(paths: Paths) -> None:
    paths.log_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = logging.handlers.RotatingFileHandler(paths.log_file, maxBytes=5 * 1024 * 1024, backupCount=3)
    handler.setFormatter(fmt)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    if sys.stderr.isatty():
        console = logging.StreamHandler()
        console.setFormatter(fmt)
        root.addHandler(console)


def main(argv: list[str] | None = None) -> int:
    paths = Paths.from_env()
    setup_logging(paths)

    async def start() -> None:
        daemon = Daemon(paths)
        daemon.acquire_lock()
        try:
            await daemon.run()
        finally:
            daemon.release_lock()

    try:
        asyncio.run(start())
    except AlreadyRunning as exc:
        print(f"lmsd: {exc}", file=sys.stderr)
        return EXIT_ALREADY_RUNNING
    return 0
