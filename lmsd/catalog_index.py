"""What the models folder holds, as the catalog indexes it: the files (a walk of names and sizes, no headers), the
models they make (a split model's parts are one model) with their keys, and `View`, the immutable index that
`Catalog.resolve()` reads. Pure functions of the files and the header metadata; `lmsd/catalog.py` owns the state.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lmsd.matching import rank_matches

log = logging.getLogger(__name__)

# A trailing quantization tag in a file stem: ".Q4_1", "-q4_k_m", "-IQ3_XS", ".F16", "-bf16" ...
_QUANT_TAG = re.compile(r"[.\-_](?:i?q\d[a-z0-9_]*|f16|f32|bf16|fp16|fp32)$", re.IGNORECASE)
# A part of a split model, as llama.cpp's gguf-split names them: "NAME-00001-of-00003.gguf" (on the stem).
SHARD = re.compile(r"-(\d{5})-of-(\d{5})$")
MAX_DEPTH = 8  # publisher/repo/file.gguf is 3 deep; LM Studio's folders are never deeper than this
MAX_ENTRIES = 200_000  # files and folders walked in one scan

Meta = dict[str, object]  # what `_describe` read from a file's header, and the file's "stamp" when it was read


@dataclass
class ModelEntry:
    key: str
    path: str  # absolute path of the .gguf file (of its first part, for a split model)
    rel_path: str  # relative to the models folder, with forward slashes
    size_bytes: int  # of all parts, for a split model
    arch: str = ""
    quantization: str = ""
    params: int = 0
    max_context_length: int = 0
    type: str = "llm"
    has_chat_template: bool = False
    # What the memory estimate (lmsd/memory.py) needs from the header; 0 = unknown or implausible.
    n_layer: int = 0
    n_head: int = 0
    n_head_kv: int = 0  # the largest per-layer value where the header gives one per layer
    n_embd: int = 0
    head_dim_k: int = 0
    head_dim_v: int = 0
    n_vocab: int = 0
    error: str = ""  # non-empty: the header could not be read, or a part is missing; the model cannot be loaded

    @property
    def publisher(self) -> str:
        parts = PurePosixPath(self.rel_path).parts
        return parts[0] if len(parts) >= 3 else ""


class AmbiguousModel(LookupError):
    def __init__(self, name: str, candidates: list[str]) -> None:
        self.candidates = candidates
        super().__init__(f"'{name}' matches several models: {', '.join(candidates)}; name one of them exactly")


def _stem(filename: str) -> str:
    """The file name without `.gguf` and without a split model's `-00001-of-00003`."""
    stem = filename[:-5] if filename.lower().endswith(".gguf") else filename
    return SHARD.sub("", stem)


def base_key(filename: str) -> str:
    """`SmolLM2-135M-Instruct.Q4_1.gguf` -> `smollm2-135m-instruct`; `Big-Q4_K_M-00001-of-00003.gguf` -> `big`."""
    stem = _stem(filename)
    return _QUANT_TAG.sub("", stem).lower() or stem.lower()


def quant_from_name(filename: str) -> str:
    """The quantization a file name states ("Q4_1"), or ""."""
    m = _QUANT_TAG.search(_stem(filename))
    return m.group(0)[1:].upper() if m else ""


# ---------------------------------------------------------------- the folder


@dataclass(frozen=True)
class File:
    rel: str
    size: int
    stamp: str  # "mtime_ns:size": a header is read again when it changes


def indexable(rel: str) -> bool:
    """Whether a path relative to the models folder can be a model: a .gguf file, not too deep, nothing hidden (a
    download in progress lives in `.lms-downloads`), a name in UTF-8."""
    parts = rel.split("/")
    return (len(parts) <= MAX_DEPTH + 1 and parts[-1].lower().endswith(".gguf")
            and not any(not p or p.startswith(".") for p in parts) and _utf8(rel))


def _utf8(name: str) -> bool:
    """Whether name can be sent to a client. A file name that is not UTF-8 (b'caf\xe9.gguf') reaches Python with
    surrogates, which neither protobuf nor JSON can encode: one such model would break every listing."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_skipped_names: set[str] = set()  # logged once each (bounded: a folder holds at most MAX_ENTRIES names)


def _skip_name(folder: str, name: str) -> None:
    if name not in _skipped_names and len(_skipped_names) < MAX_ENTRIES:
        _skipped_names.add(name)
        log.warning("skipping %r in %s: its name is not UTF-8; rename it to list it",
                    os.fsencode(name), folder)


def stat_file(path: str, rel: str) -> File | None:
    """The file at path if it is a regular file (a link to one counts); None if it is gone, a dangling link, or
    something else (a FIFO would block the header reader), or its name is not UTF-8."""
    if not _utf8(rel):
        _skip_name(os.path.dirname(path), rel)
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return File(rel, st.st_size, f"{st.st_mtime_ns}:{st.st_size}")


Folders = dict[str, tuple[int, int]]  # the folders a walk visited, by path: their (device, inode)


def walk(root: str, stopping: Callable[[], bool]) -> tuple[dict[str, File], Folders, bool]:
    """Every *.gguf below root by path, the folders walked, and whether the walk saw everything (the folder is there,
    every folder in it could be read, no stop, no bound reached). Links are followed (a user's LM Studio folder is
    often links), but each real directory is visited once — a symlink loop cannot multiply the walk — and the walk
    is bounded in depth and in entries, so one odd folder can never hold the catalog (and the daemon) for long."""
    found: dict[str, File] = {}
    dirs: Folders = {}
    if not os.path.isdir(root):
        return found, dirs, False
    seen: set[tuple[int, int]] = set()
    entries = 0
    complete = True

    def unreadable(_exc: OSError) -> None:
        nonlocal complete
        complete = False

    for folder, subdirs, files in os.walk(root, followlinks=True, onerror=unreadable):
        try:
            st = os.stat(folder)
        except OSError:
            subdirs[:] = []
            complete = False
            continue
        if stopping():
            subdirs[:] = []
            complete = False
            continue
        if (st.st_dev, st.st_ino) in seen:
            subdirs[:] = []  # reached again through a link: already walked
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[folder] = (st.st_dev, st.st_ino)
        rel_dir = os.path.relpath(folder, root)
        prefix = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        for name in [*subdirs, *(f for f in files if f.lower().endswith(".gguf"))]:
            if not name.startswith(".") and not _utf8(name):
                _skip_name(folder, name)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and _utf8(d)) \
            if prefix.count("/") < MAX_DEPTH else []
        entries += len(subdirs) + len(files)
        for name in sorted(files):
            if name.lower().endswith(".gguf") and not name.startswith(".") and _utf8(name):
                path = os.path.join(folder, name)
                file = stat_file(path, prefix + name)
                if file is not None:
                    found[path] = file
        if entries > MAX_ENTRIES:
            log.warning("the models folder %s has more than %d entries; listing stopped there", root, MAX_ENTRIES)
            return found, dirs, False
    return found, dirs, complete


def part_paths(path: str, limit: int) -> list[str]:
    """Every part's path of the split model `path` is a part of (at most `limit` parts); [] if it is none."""
    shard = SHARD.search(path[:-5])
    if not shard or not path.lower().endswith(".gguf") or int(shard[2]) > limit:
        return []
    total = int(shard[2])
    return [f"{path[: shard.start()]}-{n:05d}-of-{total:05d}{path[-5:]}" for n in range(1, total + 1)]


# ---------------------------------------------------------------- the models


def current(meta: dict[str, Meta], path: str, file: File) -> Meta | None:
    """The header metadata of the file as it is now; None when it was never read or the file changed since."""
    m = meta.get(path)
    return m if m is not None and m.get("stamp") == file.stamp else None


def _entry(path: str, file: File, meta: Meta | None) -> ModelEntry:
    if meta is None:  # header not read yet: the file name says what it can
        return ModelEntry(key="", path=path, rel_path=file.rel, size_bytes=file.size,
                          quantization=quant_from_name(file.rel.rsplit("/", 1)[-1]))
    fields = {k: v for k, v in meta.items() if k != "stamp"}
    if not fields.get("quantization"):  # a header that could not be read: the file name may still say it
        fields["quantization"] = quant_from_name(file.rel.rsplit("/", 1)[-1])
    return ModelEntry(key="", path=path, rel_path=file.rel, size_bytes=file.size, **fields)  # type: ignore[arg-type]


def _split_entry(parts: dict[int, tuple[str, File]], total: int, first_path: str, first_rel: str,
                 meta: dict[str, Meta], pending: set[str]) -> ModelEntry:
    """One model for the parts of a split model: the first part's header, every part's size and parameters. llama.cpp
    loads the other parts from the first, so a missing part makes the model unloadable."""
    metas = {n: current(meta, p, f) for n, (p, f) in parts.items()}
    pending.update(p for n, (p, _f) in parts.items() if metas[n] is None)
    first = parts.get(1)
    entry = _entry(first_path, first[1] if first else File(first_rel, 0, ""), metas.get(1))
    entry.size_bytes = sum(f.size for _p, f in parts.values())
    missing = total - len(parts)
    if missing:
        n = next(i for i in range(1, total + 1) if i not in parts)
        name = SHARD.sub(f"-{n:05d}-of-{total:05d}", first_rel.rsplit("/", 1)[-1][:-5]) + first_rel[-5:]
        more = f" and {missing - 1} more" if missing > 1 else ""
        entry.error = f"part {n} of {total} is missing ({name}{more})"
        return entry
    for n in sorted(parts):
        m = metas[n]
        if m is not None and m.get("error"):
            entry.error = f"part {n} of {total} ({parts[n][1].rel.rsplit('/', 1)[-1]}): {m['error']}"
            return entry
    if all(m is not None for m in metas.values()):
        entry.params = sum(int(m.get("params", 0)) for m in metas.values() if m is not None)  # type: ignore[call-overload]
    return entry


def models(files: dict[str, File], meta: dict[str, Meta],
           kept: dict[str, str] | None = None) -> tuple[list[ModelEntry], set[str]]:
    """The models the files make, keyed, and the paths whose header is not read yet (or changed since). `kept`: the
    keys models had before, by path in the folder; a model still there keeps its key (`_assign_keys`)."""
    entries: list[ModelEntry] = []
    pending: set[str] = set()
    splits: dict[tuple[str, str, int], dict[int, tuple[str, File]]] = {}
    for path, file in files.items():
        folder, _, name = file.rel.rpartition("/")
        shard = SHARD.search(name[:-5])
        if shard and 1 <= int(shard[1]) <= int(shard[2]):
            whole = name[: shard.start()] + name[-5:]  # the name without the part number
            splits.setdefault((folder, whole, int(shard[2])), {})[int(shard[1])] = (path, file)
            continue
        m = current(meta, path, file)
        if m is None:
            pending.add(path)
        entries.append(_entry(path, file, m))
    for (folder, whole, total), parts in splits.items():
        first_name = f"{whole[:-5]}-00001-of-{total:05d}{whole[-5:]}"
        first_rel = f"{folder}/{first_name}" if folder else first_name
        some_path, some_file = next(iter(parts.values()))
        first_path = some_path[: len(some_path) - len(some_file.rel)] + first_rel
        entries.append(_split_entry(parts, total, first_path, first_rel, meta, pending))
    _assign_keys(entries)
    if kept:
        _keep_keys(entries, kept)
    return entries, pending


def known_keys(entries: list[ModelEntry], pending: set[str], kept: dict[str, str], prune: bool) -> dict[str, str]:
    """The keys to keep from now on, by path: those kept before, and every model's whose header is read well (before
    that, and while a file is half-written, a key may still take its `@quant` from the header). Keys of models not
    in `entries` are dropped only when `prune` (the entries come from a complete walk of the folder): a walk that
    missed files (a mount not ready, a stop halfway, a folder unreadable for a moment) must not cost them their
    keys."""
    now = {e.rel_path: e.key for e in entries if (e.path not in pending and not e.error) or e.rel_path in kept}
    return now if prune else {**kept, **now}


def _keep_keys(entries: list[ModelEntry], kept: dict[str, str]) -> None:
    """A model that had a key keeps it: a file arriving with the same name never renames the model scripts and
    clients already use, and neither takes the key of a model whose file is missing for a while (an unmounted
    drive). The newcomer takes the first of its longer keys that is free: the one the rules give it, then
    `publisher/repo/base`, then `@quant`, then its path in the folder."""
    present = {e.rel_path for e in entries}
    reserved = {k for rel, k in kept.items() if rel not in present}  # keys of models away for now
    held: dict[str, ModelEntry] = {}  # keys taken: kept keys may differ in case only (Model.gguf, model.gguf)
    for e in entries:
        old = kept.get(e.rel_path)
        if old and old not in held:
            e.key = old
            held[old] = e
    taken = {k.lower() for k in [*held, *reserved]}
    for e in entries:
        if held.get(e.key) is e:
            continue
        parent = PurePosixPath(e.rel_path).parent.as_posix().lower()
        base = base_key(e.rel_path.rsplit("/", 1)[-1])
        qualified = base if parent == "." else f"{parent}/{base}"
        choices = [e.key, qualified, f"{qualified}@{(e.quantization or 'unknown').lower()}",
                   SHARD.sub("", e.rel_path[:-5]).lower(), e.rel_path.lower()]
        key = next((k for k in choices if k and k.lower() not in taken), e.rel_path)
        n = 1
        while key in held or key in reserved:  # a kept key that is this path in another case: a number is left
            n += 1
            key = f"{e.rel_path}~{n}"
        e.key = key
        held[key] = e
        taken.add(key.lower())


def _assign_keys(entries: list[ModelEntry]) -> None:
    """Key = base key; where several files share it, the publisher/repo path goes in front, then `@quant`."""
    groups: dict[str, list[ModelEntry]] = {}
    for e in entries:
        groups.setdefault(base_key(e.rel_path.rsplit("/", 1)[-1]), []).append(e)
    for base, group in groups.items():
        if len(group) == 1:
            group[0].key = base
            continue
        for e in group:
            parent = PurePosixPath(e.rel_path).parent.as_posix().lower()
            e.key = base if parent == "." else f"{parent}/{base}"
        _disambiguate(group, lambda e: f"{e.key}@{(e.quantization or 'unknown').lower()}")
        _disambiguate(group, lambda e: SHARD.sub("", e.rel_path[:-5]).lower())
    _make_unique(entries)


def _make_unique(entries: list[ModelEntry]) -> None:
    """The last resort, for keys still shared (in any case) or empty (a file named `-00001-of-00001.gguf`): the
    full path in the folder, lower-cased where that is unique, else as it is (paths are unique)."""
    counts = Counter(e.key.lower() for e in entries)
    clashing = [e for e in entries if not e.key or counts[e.key.lower()] > 1]
    if not clashing:
        return
    taken = {e.key.lower() for e in entries if e.key and counts[e.key.lower()] == 1}
    lowered = Counter(e.rel_path.lower() for e in clashing)
    for e in clashing:
        low = e.rel_path.lower()
        e.key = low if lowered[low] == 1 and low not in taken else e.rel_path


def _disambiguate(group: list[ModelEntry], longer: Callable[[ModelEntry], str]) -> None:
    counts: dict[str, int] = {}
    for e in group:
        counts[e.key] = counts.get(e.key, 0) + 1
    for e in group:
        if counts[e.key] > 1:
            e.key = longer(e)


class View:
    """The models as one immutable value, published whole. Every successful lookup (exact key, path, unique prefix)
    costs a few dictionary and bisect steps, whatever the number of models."""

    def __init__(self, entries: list[ModelEntry], pending: Iterable[str] = ()) -> None:
        self.entries = sorted(entries, key=lambda e: e.key)
        self.pending = frozenset(pending)  # paths whose header is not read yet
        self.by_key = {e.key.lower(): e for e in self.entries}
        self._exact = {e.key: e for e in self.entries}  # keys that differ only in case (Model.gguf, model.gguf)
        self.by_name: dict[str, ModelEntry] = {}  # a path in the folder, with or without .gguf or the part number
        for e in self.entries:
            for name in (e.rel_path, e.rel_path[:-5], SHARD.sub("", e.rel_path[:-5])):
                self.by_name.setdefault(name, e)
        self._keys = sorted(self.by_key)
        self._tails = sorted((k.rsplit("/", 1)[-1], k) for k in self.by_key)

    def find(self, name: str) -> ModelEntry | None:
        """The model `name` means by key, path or unique prefix (of a key, or of its last part); None otherwise."""
        entry = self._exact.get(name) or self.by_key.get(name.lower()) or self.by_name.get(name)
        if entry is not None:
            return entry
        found = self._prefixed(name)
        return self.by_key[found.pop()] if len(found) == 1 else None

    def ambiguous(self, name: str) -> bool:
        """Whether several keys start with `name` (a new model cannot make it name one of them)."""
        return len(self._prefixed(name)) > 1

    def _prefixed(self, name: str) -> set[str]:
        """Up to two keys that `name` is a prefix of, or a prefix of their last part."""
        low = name.lower()
        found: set[str] = set()
        i = bisect_left(self._keys, low)
        while i < len(self._keys) and self._keys[i].startswith(low) and len(found) < 2:
            found.add(self._keys[i])
            i += 1
        i = bisect_left(self._tails, (low, ""))
        while i < len(self._tails) and self._tails[i][0].startswith(low) and len(found) < 2:
            found.add(self._tails[i][1])
            i += 1
        return found

    def fail(self, name: str, models_dir: Path) -> None:
        """Raises the error for a name `find` did not resolve: several models match, or none (with suggestions).
        The one lookup that looks at every key: it answers a mistake."""
        keys = [e.key for e in self.entries]
        candidates = rank_matches(name, keys)
        matching = [k for k in candidates if k.lower().startswith(name.lower()) or name.lower() in k.lower()]
        if len(matching) > 1:
            raise AmbiguousModel(name, matching)
        hint = f" Did you mean: {', '.join(candidates[:3])}?" if candidates else ""
        raise LookupError(f"no model '{name}' in {models_dir}.{hint} See `lms ls` for the models you have.")
