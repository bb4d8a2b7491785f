"""The header reader's walk over string arrays (token lists, merges): crossed in runs with numpy, it must land
exactly where a one-by-one walk lands, whatever the strings hold (zeros, long ones, empty ones) and wherever the
read window ends. The hostile cases are in test_gguf_fuzz.py."""

from __future__ import annotations

import struct
from pathlib import Path
from unittest.mock import patch

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lmsd.gguf_header as gguf_header
from lmsd.gguf_header import GGUFError, SkippedArray, read_header


def gguf_string(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def header_with(items: list[bytes], after: str = "after") -> bytes:
    """A GGUF file: an array of `items` under "tokens", then a string key, then padding to the data section."""
    array = struct.pack("<IIQ", 9, 8, len(items)) + b"".join(gguf_string(x) for x in items)
    kv = gguf_string(b"tokens") + array + gguf_string(b"general.name") + struct.pack("<I", 8) + \
        gguf_string(after.encode())
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + kv + bytes(64)


strings = st.lists(
    st.one_of(
        st.binary(max_size=24),  # most tokens and merges
        st.just(b""),
        st.binary(min_size=250, max_size=300),  # around the one-byte length the fast walk recognizes
        st.binary(max_size=6).map(lambda b: b + bytes(9) + b),  # text that looks like a length
        st.binary(min_size=600, max_size=700),  # longer than the smallest windows below
    ),
    max_size=300,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=strings, chunk=st.sampled_from([16, 64, 257, 4096, gguf_header._CHUNK]))
def test_string_arrays_are_crossed_exactly(tmp_path: Path, items: list[bytes], chunk: int) -> None:
    items = [b"t%d" % i for i in range(65 - len(items))] + items  # arrays of up to 64 are read, not skipped
    path = tmp_path / "strings.gguf"
    path.write_bytes(header_with(items))
    with patch.object(gguf_header, "_CHUNK", chunk):
        skipped = read_header(path)
        kept = read_header(path, keep_arrays=frozenset({"tokens"}))
    assert skipped.fields["general.name"] == "after"
    expected = [x.decode("utf-8", errors="replace") for x in items]
    assert skipped.fields["tokens"] == SkippedArray(len(items))
    assert kept.fields["tokens"] == expected and kept.fields["general.name"] == "after"


def test_a_real_vocabulary_is_crossed_as_when_it_is_read(smollm2_file: Path) -> None:
    tokenizer = frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.merges"})
    read = read_header(smollm2_file, keep_arrays=tokenizer)
    skipped = read_header(smollm2_file)
    assert len(read.fields["tokenizer.ggml.tokens"]) == 49152 and len(read.fields["tokenizer.ggml.merges"]) == 48900
    assert skipped.fields["tokenizer.ggml.tokens"] == SkippedArray(49152)
    after = {k: v for k, v in read.fields.items() if k not in tokenizer}
    assert {k: v for k, v in skipped.fields.items() if k not in tokenizer} == after
    assert (skipped.n_params, skipped.expected_size) == (read.n_params, read.expected_size) == (134515008, 98362432)


@pytest.mark.parametrize("position", [0, 70, 199])
@pytest.mark.parametrize("length", [1 << 40, (1 << 56) + 5, 1 << 63])  # one non-zero byte, 5th to 8th
def test_an_implausible_length_inside_a_string_array_is_refused(tmp_path: Path, position: int, length: int) -> None:
    items = [b"tok%d" % i for i in range(200)]
    data = bytearray(header_with(items))
    offset = data.index(gguf_string(items[position]))
    data[offset : offset + 8] = struct.pack("<Q", length)
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="implausible string length"):
        read_header(path)


def test_an_array_running_past_the_end_of_the_file_is_truncated(tmp_path: Path) -> None:
    data = header_with([b"tok%d" % i for i in range(1000)])
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match="truncated"):
        read_header(path)


@pytest.mark.parametrize("pattern", [[b""], [b"x" * 300], [b"", b"ab", b"x" * 300, b"\0" * 9], [b"tok", b"en"]])
def test_runs_of_strings_the_fast_walk_does_not_recognize(tmp_path: Path, pattern: list[bytes]) -> None:
    items = pattern * (5000 // len(pattern))
    path = tmp_path / "pattern.gguf"
    path.write_bytes(header_with(items))
    for chunk in (64, gguf_header._CHUNK):
        with patch.object(gguf_header, "_CHUNK", chunk):
            header = read_header(path)
        assert header.fields["general.name"] == "after" and header.fields["tokens"] == SkippedArray(len(items))


@pytest.mark.parametrize("name_length", [10, 300, 5000])
def test_tensor_infos_across_windows(tmp_path: Path, name_length: int) -> None:
    """Tensor infos are parsed straight from the window; one that crosses its end, or is longer than a window,
    is read all the same."""
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "tensors.gguf"
    w = GGUFWriter(str(path), "llama")
    for i in range(50):
        w.add_tensor(f"{i:04d}".ljust(name_length, "x"), np.zeros((i % 3 + 1, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    expected = read_header(path)
    assert expected.n_params == sum((i % 3 + 1) * 4 for i in range(50))
    assert expected.expected_size == path.stat().st_size
    for chunk in (64, 1000):
        with patch.object(gguf_header, "_CHUNK", chunk):
            header = read_header(path)
        assert (header.n_params, header.expected_size) == (expected.n_params, expected.expected_size)


def gguf_file(path: Path, kvs: list[tuple[bytes, bytes]], tensor_infos: bytes = b"", n_tensors: int = 0) -> Path:
    """A GGUF file of string values (`kvs`: key, value) and the given raw tensor infos."""
    body = b"".join(gguf_string(k) + struct.pack("<I", 8) + gguf_string(v) for k, v in kvs)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs)) + body + tensor_infos + bytes(64))
    return path


def test_long_string_values_are_skipped_but_the_chat_template_is_kept(tmp_path: Path) -> None:
    template = b"{% for m in messages %}" * 40_000  # ~0.9 MB: long, but a chat template
    path = gguf_file(tmp_path / "m.gguf", [(b"general.description", b"x" * 5_000_000),
                                          (b"tokenizer.chat_template", template), (b"general.name", b"after")])
    fields = read_header(path).fields
    assert fields["general.description"] == gguf_header.SkippedString(5_000_000)  # moved past, never held
    assert fields["tokenizer.chat_template"] == template.decode()
    assert fields["general.name"] == "after"
    huge = gguf_file(tmp_path / "t.gguf", [(b"tokenizer.chat_template", b"x" * 2_000_000)])
    assert read_header(huge).fields["tokenizer.chat_template"] == gguf_header.SkippedString(2_000_000)


def test_the_strings_kept_from_one_header_are_bounded(tmp_path: Path) -> None:
    value = b"v" * 60_000  # each under the per-value limit, 17 MB in all
    path = gguf_file(tmp_path / "m.gguf", [(f"k{i}".encode(), value) for i in range(300)])
    with pytest.raises(GGUFError, match="bytes of strings"):
        read_header(path)
    with pytest.raises(GGUFError, match="key length"):
        read_header(gguf_file(tmp_path / "k.gguf", [(b"k" * 100_000, b"v")]))


def test_tensor_infos_are_bounded(tmp_path: Path) -> None:
    info = struct.pack("<QIIQ", 0, 0, 0, 0)  # empty name, rank 0, F32, offset 0
    many = gguf_header._MAX_TENSORS + 1
    with pytest.raises(GGUFError, match="implausible tensor count"):
        read_header(gguf_file(tmp_path / "many.gguf", [], info * many, n_tensors=many))
    long_name = gguf_string(b"t" * 1_000_000) + struct.pack("<IIQ", 0, 0, 0)
    with pytest.raises(GGUFError, match="tensor name length"):
        read_header(gguf_file(tmp_path / "name.gguf", [], long_name, n_tensors=1))
