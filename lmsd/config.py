"""Paths (platformdirs, overridden by LMS_HOME) and the persisted daemon settings."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Paths:
    """Every file lmsd and lms touch. One variable, LMS_HOME, moves them all."""

    home: Path
    models: Path

    @property
    def settings(self) -> Path:
        return self.home / "settings.json"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def socket(self) -> Path:
        return self.run_dir / "lmsd.sock"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "lmsd.pid"

    @property
    def lock_file(self) -> Path:
        # Held (flock) for the whole life of a daemon: at most one daemon per LMS_HOME, and a crashed
        # daemon's lock is released by the kernel, so a stale pid file or socket is recognisable.
        return self.run_dir / "lmsd.lock"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def log_file(self) -> Path:
        return self.log_dir / "lmsd.log"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Paths:
        env = os.environ if environ is None else environ
        if env.get("LMS_HOME"):
            home = Path(env["LMS_HOME"]).expanduser().absolute()
        else:
            import platformdirs

            home = Path(platformdirs.user_data_dir("lms", appauthor=False))
        models = Path(env["LMS_MODELS_DIR"]).expanduser().absolute() if env.get("LMS_MODELS_DIR") else home / "models"
        return cls(home=home, models=models)


@dataclass
class Settings:
    """Persisted daemon settings. Each says its default, unit and edge values.

    jit:          true. An inference request naming a downloaded, unloaded model loads it.
                  false: such a request gets 404 model_not_found.
    auto_evict:   true. Before a JIT load, every other JIT-loaded instance is drained and unloaded.
                  Manually loaded instances are never evicted.
    default_ttl:  3600 seconds (>= 1). The idle TTL of a JIT load whose request gave no `ttl`.
    port:         1234. TCP port of the HTTP endpoint (1..65535).
    bind:         "127.0.0.1". Address the HTTP endpoint listens on; "0.0.0.0" exposes it on the network.
    cors:         false. Whether the HTTP endpoint answers cross-origin requests.
    http_enabled: false. Whether the HTTP endpoint was running; restored on the next daemon start.
    memory_limit: "auto". The memory budget of all loaded models together: "auto" is what the system reports
                  available at load time (plus what our workers hold) minus a safety margin; a number of bytes
                  (>= 64 MiB) is a fixed budget; "off" means no budget.
    max_loaded_models: 0 (no limit). At most this many instances, manual and JIT together; at the limit a load
                  evicts the least recently used JIT instance, and is refused if only manual ones are left.
    load_timeout: 300 seconds (>= 1). A load that reports no progress for this long is killed and reported.
    max_wait:     300 seconds (>= 1). How long a request may wait for its model (its load, a swap, its queue)
                  before it is refused with 503 and Retry-After.
    default_parallel: 4 (1..64). Requests one instance decodes together (continuous batching), for loads that
                  do not say (`lms load --parallel`) and JIT loads; LM Studio's Max Concurrent Predictions.
    """

    jit: bool = True
    auto_evict: bool = True
    default_ttl: int = 3600
    port: int = 1234
    bind: str = "127.0.0.1"
    cors: bool = False
    http_enabled: bool = False
    memory_limit: str | int = "auto"
    max_loaded_models: int = 0
    load_timeout: int = 300
    max_wait: int = 300
    default_parallel: int = 4

    def validate(self) -> None:
        """Raises ValueError with a message a user can act on."""
        if not isinstance(self.default_ttl, int) or isinstance(self.default_ttl, bool) or self.default_ttl < 1:
            raise ValueError(f"default_ttl must be a whole number of seconds >= 1, got {self.default_ttl!r}")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 1 <= self.port <= 65535:
            raise ValueError(f"port must be a whole number from 1 to 65535, got {self.port!r}")
        if not isinstance(self.bind, str) or not self.bind:
            raise ValueError(f"bind must be an address such as 127.0.0.1, got {self.bind!r}")
        if self.memory_limit not in ("auto", "off") and (
                not isinstance(self.memory_limit, int) or isinstance(self.memory_limit, bool)
                or not MIN_MEMORY_LIMIT <= self.memory_limit <= MAX_MEMORY_LIMIT):
            raise ValueError(
                f"memory_limit must be auto, off, or a size from 64 MiB to 1 PiB, got {self.memory_limit!r}")
        if not _whole(self.max_loaded_models, 0, 10_000):
            raise ValueError(f"max_loaded_models must be a whole number from 0 (no limit) to 10000, "
                             f"got {self.max_loaded_models!r}")
        if not _whole(self.default_parallel, 1, MAX_PARALLEL):
            raise ValueError(f"default_parallel must be a whole number from 1 to {MAX_PARALLEL}, "
                             f"got {self.default_parallel!r}")
        for name in ("load_timeout", "max_wait"):
            if not _whole(getattr(self, name), 1, 365 * 24 * 3600):
                raise ValueError(f"{name} must be a whole number of seconds from 1 to 31536000 (365 days), got "
                                 f"{getattr(self, name)!r}")
        for name in ("jit", "auto_evict", "cors", "http_enabled"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")


MAX_PARALLEL = 64  # sequences one instance decodes together
UNLOAD_GRACE = 10.0  # seconds a manual unload (lms unload, POST /api/v1/models/unload) lets requests finish
MIN_MEMORY_LIMIT = 64 * 1024**2
MAX_MEMORY_LIMIT = 1024**5


def _whole(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


class SettingsStore:
    """Loads and saves Settings to one JSON file, atomically (temp file + fsync + rename).

    A file that cannot be read or parsed is never overwritten silently: the daemon runs on defaults and
    says so (`warning`); the first change moves the bad file aside to `<name>.bad` and says where.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.warning = ""  # while the settings file cannot be read: said with every answer
        self.notice = ""  # what the last change did to the unreadable file: said once (pop_notice)
        self._bad_file = False
        self.settings = self._load()

    def _load(self) -> Settings:
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return Settings()
        except OSError as exc:
            return self._fall_back(f"cannot read {self.path}: {exc.strerror or exc}")
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("top level is not an object")
            known = {f.name for f in dataclasses.fields(Settings)}
            settings = Settings(**{k: v for k, v in data.items() if k in known})
            settings.validate()
            return settings
        except (ValueError, TypeError) as exc:
            return self._fall_back(f"{self.path} is not valid settings ({exc})")

    def _fall_back(self, why: str) -> Settings:
        self.warning = f"{why}; running with default settings; the file is left as it is"
        self._bad_file = True
        log.warning("%s", self.warning)
        return Settings()

    def update(self, **changes: Any) -> Settings:
        """Applies changes (validated first), persists them, and returns the settings now in force."""
        candidate = dataclasses.replace(self.settings, **changes)
        candidate.validate()
        if self._bad_file:
            aside = self.path.with_name(self.path.name + ".bad")
            self.warning = ""
            try:
                os.replace(self.path, aside)
                self.notice = f"the unreadable settings file was moved to {aside}"
            except OSError:
                pass
            log.warning("settings: %s", self.notice or "unreadable settings file replaced")
            self._bad_file = False
        self._write(candidate)
        self.settings = candidate
        return candidate

    def pop_notice(self) -> str:
        notice, self.notice = self.notice, ""
        return notice

    def _write(self, settings: Settings) -> None:
        write_atomically(self.path, json.dumps(dataclasses.asdict(settings), indent=2, sort_keys=True) + "\n")


class ApiKeyStore:
    """The optional HTTP API key, in its own file (mode 0600) so that it never appears in settings output or
    logs. Read once at start-up and kept in memory: every HTTP request checks it, and only the daemon writes it
    (`lms server settings --api-key-set/--api-key-clear`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._key: str | None = path.read_text().strip() or None
        except OSError:
            self._key = None

    def get(self) -> str | None:
        return self._key

    def set(self, key: str | None) -> None:
        if key:
            write_atomically(self.path, key + "\n")
        else:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._key = key or None


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[BinaryIO]:
    """A file to write that replaces `path` only if the `with` block ends normally: a temp file (mode 0600) in the
    same folder, fsynced, then renamed. Readers see the old file or the new one, never half of one; on any
    failure (an exception in the block included) the old file is untouched and no temp file is left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomically(path: Path, text: str) -> None:
    with replacing(path) as f:
        f.write(text.encode())
