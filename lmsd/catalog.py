"""Models on disk: discovery under the models folder, keys, and metadata from GGUF headers only."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lmsd.gguf_header import GGUFError, array_length, read_header
from lmsd.matching import is_unique_match, rank_matches

log = logging.getLogger(__name__)

# A trailing quantization tag in a file stem: ".Q4_1", "-q4_k_m", "-IQ3_XS", ".F16", "-bf16" ...
_QUANT_TAG = re.compile(r"[.\-_](?:i?q\d[a-z0-9_]*|f16|f32|bf16|fp16|fp32)$", re.IGNORECASE)
_EMBEDDING_ARCHS = {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "t5encoder", "modern-bert"}
MAX_DEPTH = 8  # publisher/repo/file.gguf is 3 deep; LM Studio's folders are never deeper than this
MAX_ENTRIES = 200_000  # files and folders walked in one scan
_CACHE_VERSION = 3  # 3: the header facts the memory estimate needs (n_layer ... n_vocab)

# Upper bounds for header numbers (model files come from the internet). The largest real models are far below
# each; a value outside [1, bound] or of the wrong type is read as 0, "unknown", and never raises.
_MAX_LAYERS = 4096
_MAX_HEADS = 16384
_MAX_EMBD = 1 << 20
_MAX_HEAD_DIM = 1 << 16
_MAX_VOCAB = 1 << 24
_MAX_CONTEXT = 1 << 30


@dataclass
class ModelEntry:
    key: str
    path: str  # absolute path of the .gguf file
    rel_path: str  # relative to the models folder, with forward slashes
    size_bytes: int
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
    error: str = ""  # non-empty: the header could not be read; the model cannot be loaded

    @property
    def publisher(self) -> str:
        parts = PurePosixPath(self.rel_path).parts
        return parts[0] if len(parts) >= 3 else ""


def base_key(filename: str) -> str:
    """`SmolLM2-135M-Instruct.Q4_1.gguf` -> `smollm2-135m-instruct`."""
    stem = filename[:-5] if filename.lower().endswith(".gguf") else filename
    return _QUANT_TAG.sub("", stem).lower() or stem.lower()


def _quant_name(file_type: object, filename: str) -> str:
    if isinstance(file_type, int):
        try:
            from gguf.constants import LlamaFileType

            return LlamaFileType(file_type).name.removeprefix("MOSTLY_").replace("GUESSED", "").strip("_")
        except ValueError:
            pass
    m = _QUANT_TAG.search(filename[:-5])
    return m.group(0)[1:].upper() if m else ""


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
        "params": int(header.n_params),
        "max_context_length": _bounded(fields.get(f"{arch}.context_length"), _MAX_CONTEXT),
        "type": "embedding" if is_embedding else "llm",
        "has_chat_template": isinstance(fields.get("tokenizer.chat_template"), str),
        **_shape(fields, arch),
    }


class Catalog:
    """The downloaded models. `scan()` is cheap when nothing changed: headers are cached by path, mtime and
    size in memory and in LMS_HOME/cache/catalog.json."""

    def __init__(self, models_dir: Path, cache_file: Path | None = None) -> None:
        self.models_dir = models_dir
        self.cache_file = cache_file
        self._lock = threading.Lock()  # guards _meta (scan may run from a worker thread)
        self._meta: dict[str, dict[str, object]] = self._read_cache()

    def _read_cache(self) -> dict[str, dict[str, object]]:
        if self.cache_file is None:
            return {}
        try:
            data = json.loads(self.cache_file.read_text())
            return data["entries"] if data.get("version") == _CACHE_VERSION else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def _write_cache(self) -> None:
        if self.cache_file is None:
            return
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"version": _CACHE_VERSION, "entries": self._meta}))
            os.replace(tmp, self.cache_file)
        except OSError as exc:
            log.warning("cannot write catalog cache: %s", exc)

    def _files(self) -> list[Path]:
        """Every *.gguf below the models folder. Links are followed (a user's LM Studio folder is often links), but
        each real directory is visited once — a symlink loop cannot multiply the walk — and the walk is bounded in
        depth and in entries, so one odd folder can never hold the catalog (and the daemon) for long."""
        if not self.models_dir.is_dir():
            return []
        found: list[Path] = []
        seen: set[tuple[int, int]] = set()
        entries = 0
        for root, dirs, files in os.walk(self.models_dir, followlinks=True):
            try:
                st = os.stat(root)
            except OSError:
                dirs[:] = []
                continue
            if (st.st_dev, st.st_ino) in seen:
                dirs[:] = []  # reached again through a link: already walked
                continue
            seen.add((st.st_dev, st.st_ino))
            depth = len(Path(root).relative_to(self.models_dir).parts)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < MAX_DEPTH else []
            entries += len(dirs) + len(files)
            found.extend(Path(root) / f for f in sorted(files) if f.lower().endswith(".gguf") and not f.startswith("."))
            if entries > MAX_ENTRIES:
                log.warning("the models folder %s has more than %d entries; listing stopped there", self.models_dir,
                            MAX_ENTRIES)
                break
        return found

    def scan(self) -> list[ModelEntry]:
        with self._lock:
            entries: list[ModelEntry] = []
            changed = False
            seen: set[str] = set()
            for path in self._files():
                try:
                    st = path.stat()
                except OSError:
                    continue  # a dangling link or a file removed while scanning
                rel = path.relative_to(self.models_dir).as_posix()
                stamp = f"{st.st_mtime_ns}:{st.st_size}"
                cached = self._meta.get(str(path))
                if cached is None or cached.get("stamp") != stamp:
                    cached = {"stamp": stamp, **_describe(path, rel, st.st_size)}
                    self._meta[str(path)] = cached
                    changed = True
                seen.add(str(path))
                meta = {k: v for k, v in cached.items() if k != "stamp"}
                entries.append(ModelEntry(key="", path=str(path), rel_path=rel, size_bytes=st.st_size, **meta))  # type: ignore[arg-type]
            for gone in set(self._meta) - seen:
                del self._meta[gone]
                changed = True
            if changed:
                self._write_cache()
        _assign_keys(entries)
        return sorted(entries, key=lambda e: e.key)

    def resolve(self, name: str) -> ModelEntry:
        """The one model `name` means: a key, a unique key prefix, or a path relative to the models folder.

        Raises LookupError (unknown), ValueError (path escaping the folder), or AmbiguousModel.
        """
        name = name.strip()
        if not name:
            raise ValueError("a model name is required")
        entries = self.scan()
        if "\\" in name or name.startswith(("/", "~")) or ".." in PurePosixPath(name).parts:
            raise ValueError(
                f"'{name}' looks like a filesystem path; name a model by its key or by its path inside the "
                f"models folder ({self.models_dir})"
            )
        by_key = {e.key.lower(): e for e in entries}
        if name.lower() in by_key:
            return by_key[name.lower()]
        for e in entries:
            if name in (e.rel_path, e.rel_path[:-5]):
                return e
        keys = [e.key for e in entries]
        if is_unique_match(name, keys):
            return by_key[rank_matches(name, keys)[0].lower()]
        candidates = rank_matches(name, keys)
        prefix = [k for k in candidates if k.lower().startswith(name.lower()) or name.lower() in k.lower()]
        if len(prefix) > 1:
            raise AmbiguousModel(name, prefix)
        hint = f" Did you mean: {', '.join(candidates[:3])}?" if candidates else ""
        raise LookupError(f"no model '{name}' in {self.models_dir}.{hint} See `lms ls` for the models you have.")


class AmbiguousModel(LookupError):
    def __init__(self, name: str, candidates: list[str]) -> None:
        self.candidates = candidates
        super().__init__(f"'{name}' matches several models: {', '.join(candidates)}; name one of them exactly")


def _assign_keys(entries: list[ModelEntry]) -> None:
    """Key = base key; where several files share it, the publisher/repo path goes in front, then `@quant`."""
    groups: dict[str, list[ModelEntry]] = {}
    for e in entries:
        groups.setdefault(base_key(Path(e.rel_path).name), []).append(e)
    for base, group in groups.items():
        if len(group) == 1:
            group[0].key = base
            continue
        for e in group:
            parent = PurePosixPath(e.rel_path).parent.as_posix().lower()
            e.key = base if parent == "." else f"{parent}/{base}"
        _disambiguate(group, lambda e: f"{e.key}@{(e.quantization or 'unknown').lower()}")
        _disambiguate(group, lambda e: e.rel_path[:-5].lower())


def _disambiguate(group: list[ModelEntry], longer: object) -> None:
    counts: dict[str, int] = {}
    for e in group:
        counts[e.key] = counts.get(e.key, 0) + 1
    for e in group:
        if counts[e.key] > 1:
            e.key = longer(e)  # type: ignore[operator]
