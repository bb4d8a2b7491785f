"""Reads a GGUF file's header — key/values and tensor infos — without touching the weights.

gguf's GGUFReader parses every array element into numpy objects (seconds for a 49k-token vocabulary);
listing models must stay fast, so this streams the header, skips arrays it does not need, and uses the
gguf package only for its constants (value types, file types, quantization block sizes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

GGUF_MAGIC = b"GGUF"
_MAX_STRING = 64 * 1024 * 1024  # no sane header string is larger; beyond this the file is corrupt
_MAX_COUNT = 1 << 32

# GGUF value types (stable on-disk numbers), with struct formats for the fixed-size ones.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# Arrays kept whole: short ones only. Token lists, merges and scores are skipped (the catalog needs none).
_KEEP_ARRAY_MAX = 64
_MAX_DEPTH = 4  # arrays of arrays are legal; a deeper nesting only serves to exhaust the stack
# Arrays of arrays are never kept, and at most this many of their elements are visited per file (a 20 MB file of
# nested 64-element arrays took 18 s and 233 MB; real models have none).
_MAX_NESTED = 100_000
# Keys and array elements read one by one (all but arrays of numbers, skipped in one seek) per file: a real
# model has well under a million (a 256k-token vocabulary and its merges); 50 MB of tiny keys took 8 s.
_MAX_VISITS = 3_000_000


class GGUFError(ValueError):
    """The file is not a readable GGUF file; the message says why."""


@dataclass
class GGUFHeader:
    version: int
    fields: dict[str, Any] = field(default_factory=dict)
    tensor_count: int = 0
    n_params: int = 0
    expected_size: int = 0  # bytes the file must have to hold every tensor


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise GGUFError("file ends inside the header (truncated)")
    return data


def _unpack(f: BinaryIO, fmt: str) -> Any:
    return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]


def _string(f: BinaryIO) -> str:
    n = _unpack(f, "<Q")
    if n > _MAX_STRING:
        raise GGUFError(f"implausible string length {n} in header (corrupt file)")
    return _read(f, n).decode("utf-8", errors="replace")


def _value(f: BinaryIO, vtype: int, keep: bool = False, depth: int = 0, budget: list[int] | None = None) -> Any:
    if depth > _MAX_DEPTH:
        raise GGUFError("arrays nested too deeply in header (corrupt file)")
    if vtype in _SCALARS:
        return _unpack(f, _SCALARS[vtype])
    if vtype == _STRING:
        return _string(f)
    if vtype == _ARRAY:
        budget = budget if budget is not None else [_MAX_NESTED, _MAX_VISITS]
        etype = _unpack(f, "<I")
        count = _unpack(f, "<Q")
        if count > _MAX_COUNT:
            raise GGUFError(f"implausible array length {count} in header (corrupt file)")
        if depth > 0 or etype == _ARRAY:
            budget[0] -= count
            if budget[0] < 0:
                raise GGUFError(f"more than {_MAX_NESTED} elements in nested header arrays (corrupt file)")
        if etype not in _SCALARS or count <= _KEEP_ARRAY_MAX or keep:
            budget[1] -= count
            if budget[1] < 0:
                raise GGUFError(f"more than {_MAX_VISITS} keys and array elements in the header (corrupt file)")
        if depth == 0 and etype != _ARRAY and (count <= _KEEP_ARRAY_MAX or keep):
            return [_value(f, etype, depth=depth + 1) for _ in range(count)]
        if etype in _SCALARS:
            f.seek(count * struct.calcsize(_SCALARS[etype]), 1)
        elif etype == _STRING:
            for _ in range(count):
                n = _unpack(f, "<Q")
                if n > _MAX_STRING:
                    raise GGUFError("implausible string length in header array (corrupt file)")
                f.seek(n, 1)
        else:
            for _ in range(count):
                _value(f, etype, depth=depth + 1, budget=budget)
        return SkippedArray(count)
    raise GGUFError(f"unknown GGUF value type {vtype} (corrupt file)")


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


def read_header(path: Path, keep_arrays: frozenset[str] = frozenset()) -> GGUFHeader:
    """Parses the header of the GGUF file at path. Raises GGUFError (or OSError) on failure.

    Long arrays are skipped unless their key is in keep_arrays.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    file_size = path.stat().st_size
    with open(path, "rb", buffering=1 << 16) as f:
        if f.read(4) != GGUF_MAGIC:
            raise GGUFError("not a GGUF file (bad magic bytes)")
        version = _unpack(f, "<I")
        if version not in (2, 3):
            raise GGUFError(f"unsupported GGUF version {version}")
        tensor_count = _unpack(f, "<Q")
        kv_count = _unpack(f, "<Q")
        if tensor_count > _MAX_COUNT or kv_count > _MAX_COUNT:
            raise GGUFError("implausible tensor or key count (corrupt file)")
        header = GGUFHeader(version=version, tensor_count=tensor_count)
        budget = [_MAX_NESTED, _MAX_VISITS]  # for the whole file
        for _ in range(kv_count):
            budget[1] -= 1
            if budget[1] < 0:
                raise GGUFError(f"more than {_MAX_VISITS} keys and array elements in the header (corrupt file)")
            key = _string(f)
            header.fields[key] = _value(f, _unpack(f, "<I"), key in keep_arrays, budget=budget)
        data_end = 0
        for _ in range(tensor_count):
            _string(f)
            n_dims = _unpack(f, "<I")
            if n_dims > 8:
                raise GGUFError("implausible tensor rank (corrupt file)")
            n_elements = 1
            for _ in range(n_dims):
                n_elements *= _unpack(f, "<Q")
            ttype = _unpack(f, "<I")
            offset = _unpack(f, "<Q")
            header.n_params += n_elements
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                raise GGUFError(f"unknown tensor type {ttype} (corrupt or unsupported file)") from None
            data_end = max(data_end, offset + n_elements // block * type_size)
        alignment = header.fields.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0:
            alignment = 32
        start = f.tell()
        start += (-start) % alignment
        header.expected_size = start + data_end
    if file_size < header.expected_size:
        raise GGUFError(f"truncated: the tensors need {header.expected_size} bytes, the file has {file_size}")
    return header
