"""The GGUF header reader against files from the internet: random bytes and mutated real headers must give a header
or one typed error (GGUFError / OSError), never another exception, and never take long. `_describe` (what the
catalog lists) must never raise at all."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmsd.catalog import _describe
from lmsd.gguf_header import GGUFError, read_header

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _real_header(path: Path) -> bytes:
    """A small but real GGUF: key/values of every kind, arrays, and two tensors."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_context_length(512)
    w.add_token_list([f"tok{i}" for i in range(100)])
    w.add_token_scores([0.5] * 100)
    w.add_chat_template("{{ messages }}")
    w.add_tensor("token_embd.weight", np.zeros((100, 8), dtype=np.float32))
    w.add_tensor("output.weight", np.zeros((100, 8), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _check(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    started = time.monotonic()
    try:
        header = read_header(path)
    except (GGUFError, OSError):
        pass
    else:
        assert header.tensor_count >= 0 and header.n_params >= 0
    meta = _describe(path, path.name, len(data))  # never raises: a bad file becomes `error`
    assert isinstance(meta, dict)
    for field in ("max_context_length", "n_layer", "n_head", "n_head_kv", "n_embd", "n_vocab"):
        value = meta.get(field, 0)
        assert isinstance(value, int) and 0 <= value < 2**32, (field, value)
    assert time.monotonic() - started < 2.0


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes(tmp_path: Path, data: bytes) -> None:
    _check(tmp_path / "random.gguf", b"GGUF" + data)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 10_000)))
def test_mutated_real_headers(tmp_path: Path, flips: list[tuple[int, int]], cut: int | None) -> None:
    original = _real_header(tmp_path / "real.gguf")
    data = bytearray(original)
    for position, value in flips:
        if position < len(data):
            data[position] = value
    if cut is not None:
        data = data[:cut]
    _check(tmp_path / "mutated.gguf", bytes(data))


def test_nested_arrays_cost_a_bounded_number_of_visits(tmp_path: Path) -> None:
    """Arrays of arrays multiply the reader's work with each level (a 20 MB file of nested 64-element arrays
    took 18 s and 233 MB, and held the catalog lock meanwhile): past 100,000 nested elements the file is refused."""
    import struct

    def key(name: str) -> bytes:
        return struct.pack("<Q", len(name)) + name.encode()

    leaf = struct.pack("<IQ", 0, 1) + b"\0"  # an array of one uint8
    middle = struct.pack("<IQ", 9, 64) + leaf * 64  # 64 of them
    value = struct.pack("<I", 9) + struct.pack("<IQ", 9, 2000) + middle * 2000  # 128,000 arrays in all
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + key("evil") + value + key("general.name") + \
        struct.pack("<I", 8) + key("x")
    path = tmp_path / "nested.gguf"
    _check(path, data)
    with pytest.raises(GGUFError, match="nested header arrays"):
        read_header(path)
    # A few nested arrays are fine: skipped, the rest of the header is read.
    small = struct.pack("<I", 9) + struct.pack("<IQ", 9, 3) + leaf * 3
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + key("ok") + small + key("general.name") +
                     struct.pack("<I", 8) + key("x") + bytes(64))
    assert read_header(path).fields["general.name"] == "x"


def test_millions_of_tiny_keys_are_refused_without_reading_them_all(tmp_path: Path) -> None:
    import struct

    kv = b"".join(struct.pack("<Q", 4) + b"k%03d" % (i % 1000) + struct.pack("<I", 0) + b"\0" for i in range(3_100_000))
    path = tmp_path / "keys.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 3_100_000) + kv)
    with pytest.raises(GGUFError, match="keys and array elements"):
        read_header(path)
