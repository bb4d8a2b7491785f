"""How much memory loading a model will take, how much the machine has, and the `memory_limit` setting's syntax.

The estimate is an upper bound on the resident memory (RSS) of the worker process once the model is loaded and
has served requests, long prompts included: a budget built on it must never let a load through that the kernel's
OOM killer would then end. Its parts, for llama.cpp on the CPU as the worker runs it (llama-cpp-python's defaults:
f16 KV cache, no flash attention, n_batch = n_ubatch = 512):

- weights: the whole file. llama.cpp mmaps it and touches every tensor while loading, so all its pages become
  resident (as page cache: shared and reclaimable, but evicting it means re-reading the file on every token).
- kv_cache: f16 K and V for every layer and every token of the context, which llama.cpp rounds up to 256 tokens.
  llama.cpp clears it at load, so it is resident from the start.
- compute: the scratch buffer llama.cpp reserves for its worst-case graph (a micro-batch of 512 tokens against
  the whole context), plus the CPU backend's work buffer, where the attention scores are converted to f16 before
  they multiply V. Both are touched only by a long prompt: a fresh instance shows little of it.
- overhead: the worker's Python interpreter with llama_cpp imported, and llama.cpp's tokenizer tables.
- prompt_cache: with more than one parallel sequence, idle conversations' KV cells are moved to RAM while other
  requests run (lmsd/worker/batch.py), at most a context's worth of cells: as much again as kv_cache.

tests/integration/test_memory_real.py measures real workers against it (run it with -s for the table).
Cheap to import (the daemon and the CLI both use it): no llama_cpp, no fastapi; psutil only when asked.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmsd.catalog import ModelEntry

log = logging.getLogger(__name__)

KiB, MiB, GiB, TiB, PiB = (1 << 10), (1 << 20), (1 << 30), (1 << 40), (1 << 50)

N_UBATCH = 512  # llama-cpp-python's default n_batch and n_ubatch (the worker sets neither)
_CTX_PAD = 256  # llama.cpp rounds the context (the KV cache size) up to a multiple of this
_MAX_CONTEXT = 1 << 24  # tokens; beyond any model's context, and keeps the arithmetic sane for a hostile header
_MAX_ESTIMATE = 1 << 60  # bytes; an estimate never exceeds this, so it always fits a signed 64-bit field

# An idle worker (python -m lmsd.worker, llama_cpp and psutil imported, nothing loaded) measures 48 MiB RSS.
WORKER_BASE = 64 * MiB
# llama.cpp's vocabulary tables (token texts, the token -> id map, BPE merge ranks) and what loading the GGUF
# metadata leaves in the heap: about 19 MiB measured for SmolLM2's 49152 tokens (400 bytes a token). Counted at
# 1 KiB a token, since vocabularies with more merges per token (Llama 3's 128k tokens, 280k merges) need more.
PER_VOCAB_TOKEN = 1 * KiB

# When the header does not tell: the KV cache per token is assumed to be the file size / 2048. Real models need
# between 1/40000 (Llama 3 8B Q4_K_M, grouped-query attention) and about 1/2500 (small models with full
# multi-head attention, GPT-2 124M Q4) of their file size per token; erring high only makes the budget refuse a
# load that would have fitted, and every model llama.cpp can run states its shape anyway.
_UNKNOWN_KV_PER_TOKEN_DIVISOR = 2048
_UNKNOWN_VOCAB = 262_144  # the largest vocabularies in use (Gemma 3): logits for it dominate the compute buffer
_UNKNOWN_HEADS = 128  # the most attention heads in use (Llama 3.1 405B)
_UNKNOWN_EMBD = 16384  # the widest models (405B); 16 x this x 512 tokens is 512 MiB of activations
_UNKNOWN_CONTEXT = 4096  # context_length 0 with no training context in the header (llama.cpp's old default)


@dataclass(frozen=True)
class Estimate:
    """The bytes a model will keep resident once loaded, by part."""

    weights: int
    kv_cache: int
    compute: int
    overhead: int
    prompt_cache: int = 0

    @property
    def total(self) -> int:
        return min(_MAX_ESTIMATE, self.weights + self.kv_cache + self.compute + self.overhead + self.prompt_cache)


def estimate(entry: ModelEntry, context_length: int, parallel: int = 1) -> Estimate:
    """The memory loading `entry` with a context of `context_length` tokens and `parallel` sequences will take,
    by part.

    context_length <= 0 means what the worker does with 0: the model's training context. Header facts the catalog
    could not read (0) are replaced by conservative assumptions, never by smaller ones.
    """
    n_ctx = context_length if context_length > 0 else entry.max_context_length or _UNKNOWN_CONTEXT
    n_ctx = min(_MAX_CONTEXT, -(-n_ctx // _CTX_PAD) * _CTX_PAD)
    weights = max(0, entry.size_bytes)
    kv_cache = min(_MAX_ESTIMATE, _kv_cache(entry, n_ctx, weights))
    return Estimate(
        weights=min(_MAX_ESTIMATE, weights),
        kv_cache=kv_cache,
        compute=min(_MAX_ESTIMATE, _compute(entry, n_ctx)),
        overhead=WORKER_BASE + (entry.n_vocab or _UNKNOWN_VOCAB) * PER_VOCAB_TOKEN,
        prompt_cache=kv_cache if parallel > 1 else 0,
    )


def estimate_bytes(entry: ModelEntry, context_length: int, parallel: int = 1) -> int:
    return estimate(entry, context_length, parallel).total


def _kv_cache(entry: ModelEntry, n_ctx: int, file_size: int) -> int:
    """f16 K and V (2 bytes each) for every layer and token."""
    if entry.n_layer and entry.n_head_kv and entry.head_dim_k and entry.head_dim_v:
        per_token = entry.n_layer * entry.n_head_kv * (entry.head_dim_k + entry.head_dim_v) * 2
    elif entry.n_layer and entry.n_embd:
        # Heads unknown: assume full multi-head attention, K and V each as wide as the embedding (grouped-query
        # attention has less). Only a broken or attention-free (recurrent) model's header lands here.
        per_token = entry.n_layer * 2 * entry.n_embd * 2
    else:
        per_token = max(32 * KiB, file_size // _UNKNOWN_KV_PER_TOKEN_DIVISOR)
    return per_token * n_ctx


def _compute(entry: ModelEntry, n_ctx: int) -> int:
    """llama.cpp's CPU compute buffer plus the CPU backend's work buffer.

    The compute buffer is sized for the worst-case graph: n_ubatch tokens against the whole context, with logits
    for all of them (n_outputs_max = n_batch). ggml-alloc reuses memory as the graph goes, so of its two peaks only
    the larger counts: one layer's attention scores (f32 KQ, an n_ctx x n_ubatch matrix per head) or the logits
    (f32, n_vocab per token). The KQ mask (n_ctx x n_ubatch, f32) is an input, live throughout. On top, the
    micro-batch's f32 activations: 16 x n_embd per token covers the feed-forward stage (gate, up and their
    product, n_ff <= 4 n_embd in the usual shapes) and the residual stream. This matches llama.cpp's own "CPU
    compute buffer size" within a few percent and never falls below it (SmolLM2-135M from 512 to 32768 tokens,
    the 2-layer test model from 256 to 32768).
    """
    n_ub = min(N_UBATCH, n_ctx)
    # Unknown heads: heads narrower than 32 are not used in practice, so n_embd / 32 heads bounds the count.
    n_head = entry.n_head or (max(1, entry.n_embd // 32) if entry.n_embd else _UNKNOWN_HEADS)
    n_embd = entry.n_embd or _UNKNOWN_EMBD
    n_vocab = entry.n_vocab or _UNKNOWN_VOCAB
    attention = n_ctx * n_ub * n_head * 4
    logits = n_vocab * n_ub * 4
    mask = n_ctx * n_ub * 4
    activations = 16 * n_embd * n_ub * 4
    # Outside that buffer, ggml's CPU backend keeps a work buffer as large as its largest operand conversion: the
    # softmaxed scores (f32) turned into f16 to multiply the f16 V cache. Seen in /proc/<pid>/smaps: a 31.5 MiB
    # mapping after SmolLM2 (9 heads) read a 4032-token prompt with a 4096-token context.
    work = n_ctx * n_ub * n_head * 2
    return max(attention, logits) + mask + activations + work


def system_total_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def system_available_bytes() -> int:
    """Memory the kernel can hand out now without swapping: free memory plus reclaimable page cache."""
    import psutil

    return int(psutil.virtual_memory().available)


def safety_margin_bytes(total: int) -> int:
    """What `memory_limit = auto` keeps free beyond the models: max(512 MiB, 5% of total RAM).

    The estimate covers the worker; the rest of the machine keeps running meanwhile: the daemon, the user's
    desktop and browser, the page cache the system needs to stay responsive. 512 MiB is a floor for a small
    machine (a desktop session alone grows by that much); 5% scales it on a large one, where other programs'
    working sets grow too. Both are small enough not to forbid a model that plainly fits.
    """
    return max(512 * MiB, max(0, total) // 20)


# Units of `memory_limit`. Every prefix is a power of 1024, with or without the "i": `6GB` = `6G` = `6GiB` =
# 6 * 1024**3 bytes. That is what the CLI prints (`lms ps` shows 6 GiB as "6.0 GB"), so a size read there and
# typed back means the same bytes; it also matches Docker, systemd and most OS tools.
_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgtp", start=1):
    _UNITS[_p] = _UNITS[_p + "b"] = _UNITS[_p + "ib"] = 1 << (10 * _i)
_SIZE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[a-z]*)")
MIN_MEMORY_LIMIT = 64 * MiB
MAX_MEMORY_LIMIT = PiB
_ALLOWED = (
    "memory_limit is 'auto' (fit what RAM allows), 'off' (no limit) or a size between 64 MiB and 1 PiB: "
    "a number of bytes or a number with a unit K, M, G, T (powers of 1024; KB, MB, GB, TB and KiB, MiB, GiB, TiB "
    "are the same), e.g. 6GB, 512MiB, 1.5G"
)


def parse_memory_limit(text: str) -> str | int:
    """`auto`, `off`, or a size in bytes: a plain number, or a number with a unit (case and spaces ignored).

    Units are powers of 1024 however they are written: K = KB = KiB = 1024, M = MB = MiB = 1024**2, G = GB = GiB
    = 1024**3, T = TB = TiB = 1024**4 (P/PB/PiB likewise). Fractions round to the nearest byte: `1.5GiB` is
    1610612736. Returns "auto", "off" or an int; raises ValueError, saying what is allowed, for anything else,
    including a size below 64 MiB (no model fits) or above 1 PiB.
    """
    s = str(text).strip().lower()
    if s in ("auto", "off"):
        return s
    m = _SIZE.fullmatch(s)
    if m is None or m["unit"] not in _UNITS:
        raise ValueError(f"invalid memory_limit {str(text)[:40]!r}: {_ALLOWED}")
    value = float(m["number"]) * _UNITS[m["unit"]]
    if not math.isfinite(value) or not MIN_MEMORY_LIMIT <= value <= MAX_MEMORY_LIMIT:
        raise ValueError(f"memory_limit {str(text)[:40]!r} is out of range: {_ALLOWED}")
    return round(value)


def format_bytes(n: int) -> str:
    """`1288490188` -> "1.2 GB". The CLI's convention (lmscli/output.py): powers of 1024, whole B and KB, one
    decimal from MB up. Unlike the CLI's table cells, 0 is "0 B" (a quantity in a message, not a missing value)."""
    sign = "-" if n < 0 else ""
    size = float(abs(n))
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{sign}{size:.0f} {unit}" if unit in ("B", "KB") else f"{sign}{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


class Measurements:
    """The largest resident memory seen for each model at each context length, so reality corrects the estimate
    "from then on" — across daemon restarts too, when given a file (LMS_HOME/cache/memory.json). Keyed by the
    model file's path and size (and the context length): a replaced file starts afresh. Written only when a
    figure grows by more than 5% (it is written on the daemon's loop: rarely, and small)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._seen: dict[str, int] = {}
        if path is not None:
            try:
                data = json.loads(path.read_text())
                self._seen = {str(k): int(v) for k, v in data.items() if isinstance(v, int) and 0 < v < _MAX_ESTIMATE}
            except (OSError, ValueError, TypeError, AttributeError):
                self._seen = {}

    @staticmethod
    def _key(entry: ModelEntry, context_length: int) -> str:
        return f"{entry.path}|{entry.size_bytes}|{context_length}"

    def get(self, entry: ModelEntry, context_length: int) -> int:
        return self._seen.get(self._key(entry, context_length), 0)

    def record(self, entry: ModelEntry, context_length: int, resident: int) -> None:
        key = self._key(entry, context_length)
        before = self._seen.get(key, 0)
        if resident <= before:
            return
        self._seen[key] = resident
        if self.path is not None and resident > before * 1.05:  # small growths are kept in memory, not written
            from lmsd.config import write_atomically

            try:
                write_atomically(self.path, json.dumps(self._seen, indent=1, sort_keys=True) + "\n")
            except OSError as exc:
                log.warning("cannot save measured memory to %s: %s", self.path, exc)
