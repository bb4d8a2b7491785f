"""Following the models folder: the catalog's one background thread.

The thread builds the index once (a walk of names, then the headers), then follows the folder with watchfiles
(inotify on Linux, as uvicorn's --reload does) and hands what changed to the catalog. Where the folder cannot be
watched (no inotify watches left, a file system without notifications) it polls instead: a walk of names every
`poll_interval`, or sooner when a request asks for a name the index does not know. Where there is no folder yet, it
looks for one every _FOLDER_CHECK seconds. A walk reads names and sizes only; headers come from the cache unless a
file changed. docs/models.md says what a user sees.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

log = logging.getLogger(__name__)

Changes = Iterable[tuple[int, str]]  # (watchfiles.Change, path) pairs
WatchFactory = Callable[[str, threading.Event], Iterator[Changes]]

# The watcher yields at least this often, changes or not; `catch_up` counts these rounds. Changes are reported once
# the folder has been quiet for _WATCH_STEP_MS, or after _WATCH_DEBOUNCE_MS of steady change.
_WATCH_TICK_MS = 100
_WATCH_STEP_MS = 50
_WATCH_DEBOUNCE_MS = 400
POLL_INTERVAL = 5.0  # seconds between walks of names when the folder cannot be watched
_FOLDER_CHECK = 0.5  # seconds between looks for a models folder that does not exist yet (a stat)
# Requests may ask for a poll sooner (a name the index does not know), but polls come at most this often: a client
# sending unknown names cannot make the daemon walk the folder more than once a second.
POLL_SPACING = 1.0
RETRY_WATCH = 60.0  # while polling, watching is tried again this often (the inotify limit may have been raised)


class Index(Protocol):
    """What the thread drives: the catalog."""

    def refresh(self, paths: Iterable[str] | None = None) -> bool: ...
    def read_headers(self, only: Iterable[str] | None = None) -> None: ...
    def apply(self, changes: Changes) -> None: ...
    def built(self, names: bool, headers: bool) -> None: ...


class CannotWatch(Exception):
    pass


def watch_folder(root: str, stop: threading.Event) -> Iterator[Changes]:
    """watchfiles' recursive watch of root (links followed), yielding every _WATCH_TICK_MS even when nothing
    changed. Hidden folders (downloads in progress) are left out."""
    from watchfiles import watch

    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # not "1 change detected" in lmsd.log for each change
    prefix = root.rstrip(os.sep) + os.sep

    def visible(_change: object, path: str) -> bool:
        rel = path[len(prefix):] if path.startswith(prefix) else ""  # the folder itself may be under ~/.lmstudio
        return not any(part.startswith(".") for part in rel.split(os.sep))

    return watch(root, watch_filter=visible, debounce=_WATCH_DEBOUNCE_MS, step=_WATCH_STEP_MS,
                 rust_timeout=_WATCH_TICK_MS, yield_on_timeout=True, stop_event=stop, raise_interrupt=False,
                 ignore_permission_denied=True)


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class Watcher:
    """The thread that builds the index and keeps it current. `mode` says how: "starting", "watching", "polling"
    (watching was not possible), "waiting" (no folder yet: checked every _FOLDER_CHECK seconds)."""

    def __init__(self, root: str, watch: WatchFactory, index: Index, *, poll_interval: float = POLL_INTERVAL,
                 poll_spacing: float = POLL_SPACING) -> None:
        self.root = root
        self.mode = "starting"
        self.alive = False  # the thread runs; when it has died, the catalog reads the folder on each call
        self._watch = watch
        self._index = index
        self._poll_interval = poll_interval
        self._poll_spacing = poll_spacing
        self._stop = threading.Event()
        self._wake = threading.Event()  # a request asks for a poll
        # A round: the thread waits for changes (the watcher's next batch, the next poll), then applies them. It
        # is counted in _collected when the wait ends and in _applied when what it found is in the index.
        self._cond = threading.Condition()  # guards _collected and _applied
        self._collected = 0
        self._applied = 0
        self._last_walk = float("-inf")
        self._thread: threading.Thread | None = None

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start(self) -> None:
        self.alive = True
        self._thread = threading.Thread(target=self._run, name="lmsd-models-index", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stops following the folder; a header being read is finished first (milliseconds)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def catch_up(self, timeout: float) -> None:
        """Returns once the index holds every change made to the folder before this call: when a round whose wait
        ended after the call is applied. Polling, it polls now (not sooner than poll_spacing after the last walk)."""
        with self._cond:
            target = self._collected + 1
            self._wake.set()
            self._cond.wait_for(lambda: self._applied >= target or not self.alive, timeout)

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not os.path.isdir(self.root):
                    self._wait_for_folder()
                    continue
                self._build()
                try:
                    self._follow()
                except CannotWatch as exc:
                    log.log(logging.DEBUG if self.mode == "polling" else logging.WARNING,
                            "cannot watch the models folder %s (%s); looking for changes every %ss instead",
                            self.root, exc, self._poll_interval)
                    self._poll(time.monotonic() + RETRY_WATCH)
        except Exception:
            log.exception("the models folder index stopped; the catalog reads the folder on each request now")
        finally:
            self.alive = False
            self._index.built(names=True, headers=True)  # nobody waits for a build that will not come
            with self._cond:
                self._cond.notify_all()

    def _collect(self) -> None:
        with self._cond:
            self._collected += 1

    def _done(self) -> None:
        """What every round collected so far is in the index."""
        with self._cond:
            self._applied = self._collected
            self._cond.notify_all()

    def _walk(self) -> None:
        self._index.refresh()
        self._last_walk = time.monotonic()

    def _build(self) -> None:
        self._collect()
        self._walk()
        self._index.built(names=True, headers=False)
        self._index.read_headers()
        self._index.built(names=True, headers=True)
        self._done()

    def _pause(self, seconds: float, spaced: bool = True) -> None:
        """Until the next poll: `seconds`, or sooner when a request asks (if `spaced`, not within poll_spacing of the
        last walk)."""
        self._wake.wait(seconds)
        self._wake.clear()
        early = self._poll_spacing - (time.monotonic() - self._last_walk)
        if spaced and early > 0:
            self._stop.wait(early)

    def _wait_for_folder(self) -> None:
        self.mode = "waiting"
        self._collect()
        self._walk()  # the folder may have gone: the index empties
        self._index.built(names=True, headers=True)
        self._done()
        self._pause(min(self._poll_interval, _FOLDER_CHECK), spaced=False)

    def _follow(self) -> None:
        """Watches until the folder is removed or replaced (or reported changed itself), or the watcher fails once
        started (the caller walks the folder again and watches anew). Raises CannotWatch if watching cannot start."""
        identity = _identity(self.root)
        changes: Iterator[Changes] = iter(())
        started = False
        try:
            changes = self._watch(self.root, self._stop)
            for batch in changes:
                self._collect()
                if not started:  # the watch is set: walk again for what changed while the index was built
                    started = True
                    self.mode = "watching"
                    log.info("watching the models folder %s", self.root)
                    self._walk()
                    self._index.read_headers()
                elif batch:
                    self._index.apply(batch)
                self._done()
                # The folder itself in a batch: it was removed, perhaps made again. A new folder may have the old
                # one's inode (ext4 reuses them), so the identity alone cannot tell; either way the watch is dead.
                if _identity(self.root) != identity or any(path == self.root for _change, path in batch):
                    return
        except FileNotFoundError:
            return  # the folder went away before the watch was set
        except (OSError, RuntimeError, ImportError) as exc:  # watchfiles' own errors are RuntimeErrors
            if not started:
                raise CannotWatch(str(exc) or type(exc).__name__) from exc
            log.warning("watching the models folder %s failed (%s); walking it again", self.root, exc)
            self._stop.wait(self._poll_spacing)  # a watcher that keeps failing cannot make the walks back to back
        finally:
            close = getattr(changes, "close", None)
            if close is not None:
                close()  # releases the inotify watches now, not when the generator is collected

    def _poll(self, until: float) -> None:
        self.mode = "polling"
        while not self._stop.is_set() and time.monotonic() < until:
            self._pause(self._poll_interval)
            self._collect()
            if self._stop.is_set() or not os.path.isdir(self.root):
                return
            self._walk()
            self._index.read_headers()
            self._done()
