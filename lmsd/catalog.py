"""Models on disk: the catalog of the models folder, with metadata from GGUF headers only.

The daemon's catalog is an index, built once in the background when the daemon starts (`Catalog.start`) and kept
current by watching the folder (lmsd/catalog_watch.py), so that naming a model costs a few dictionary lookups
however many models there are. docs/models.md describes what a user sees. The decisions:

- The index (`View`, lmsd/catalog_index.py) is immutable and published whole: `resolve()` and `scan()` read the
  latest one and never wait for a lock. A change (a walk of the folder, a file the watcher reports) builds a new one.
- Before the first walk of the folder is done, a request waits for it: keys depend on every name in the folder (two
  new files with one base key are both qualified), and the walk reads names and sizes only, which is quick. A request
  never waits for the headers of other models: a model whose header is not read yet is read when it is asked for.
- A name the index does not know is looked up as one file (`models/<name>` or `models/<name>.gguf`: a stat), then
  again after the watcher's next round (`Watcher.catch_up`), so a model written a moment ago is found; only then is
  it unknown. An unknown name never walks the folder.
- Without `start()` (tests, tools), `scan()` and `resolve()` read the folder on each call, as they always did.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path, PurePosixPath

from lmsd.catalog_index import (
    AmbiguousModel,
    File,
    Folders,
    Meta,
    ModelEntry,
    View,
    base_key,
    indexable,
    known_keys,
    models,
    part_paths,
    quant_from_name,
    stat_file,
    walk,
)
from lmsd.catalog_watch import POLL_INTERVAL, Changes, Watcher, WatchFactory, watch_folder
from lmsd.gguf_header import GGUFError, array_length, read_header

__all__ = ["AmbiguousModel", "Catalog", "ModelEntry", "base_key"]

log = logging.getLogger(__name__)

_EMBEDDING_ARCHS = {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "t5encoder", "modern-bert"}
_CACHE_VERSION = 3  # 3: the header facts the memory estimate needs (n_layer ... n_vocab)

# How long a request waits for the first walk of the folder (names and sizes, no headers) before it is answered
# from what is known. A local folder of 500 models is walked in milliseconds; this bounds a hung network mount.
NAMES_WAIT = 30.0
# How long a listing waits for the first reading of every header before it lists the models whose header is not
# read yet without their metadata. `lms ls` waits 60 s for its answer.
LIST_WAIT = 30.0
# How long a name the index does not know waits for the watcher's next round (or the next poll) before it is
# reported unknown. The watcher reports a change within about 0.2 s.
CATCH_UP_WAIT = 2.0
# Headers are read by this many threads (the reader's numpy work and file reads let another thread run: 2 read
# 500 headers ~1.3x faster than 1 on 2 cores), in batches of _BATCH between two publications of the index.
_READERS = 2
_BATCH = 128
_MAX_PARTS_PROBED = 1024  # parts of one split model a request looks for on disk (names allow 99999)

# Upper bounds for header numbers (model files come from the internet). The largest real models are far below
# each; a value outside [1, bound] or of the wrong type is read as 0, "unknown", and never raises.
_MAX_LAYERS = 4096
_MAX_HEADS = 16384
_MAX_EMBD = 1 << 20
_MAX_HEAD_DIM = 1 << 16
_MAX_VOCAB = 1 << 24
_MAX_CONTEXT = 1 << 30
# Parameters of one file: ~1e15, a thousand times the largest model; a split model's sum of 1024 parts stays within
# the int64 of the control API.
_MAX_PARAMS = 1 << 50

def _quant_name(file_type: object, filename: str) -> str:
    if isinstance(file_type, int):
        try:
            from gguf.constants import LlamaFileType

            return LlamaFileType(file_type).name.removeprefix("MOSTLY_").replace("GUESSED", "").strip("_")
        except ValueError:
            pass
    return quant_from_name(filename)


def _bounded(value: object, maximum: int) -> int:
    """value if it is an int in [1, maximum], else 0. A per-layer array gives its largest element, provided every
    element is an int in [0, maximum] (0: a layer without the thing, e.g. no attention in a hybrid model)."""
    if isinstance(value, list):
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= maximum for v in value):
            return 0
        value = max(value)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= maximum:
        return value
    return 0


def _shape(fields: dict[str, object], arch: str) -> dict[str, int]:
    """The numbers the memory estimate needs, each validated on its own: one bad field makes that fact unknown."""
    n_embd = _bounded(fields.get(f"{arch}.embedding_length"), _MAX_EMBD)
    n_head = _bounded(fields.get(f"{arch}.attention.head_count"), _MAX_HEADS)
    kv = fields.get(f"{arch}.attention.head_count_kv")
    # Absent means no grouped-query attention (as many KV heads as heads); present but unreadable (a skipped
    # per-layer array, a bad value) also falls back to n_head: more KV heads never underestimates the KV cache.
    n_head_kv = _bounded(kv, _MAX_HEADS) or n_head
    default_dim = n_embd // n_head if n_head else 0  # llama.cpp's default, integer division included
    head_dim_k = _bounded(fields.get(f"{arch}.attention.key_length", default_dim), _MAX_HEAD_DIM)
    head_dim_v = _bounded(fields.get(f"{arch}.attention.value_length", default_dim), _MAX_HEAD_DIM)
    tokens = array_length(fields.get("tokenizer.ggml.tokens"))
    n_vocab = _bounded(tokens, _MAX_VOCAB) if tokens is not None else 0
    return {
        "n_layer": _bounded(fields.get(f"{arch}.block_count"), _MAX_LAYERS),
        "n_head": n_head,
        "n_head_kv": n_head_kv,
        "n_embd": n_embd,
        "head_dim_k": head_dim_k,
        "head_dim_v": head_dim_v,
        "n_vocab": n_vocab or _bounded(fields.get(f"{arch}.vocab_size"), _MAX_VOCAB),
    }


def _describe(path: Path, rel: str, size: int) -> dict[str, object]:
    """Metadata from the header; never loads weights. Errors become the `error` field."""
    try:
        header = read_header(path)
    except (GGUFError, OSError) as exc:
        return {"error": str(exc)}
    fields = header.fields
    arch = fields.get("general.architecture", "")
    arch = arch if isinstance(arch, str) and len(arch) <= 64 else ""
    is_embedding = arch in _EMBEDDING_ARCHS or f"{arch}.pooling_type" in fields and arch != "llama"
    return {
        "arch": arch,
        "quantization": _quant_name(fields.get("general.file_type"), path.name),
        "params": _bounded(int(header.n_params), _MAX_PARAMS),
        "max_context_length": _bounded(fields.get(f"{arch}.context_length"), _MAX_CONTEXT),
        "type": "embedding" if is_embedding else "llm",
        "has_chat_template": isinstance(fields.get("tokenizer.chat_template"), str),
        **_shape(fields, arch),
    }


# What `_describe` produces, field by field: a cache entry is kept only if it is one of these shapes, every value of
# the type and within the bounds `_describe` gives it (a params count beyond int64 would break `lms ls`).
_MAX_TEXT = 1 << 16


def _int_in(maximum: int) -> Callable[[object], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= maximum


_META_CHECKS: dict[str, Callable[[object], bool]] = {
    "arch": lambda v: isinstance(v, str) and len(v) <= 64,
    "quantization": lambda v: isinstance(v, str) and len(v) <= 255,
    "params": _int_in(_MAX_PARAMS),
    "max_context_length": _int_in(_MAX_CONTEXT),
    "type": lambda v: v in ("llm", "embedding"),
    "has_chat_template": lambda v: isinstance(v, bool),
    "n_layer": _int_in(_MAX_LAYERS),
    "n_head": _int_in(_MAX_HEADS),
    "n_head_kv": _int_in(_MAX_HEADS),
    "n_embd": _int_in(_MAX_EMBD),
    "head_dim_k": _int_in(_MAX_HEAD_DIM),
    "head_dim_v": _int_in(_MAX_HEAD_DIM),
    "n_vocab": _int_in(_MAX_VOCAB),
}
_FAILED_FIELDS = frozenset({"stamp", "error"})  # a header that could not be read
_READ_FIELDS = frozenset(_META_CHECKS) | {"stamp"}


def _cached_meta_ok(meta: object) -> bool:
    """Whether a cache entry is exactly what `_describe` (plus the stamp) produces."""
    if not isinstance(meta, dict) or not isinstance(meta.get("stamp"), str) or len(meta["stamp"]) > 64:
        return False
    if meta.keys() == _FAILED_FIELDS:
        return isinstance(meta["error"], str) and len(meta["error"]) <= _MAX_TEXT
    return meta.keys() == _READ_FIELDS and all(check(meta[name]) for name, check in _META_CHECKS.items())


def _read_meta(item: tuple[str, File]) -> Meta:
    path, file = item
    return {"stamp": file.stamp, **_describe(Path(path), file.rel, file.size)}


class Catalog:
    """The downloaded models. Headers are cached by path, mtime and size in memory and in LMS_HOME/cache/catalog.json,
    so a restarted daemon reads only the headers of files that changed.

    `start()` (the daemon) builds the index in a background thread and keeps it current with `watch` (or by polling
    every `poll_interval` seconds where watching is not possible); without it, `scan()` and `resolve()` read the
    folder on each call.
    """

    def __init__(self, models_dir: Path, cache_file: Path | None = None, *, watch: WatchFactory = watch_folder,
                 poll_interval: float = POLL_INTERVAL) -> None:
        self.models_dir = models_dir
        self.cache_file = cache_file
        self._root = os.path.abspath(models_dir)
        # Guards _files, _dirs, _meta, _keys, _cache_dirty and the publication of _view. Held while the index is rebuilt
        # from them (in memory); never while the folder is read (a walk, a stat, a header), never by a reader.
        self._lock = threading.Lock()
        self._files: dict[str, File] = {}
        self._dirs: Folders = {}
        self._meta: dict[str, Meta] = {}
        self._keys: dict[str, str] = {}  # the key each model has had, by path in the folder: it keeps it
        self._read_cache()
        self._cache_dirty = False
        self._view = View([])
        self._named = threading.Event()  # the first walk is in the view: every name is known
        self._described = threading.Event()  # ... and every header it found was read
        self._watcher: Watcher | None = None
        self._watch = watch
        self._poll_interval = poll_interval

    # ------------------------------------------------------------ public

    def start(self) -> None:
        """Builds the index in the background and keeps it current (the daemon, once). Returns at once."""
        if self._watcher is None:
            self._watcher = Watcher(self._root, self._watch, self, poll_interval=self._poll_interval)
            self._watcher.start()

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()

    @property
    def mode(self) -> str:
        """How the folder is followed: "watching", "polling" (watching was not possible), "waiting" (no folder yet),
        "starting", or "off" (not started, or stopped: every call reads the folder)."""
        return self._watcher.mode if self._indexed() and self._watcher is not None else "off"

    def scan(self) -> list[ModelEntry]:
        """Every model, sorted by key (copies: callers may change them). Watched, the index is the folder within a
        fraction of a second; otherwise (polling, no folder yet) a listing asks for a poll first."""
        if self._indexed():
            self._described.wait(LIST_WAIT)
            if self._watcher is not None and self._watcher.mode in ("polling", "waiting"):
                self._watcher.catch_up(CATCH_UP_WAIT)
        else:
            self.refresh()
            self.read_headers()
        return [dataclasses.replace(e) for e in self._view.entries]

    def resolve(self, name: str) -> ModelEntry:
        """The one model `name` means: a key, a unique key prefix, or a path relative to the models folder.

        Raises LookupError (unknown), ValueError (path escaping the folder), or AmbiguousModel.
        """
        name = name.strip()
        if not name:
            raise ValueError("a model name is required")
        if "\\" in name or name.startswith(("/", "~")) or ".." in PurePosixPath(name).parts:
            raise ValueError(
                f"'{name}' looks like a filesystem path; name a model by its key or by its path inside the "
                f"models folder ({self.models_dir})"
            )
        if not self._indexed():
            view = View(self.scan())
            entry = view.find(name)
            if entry is None:
                view.fail(name, self.models_dir)
            return entry  # type: ignore[return-value]
        self._named.wait(NAMES_WAIT)
        entry = self._view.find(name)
        if entry is None and not self._view.ambiguous(name):  # unknown: maybe new
            entry = self._probe(name)
            if entry is None and self._watcher is not None:
                self._watcher.catch_up(CATCH_UP_WAIT)
                entry = self._view.find(name)
        if entry is None:
            self._view.fail(name, self.models_dir)
        return dataclasses.replace(self._complete(entry))  # type: ignore[arg-type]

    # ------------------------------------------------------------ changes: from the watcher's thread, and from a
    # request for a file the index does not know yet

    def refresh(self, paths: Iterable[str] | None = None) -> bool:
        """Brings the index in line with the folder: every file (a walk) or the given paths (a stat each). Returns
        whether the folder's files changed. The folder is read outside the lock (a hung mount holds only its caller);
        the lock is taken to swap the result in."""
        if paths is None:
            files, dirs, complete = walk(self._root, self._stopping)
            with self._lock:
                changed = files != self._files
                self._files, self._dirs = files, dirs
                self._forget_gone()
                self._publish(prune=complete)
            return changed
        found = {path: self._stat(path) for path in paths}
        with self._lock:
            changed = False
            for path, file in found.items():
                if file != self._files.get(path):
                    changed = True
                    if file is None:
                        del self._files[path]
                    else:
                        self._files[path] = file
            if changed:
                self._forget_gone()
                self._publish()
        return changed

    def read_headers(self, only: Iterable[str] | None = None, save: bool = True) -> None:
        """Reads the headers the index lacks (or those of `only` that it lacks), publishing the index after each
        batch, then saves the cache. Headers are read outside the lock: readers and the watcher go on meanwhile."""
        with self._lock:
            wanted = self._view.pending if only is None else self._view.pending.intersection(only)
            todo = [(path, self._files[path]) for path in sorted(wanted) if path in self._files]
        with ThreadPoolExecutor(_READERS, thread_name_prefix="lmsd-header") if len(todo) > 1 else nullcontext() as pool:
            for start in range(0, len(todo), _BATCH):
                if self._stopping():
                    break
                batch = todo[start : start + _BATCH]
                metas = list(pool.map(_read_meta, batch)) if pool is not None else [_read_meta(t) for t in batch]
                with self._lock:
                    for (path, _file), meta in zip(batch, metas, strict=True):
                        self._meta[path] = meta
                    self._cache_dirty = True
                    self._publish()
        if save:
            self._write_cache()

    def apply(self, changes: Changes) -> None:
        """What the watcher saw: files changed (a stat each), or a folder came, went or moved (a walk of names:
        what is below it is not in `changes`)."""
        with self._lock:
            dirs = set(self._dirs)
        files: list[str] = []
        folders = False
        for _change, path in changes:
            if path.lower().endswith(".gguf"):
                # A file in a folder the walk did not visit under this name: a new folder, or one reached through
                # a link under another name too (the watcher may report it under either): the walk decides.
                if os.path.dirname(path) in dirs:
                    files.append(path)
                else:
                    folders = True
            elif path in dirs or os.path.isdir(path):
                folders = True
        if folders:
            self.refresh()
        elif files:
            self.refresh(files)
        self.read_headers()

    def built(self, names: bool, headers: bool) -> None:
        if names:
            self._named.set()
        if headers:
            self._described.set()

    # ------------------------------------------------------------ internals

    def _indexed(self) -> bool:
        return self._watcher is not None and self._watcher.alive

    def _stopping(self) -> bool:
        """The index's thread is being stopped: its walk and its reading of headers end early."""
        return self._watcher is not None and self._watcher.alive and self._watcher.stopping

    def _stat(self, path: str) -> File | None:
        rel = os.path.relpath(path, self._root).replace(os.sep, "/")
        return stat_file(path, rel) if indexable(rel) else None

    def _forget_gone(self) -> None:
        """Drops the header metadata of files no longer in the folder (under the lock)."""
        for gone in [p for p in self._meta if p not in self._files]:
            del self._meta[gone]
            self._cache_dirty = True

    def _publish(self, prune: bool = False) -> None:
        entries, pending = models(self._files, self._meta, self._keys)
        keys = known_keys(entries, pending, self._keys, prune)
        if keys != self._keys:
            self._keys = keys
            self._cache_dirty = True
        self._view = View(entries, pending)

    def _probe(self, name: str) -> ModelEntry | None:
        """A path in the folder the index does not know yet, looked at directly (for a split model, its parts)."""
        rel = name if name.lower().endswith(".gguf") else f"{name}.gguf"
        if not indexable(rel):
            return None
        path = os.path.join(self._root, *rel.split("/"))
        if self._aliased(os.path.dirname(path)):
            return None
        if not self.refresh(part_paths(path, _MAX_PARTS_PROBED) or [path]):
            return None
        return self._view.find(name)

    def _aliased(self, folder: str) -> bool:
        """Whether folder, or a folder between it and the root, is a folder the walk visited under another name (a
        link to it inside the models folder): its models are indexed under that name only, once."""
        with self._lock:
            dirs = self._dirs
        walked = set(dirs.values())
        while folder not in dirs and len(folder) > len(self._root):
            try:
                st = os.stat(folder)
            except OSError:
                pass  # not there (yet): the stat of the file will say
            else:
                if (st.st_dev, st.st_ino) in walked:
                    return True
            folder = os.path.dirname(folder)
        return False

    def _complete(self, entry: ModelEntry) -> ModelEntry:
        """The entry with its header read: while the index is first built, it may not have reached it yet."""
        view = self._view
        if not view.pending:
            return entry
        mine = view.pending.intersection(part_paths(entry.path, _MAX_PARTS_PROBED) or [entry.path])
        if not mine:
            return entry
        self.read_headers(mine, save=False)  # the index's thread saves the cache once it has read the rest
        return self._view.by_name.get(entry.rel_path, entry)

    def _read_cache(self) -> None:
        """The headers and the keys the cache holds. A damaged cache costs a header read, never the index: only
        entries `_describe` could have made are kept; keys that are not strings are dropped."""
        if self.cache_file is None:
            return
        try:
            data = json.loads(self.cache_file.read_text())
            entries = data["entries"] if data.get("version") == _CACHE_VERSION else {}
            # Keys are paths in one models folder: a daemon started with another LMS_MODELS_DIR starts afresh.
            keys = data.get("keys", {}) if data.get("root") == self._root else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return
        if isinstance(entries, dict):
            self._meta = {path: meta for path, meta in entries.items()
                          if isinstance(path, str) and _cached_meta_ok(meta)}
        if isinstance(keys, dict):
            self._keys = {path: key for path, key in keys.items()
                          if isinstance(path, str) and isinstance(key, str) and key.strip()}

    def _write_cache(self) -> None:
        if self.cache_file is None:
            return
        with self._lock:
            if not self._cache_dirty:
                return
            entries = dict(self._meta)  # a meta is never changed once made: a shallow copy is a snapshot
            keys = dict(self._keys)
            self._cache_dirty = False
        text = json.dumps({"version": _CACHE_VERSION, "entries": entries, "keys": keys, "root": self._root})
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, self.cache_file)
        except OSError as exc:
            log.warning("cannot write catalog cache: %s", exc)
