"""Reads a GGUF file's header — key/values and tensor infos — without touching the weights.

gguf's GGUFReader parses every array element into numpy objects (seconds for a 49k-token vocabulary);
listing models must stay fast, so this reads the header through a window of bytes read ahead in large chunks,
skips the arrays it does not need, and uses the gguf package only for its constants (value types, file types,
quantization block sizes). A listing of hundreds of models reads hundreds of headers: see `_walk_strings`
for how a token list is crossed without one Python step per token.
"""

from __future__ import annotations

import functools
import math
import os
import struct
import threading
from dataclasses import dataclass, field
from io import FileIO
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
_MAX_STRING = 64 * 1024 * 1024  # no sane header string is larger; beyond this the file is corrupt
_MAX_COUNT = 1 << 32
# What a header may make the reader keep in memory (files come from the internet): a string value longer than
# _MAX_VALUE is skipped (the chat template, the one long value the catalog reads, up to _MAX_TEMPLATE), a key
# longer than _MAX_KEY is refused, and the strings kept from one header total at most _MAX_KEPT bytes.
_MAX_VALUE = 64 * 1024
_MAX_TEMPLATE = 1024 * 1024
_CHAT_TEMPLATE = "tokenizer.chat_template"
_MAX_KEY = 64 * 1024
_MAX_KEPT = 16 * 1024 * 1024
# Tensor infos per file: the largest real models have at most tens of thousands; each costs a Python step. A tensor's
# name is at most 64 bytes in llama.cpp (GGML_MAX_NAME); a longer one only serves to make the reader read it.
_MAX_TENSORS = 1 << 18  # ~0.6 s of parsing at most
_MAX_TENSOR_NAME = 64 * 1024

# GGUF value types (stable on-disk numbers), with struct formats for the fixed-size ones.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRUCTS = {vtype: struct.Struct(fmt) for vtype, fmt in _SCALARS.items()}
_STRING, _ARRAY = 8, 9
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_TENSOR_REST = [struct.Struct(f"<{n_dims}QIQ") for n_dims in range(9)]  # a tensor info after its name and rank
# Arrays kept whole: short ones only. Token lists, merges and scores are skipped (the catalog needs none).
_KEEP_ARRAY_MAX = 64
_MAX_DEPTH = 4  # arrays of arrays are legal; a deeper nesting only serves to exhaust the stack
# Arrays of arrays are never kept, and at most this many of their elements are visited per file (a 20 MB file of
# nested 64-element arrays took 18 s and 233 MB; real models have none).
_MAX_NESTED = 100_000
# Keys and array elements visited (all but arrays of numbers, skipped in one step) per file: a real model has
# well under a million (a 256k-token vocabulary and its merges); 50 MB of tiny keys took 8 s.
_MAX_VISITS = 3_000_000
# Bytes read ahead at a time. SmolLM2's header is 1.7 MB; a 256k-token vocabulary's is about 6 MB. The window
# never holds more than one chunk beyond the longest single string it must parse (itself at most _MAX_TEMPLATE).
_CHUNK = 256 * 1024


class GGUFError(ValueError):
    """The file is not a readable GGUF file; the message says why."""


@dataclass
class GGUFHeader:
    version: int
    fields: dict[str, Any] = field(default_factory=dict)
    tensor_count: int = 0
    n_params: int = 0
    expected_size: int = 0  # bytes the file must have to hold every tensor


@dataclass(frozen=True)
class SkippedString:
    """Stands for a string value longer than the reader keeps (see `_MAX_VALUE`): only its length is known."""

    length: int


@dataclass(frozen=True)
class SkippedArray:
    """Stands for a long array the reader skipped (see `read_header`): only its element count is known."""

    length: int


def array_length(value: object) -> int | None:
    """The element count of a header array, kept or skipped; None when the value is not an array."""
    if isinstance(value, SkippedArray):
        return value.length
    if isinstance(value, list):
        return len(value)
    return None


class _Reader:
    """The header's bytes from one open file, through a window read ahead in chunks: values are unpacked from
    memory, and the file is read again only when parsing reaches the end of the window. A skip past the window
    (a long array of numbers) moves `pos` without reading what it skips.

    The window is one buffer, refilled in place and kept by the thread for its next header: fresh memory for every
    window costs more in page faults than the parsing of it (see `_scratch`)."""

    def __init__(self, f: FileIO) -> None:
        self._f = f
        self._buf = _scratch_window()
        self._data = memoryview(self._buf)[:0]  # the valid part of _buf
        self._start = 0  # file offset of _data[0]
        self._eof = False  # the window reaches the end of the file
        self.pos = 0  # file offset of the next byte to parse
        # (nested, visits) still allowed in this file: see _MAX_NESTED and _MAX_VISITS
        self.nested = _MAX_NESTED
        self.visits = _MAX_VISITS
        self.kept = _MAX_KEPT  # bytes of strings still allowed in this file

    def window(self, n: int, ahead: int = 0) -> tuple[memoryview, int]:
        """The window and pos's index in it, with at least n bytes from pos (GGUFError if the file ends first), and
        `ahead` bytes if the file has them."""
        i = self.pos - self._start
        if 0 <= i <= len(self._data) - n and (i <= len(self._data) - ahead or self._eof):
            return self._data, i
        keep = len(self._data) - i if 0 <= i < len(self._data) else 0  # the unparsed tail stays
        size = max(n, _CHUNK)
        if size > len(self._buf):  # a string longer than a chunk
            old, self._buf = self._buf, bytearray(size)
            self._buf[:keep] = old[i : i + keep]
        elif keep:
            self._buf[:keep] = self._buf[i : i + keep]
        self._start = self.pos
        self._f.seek(self.pos + keep)
        have = keep
        with memoryview(self._buf) as view:
            while have < size:
                got = self._f.readinto(view[have:size])
                if not got:
                    break
                have += got
        self._data = memoryview(self._buf)[:have]
        self._eof = have < size
        if have < n:
            raise GGUFError("file ends inside the header (truncated)")
        return self._data, 0

    def unpack(self, st: struct.Struct) -> Any:
        data, i = self.window(st.size)
        self.pos += st.size
        return st.unpack_from(data, i)[0]

    def string(self, limit: int = _MAX_VALUE) -> str | SkippedString:
        """The next string, or SkippedString if it is longer than limit (moved past, never read)."""
        n = self.unpack(_U64)
        if n > _MAX_STRING:
            raise GGUFError(f"implausible string length {n} in header (corrupt file)")
        if n > limit:
            self.pos += n
            return SkippedString(n)
        self.kept -= n
        if self.kept < 0:
            raise GGUFError(f"more than {_MAX_KEPT} bytes of strings in the header's values (corrupt file)")
        data, i = self.window(n)
        self.pos += n
        return str(data[i : i + n], "utf-8", "replace")

    def tensors(self, count: int, sizes: dict[int, tuple[int, int]]) -> tuple[int, int]:
        """Reads `count` tensor infos: the elements of all tensors, and where the furthest one's data ends (relative
        to the data section). Parsed straight from the window; an info that crosses its end is read alone."""
        n_params = data_end = 0
        stalled = False
        while count:
            data, start = self.window(8, ahead=_CHUNK // 2)
            i, end = start, len(data)
            while count and i + 8 <= end:
                n = _U64.unpack_from(data, i)[0]  # the name's length; the name is not needed
                if n > _MAX_TENSOR_NAME:
                    raise GGUFError(f"implausible tensor name length {n} in header (corrupt file)")
                j = i + 8 + n
                if j + 4 > end:
                    break
                n_dims = _U32.unpack_from(data, j)[0]
                if n_dims > 8:
                    raise GGUFError("implausible tensor rank (corrupt file)")
                rest = _TENSOR_REST[n_dims]
                if j + 4 + rest.size > end:
                    break
                *dims, ttype, offset = rest.unpack_from(data, j + 4)
                if ttype not in sizes:
                    raise GGUFError(f"unknown tensor type {ttype} (corrupt or unsupported file)")
                n_elements = math.prod(dims)
                block, type_size = sizes[ttype]
                n_params += n_elements
                data_end = max(data_end, offset + n_elements // block * type_size)
                i = j + 4 + rest.size
                count -= 1
                stalled = False
            self.pos += i - start
            if count and i == start:  # one info longer than the window: make the window hold it, parse it above
                if stalled:  # cannot happen; a reader must fail, never spin
                    raise GGUFError("tensor info could not be read (corrupt file)")
                stalled = True
                n = _U64.unpack_from(data, i)[0]
                data, i = self.window(n + 12)
                n_dims = _U32.unpack_from(data, i + n + 8)[0]
                self.window(n + 12 + _TENSOR_REST[min(n_dims, 8)].size)
        return n_params, data_end

    def skip_strings(self, count: int) -> None:
        """Moves past `count` strings of an array (a token list, merges), checking each length."""
        while count:
            data, i = self.window(8, ahead=_CHUNK // 2)  # not a few bytes short of the next chunk
            walked, end = _walk_strings(data, i, count)
            if not walked:  # cannot happen (the window holds a length); a reader must fail, never spin
                raise GGUFError("header array could not be read (corrupt file)")
            self.pos += end - i
            count -= walked


def _walk_strings(data: memoryview, i: int, count: int) -> tuple[int, int]:
    """Walks up to `count` strings (a u64 length, then the bytes) in data from index i, as long as a length lies in
    the data (at least one: the caller gives 8 bytes). Returns how many it walked and the index after them, which
    may lie past the data: a string's bytes are never needed, only its length.

    A string's end is only known from its length, so crossing a 49k-token list is 49k dependent steps: ~5 ms per
    array in Python, the largest cost of listing a folder of models. But nearly every token or merge is shorter
    than 256 bytes, and the length of such a string is one byte then seven zeros. numpy finds every index where
    that pattern begins (`starts`) and the strings it would end at; from a real string's start, a run of such
    strings each ending where the next begins is crossed in one step. The walk only ever stands on a real string's
    start, so text that happens to look like a length can cut a run short but never mislead it; the strings the
    pattern misses (long ones, empty ones among zeros) are read one by one.
    """
    # Tokens and merges average about 16 bytes a string (length included): look that far ahead, within one chunk.
    # Looking too far costs numpy work on bytes past the array; too short, one more call for the rest.
    span = min(len(data) - i, count * 16 + 4096, _CHUNK)
    if span < 8:
        return 0, i
    a = np.frombuffer(data, dtype=np.uint8, count=span, offset=i)
    zeros, pairs = _scratch(span)
    np.equal(a, 0, out=zeros)
    np.logical_and(zeros[1:-1], zeros[2:], out=pairs[:-2])  # pairs[j]: zeros at j+1 and j+2
    np.logical_and(pairs[:-4], pairs[2:-2], out=zeros[:-4])  # zeros[j]: zeros at j+1 .. j+4
    np.logical_and(zeros[:-7], zeros[3:-4], out=pairs[:-7])  # pairs[j]: zeros at j+1 .. j+7
    starts = np.flatnonzero(pairs[:-7])  # relative to i
    ends = a[starts].astype(np.int64)
    ends += starts
    ends += 8
    run_ends = np.append(np.flatnonzero(ends[:-1] != starts[1:]), len(starts) - 1)  # the last string of each run
    walked, q, steps = 0, 0, 0
    while walked < count and q + 8 <= span:
        steps += 1
        if steps > 64 and walked < 8 * steps:  # runs are short here (empty or long strings): one by one is faster
            break
        k = int(starts.searchsorted(q))
        if k < len(starts) and starts[k] == q:
            last = min(int(run_ends[run_ends.searchsorted(k)]), k + count - walked - 1)
            walked += last - k + 1
            q = int(ends[last])
            continue
        q += 8 + _string_length(data, i + q)
        walked += 1
    while walked < count and q + 8 <= span:
        q += 8 + _string_length(data, i + q)
        walked += 1
    return walked, i + q


def _string_length(data: memoryview, i: int) -> int:
    n: int = _U64.unpack_from(data, i)[0]
    if n > _MAX_STRING:
        raise GGUFError("implausible string length in header array (corrupt file)")
    return n


_local = threading.local()


def _scratch(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two boolean buffers of n bytes, kept by each thread: numpy's temporaries, allocated anew for every window,
    cost more in page faults than the work done in them (with the window, a thread keeps 3 x _CHUNK bytes)."""
    if getattr(_local, "size", 0) < n:
        _local.zeros, _local.pairs, _local.size = np.empty(_CHUNK, np.bool_), np.empty(_CHUNK, np.bool_), _CHUNK
    return _local.zeros[:n], _local.pairs[:n]


def _scratch_window() -> bytearray:
    """The thread's window buffer (a reader grows its own copy for a string longer than a chunk)."""
    if len(getattr(_local, "window", b"")) != _CHUNK:
        _local.window = bytearray(_CHUNK)
    window: bytearray = _local.window
    return window


def _value(r: _Reader, vtype: int, keep: bool = False, depth: int = 0, limit: int = _MAX_VALUE) -> Any:
    if depth > _MAX_DEPTH:
        raise GGUFError("arrays nested too deeply in header (corrupt file)")
    if vtype in _STRUCTS:
        return r.unpack(_STRUCTS[vtype])
    if vtype == _STRING:
        return r.string(limit)
    if vtype != _ARRAY:
        raise GGUFError(f"unknown GGUF value type {vtype} (corrupt file)")
    etype = r.unpack(_U32)
    count = r.unpack(_U64)
    if count > _MAX_COUNT:
        raise GGUFError(f"implausible array length {count} in header (corrupt file)")
    if depth > 0 or etype == _ARRAY:
        r.nested -= count
        if r.nested < 0:
            raise GGUFError(f"more than {_MAX_NESTED} elements in nested header arrays (corrupt file)")
    if etype not in _STRUCTS or count <= _KEEP_ARRAY_MAX or keep:
        r.visits -= count
        if r.visits < 0:
            raise GGUFError(f"more than {_MAX_VISITS} keys and array elements in the header (corrupt file)")
    if depth == 0 and etype != _ARRAY and (count <= _KEEP_ARRAY_MAX or keep):
        return [_value(r, etype, depth=depth + 1) for _ in range(count)]
    if etype in _STRUCTS:
        r.pos += count * _STRUCTS[etype].size
    elif etype == _STRING:
        r.skip_strings(count)
    else:
        for _ in range(count):
            _value(r, etype, depth=depth + 1)
    return SkippedArray(count)


@functools.cache
def _tensor_sizes() -> dict[int, tuple[int, int]]:
    """Tensor type number -> (block size in elements, bytes per block)."""
    from gguf.constants import GGML_QUANT_SIZES

    return {int(t): sizes for t, sizes in GGML_QUANT_SIZES.items()}


def read_header(path: Path, keep_arrays: frozenset[str] = frozenset()) -> GGUFHeader:
    """Parses the header of the GGUF file at path. Raises GGUFError (or OSError) on failure.

    Long arrays are skipped unless their key is in keep_arrays.
    """
    sizes = _tensor_sizes()
    with open(path, "rb", buffering=0) as f:
        file_size = os.fstat(f.fileno()).st_size
        if f.read(4) != GGUF_MAGIC:
            raise GGUFError("not a GGUF file (bad magic bytes)")
        r = _Reader(f)
        r.pos = 4
        version = r.unpack(_U32)
        if version not in (2, 3):
            raise GGUFError(f"unsupported GGUF version {version}")
        tensor_count = r.unpack(_U64)
        kv_count = r.unpack(_U64)
        if tensor_count > _MAX_TENSORS or kv_count > _MAX_COUNT:
            raise GGUFError(f"implausible tensor count {tensor_count} or key count {kv_count} (corrupt file)")
        header = GGUFHeader(version=version, tensor_count=tensor_count)
        for _ in range(kv_count):
            r.visits -= 1
            if r.visits < 0:
                raise GGUFError(f"more than {_MAX_VISITS} keys and array elements in the header (corrupt file)")
            key = r.string(_MAX_KEY)
            if not isinstance(key, str):
                raise GGUFError(f"implausible key length {key.length} in header (corrupt file)")
            limit = _MAX_TEMPLATE if key == _CHAT_TEMPLATE else _MAX_VALUE
            header.fields[key] = _value(r, r.unpack(_U32), key in keep_arrays, limit=limit)
        header.n_params, data_end = r.tensors(tensor_count, sizes)
        alignment = header.fields.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0:
            alignment = 32
        start = r.pos + (-r.pos) % alignment
        header.expected_size = start + data_end
    if file_size < header.expected_size:
        raise GGUFError(f"truncated: the tensors need {header.expected_size} bytes, the file has {file_size}")
    return header
