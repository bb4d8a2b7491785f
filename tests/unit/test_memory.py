"""The memory estimate, the `memory_limit` syntax, and the header facts the catalog reads for the estimate."""

from __future__ import annotations

import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from lmsd.catalog import Catalog, ModelEntry, _describe
from lmsd.gguf_header import SkippedArray, read_header
from lmsd.memory import (
    PER_VOCAB_TOKEN,
    WORKER_BASE,
    GiB,
    MiB,
    PiB,
    estimate,
    estimate_bytes,
    format_bytes,
    parse_memory_limit,
    safety_margin_bytes,
    system_available_bytes,
    system_total_bytes,
)

SHAPE_FIELDS = ("n_layer", "n_head", "n_head_kv", "n_embd", "head_dim_k", "head_dim_v", "n_vocab")

# ------------------------------------------------------------------ parse_memory_limit


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("auto", "auto"),
        (" AUTO ", "auto"),
        ("off", "off"),
        ("Off", "off"),
        ("6GB", 6 * GiB),
        ("6G", 6 * GiB),
        ("6gb", 6 * GiB),
        ("6GiB", 6 * GiB),
        ("6 GB", 6 * GiB),
        ("512MiB", 512 * MiB),
        ("800M", 800 * MiB),
        ("800MB", 800 * MiB),
        ("1.5GiB", 1610612736),
        (".5G", 512 * MiB),
        ("2T", 2 << 40),
        ("2TB", 2 << 40),
        ("1PiB", PiB),
        ("65536K", 64 * MiB),
        ("68719476736", 64 * GiB),
        ("67108864B", 64 * MiB),
    ],
)
def test_parse_memory_limit_accepts(text: str, expected: str | int) -> None:
    assert parse_memory_limit(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "  ", "0", "-1", "-6GB", "nan", "NaN", "inf", "-inf", "1e12", "6 G B", "6XB", "GB", "six gigabytes",
     "auto6", "0x100000000", "6,5G", "1..5G", "1" + "0" * 400, "63MiB", "1025TiB", "2PB", "1.5", "12\x1b[31m"],
)
def test_parse_memory_limit_rejects_with_what_is_allowed(text: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_memory_limit(text)
    msg = str(err.value)
    assert "'auto'" in msg and "'off'" in msg and "64 MiB" in msg and "GB" in msg
    assert "\x1b" not in msg.replace("\\x1b", "")  # the bad input is quoted with repr: no raw control characters
    assert len(msg) < 400


def test_units_are_powers_of_1024_like_the_sizes_the_cli_prints() -> None:
    n = parse_memory_limit("6GB")
    assert isinstance(n, int) and format_bytes(n) == "6.0 GB"
    assert parse_memory_limit(format_bytes(1536 * MiB).replace(" ", "")) == 1536 * MiB


# ------------------------------------------------------------------ format_bytes


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1 KB"),
        (1536, "2 KB"),
        (100 * MiB, "100.0 MB"),
        (1288490188, "1.2 GB"),
        (6 * GiB, "6.0 GB"),
        (3 << 40, "3.0 TB"),
        (2 * PiB, "2048.0 TB"),
        (-512 * MiB, "-512.0 MB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_format_bytes_matches_the_cli_for_positive_sizes() -> None:
    from lmscli.output import format_bytes as cli_format_bytes

    for n in (1, 999, 4096, 98 * MiB + 12345, 7 * GiB + 1, 5 << 40):
        assert format_bytes(n) == cli_format_bytes(n)


# ------------------------------------------------------------------ the system and the margin


def test_system_memory_is_read() -> None:
    total, available = system_total_bytes(), system_available_bytes()
    assert 0 < available <= total


def test_safety_margin() -> None:
    assert safety_margin_bytes(4 * GiB) == 512 * MiB  # the floor on a small machine
    assert safety_margin_bytes(64 * GiB) == 64 * GiB // 20  # 5%
    assert safety_margin_bytes(0) == 512 * MiB


def test_importing_memory_stays_cheap() -> None:
    code = ("import sys, lmsd.memory; heavy = {'llama_cpp', 'fastapi', 'psutil', 'numpy', 'gguf', 'grpc'} "
            "& set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


# ------------------------------------------------------------------ estimate


def llama_like(**kw: int) -> ModelEntry:
    """SmolLM2-135M-Instruct's header facts (Q4_1, 30 layers, 9 heads, 3 KV heads of 64)."""
    facts = dict(size_bytes=98 * MiB, max_context_length=8192, n_layer=30, n_head=9, n_head_kv=3, n_embd=576,
                 head_dim_k=64, head_dim_v=64, n_vocab=49152)
    facts.update(kw)
    size = facts.pop("size_bytes")
    return ModelEntry(key="m", path="/m.gguf", rel_path="m.gguf", size_bytes=size, **facts)  # type: ignore[arg-type]


def test_kv_cache_is_f16_k_and_v_per_layer_and_token() -> None:
    e = estimate(llama_like(), 4096)
    assert e.kv_cache == 30 * 4096 * 3 * (64 + 64) * 2  # 90 MiB, what llama.cpp reports for this model
    assert e.weights == 98 * MiB and e.overhead == WORKER_BASE + 49152 * PER_VOCAB_TOKEN
    assert e.total == e.weights + e.kv_cache + e.compute + e.overhead == estimate_bytes(llama_like(), 4096)


def test_parallel_sequences_count_a_second_kv_cache_for_the_conversations_kept_in_ram() -> None:
    alone, shared = estimate(llama_like(), 4096, parallel=1), estimate(llama_like(), 4096, parallel=4)
    assert alone.prompt_cache == 0
    assert shared.prompt_cache == shared.kv_cache == alone.kv_cache
    assert shared.total == alone.total + alone.kv_cache == estimate_bytes(llama_like(), 4096, 4)


def test_kv_cache_grows_linearly_with_the_context() -> None:
    kv = {n: estimate(llama_like(), n).kv_cache for n in (1024, 2048, 4096, 8192)}
    assert kv[2048] == 2 * kv[1024] and kv[4096] == 4 * kv[1024] and kv[8192] == 8 * kv[1024]
    totals = [estimate_bytes(llama_like(), n) for n in (512, 1024, 2048, 4096, 8192)]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)


def test_context_is_rounded_up_like_llama_cpp() -> None:
    assert estimate(llama_like(), 1).kv_cache == estimate(llama_like(), 256).kv_cache
    assert estimate(llama_like(), 257).kv_cache == estimate(llama_like(), 512).kv_cache


def test_context_zero_means_the_training_context() -> None:
    assert estimate(llama_like(), 0) == estimate(llama_like(), 8192)
    assert estimate(llama_like(max_context_length=0), 0) == estimate(llama_like(), 4096)


def test_compute_grows_with_vocabulary_and_with_context_once_attention_dominates() -> None:
    # At 4096 tokens SmolLM2's logits (49152 x 512 x f32) outweigh its attention scores: more vocabulary, more buffer.
    big_vocab = estimate(llama_like(n_vocab=256000), 4096).compute - estimate(llama_like(), 4096).compute
    assert big_vocab == (256000 - 49152) * 512 * 4
    assert estimate(llama_like(), 65536).compute > estimate(llama_like(), 4096).compute


# llama.cpp's own report ("CPU compute buffer size", verbose=True, llama-cpp-python 0.3.36), MiB by context.
LLAMA_CPP_COMPUTE_MIB = {
    "smollm2": {256: 49.13, 512: 98.25, 1024: 98.25, 2048: 99.38, 4096: 99.38, 8192: 166.38, 16384: 326.38,
                32768: 646.38},
    "tiny": {256: 48.19, 512: 96.38, 4096: 96.38, 8192: 96.38, 16384: 160.88, 32768: 320.88},
}


@pytest.mark.parametrize("model", sorted(LLAMA_CPP_COMPUTE_MIB))
def test_compute_covers_what_llama_cpp_reserves(model: str) -> None:
    entry = llama_like() if model == "smollm2" else llama_like(
        size_bytes=7 * MiB, n_layer=2, n_head=4, n_head_kv=4, n_embd=64, head_dim_k=16, head_dim_v=16)
    for n_ctx, reported in LLAMA_CPP_COMPUTE_MIB[model].items():
        work = -(-n_ctx // 256) * 256 * min(512, n_ctx) * entry.n_head * 2  # the CPU backend's f16 scores
        buffer = (estimate(entry, n_ctx).compute - work) / MiB
        assert reported <= buffer <= reported * 1.25, (n_ctx, reported, buffer)


def test_grouped_query_attention_needs_less_than_full_attention() -> None:
    gqa = estimate(llama_like(), 4096).kv_cache
    assert estimate(llama_like(n_head_kv=9), 4096).kv_cache == 3 * gqa


@pytest.mark.parametrize("unknown", [*SHAPE_FIELDS, "all"])
def test_unknown_header_facts_never_lower_the_estimate(unknown: str) -> None:
    known = estimate(llama_like(), 4096)
    facts = {f: 0 for f in SHAPE_FIELDS} if unknown == "all" else {unknown: 0}
    fallback = estimate(llama_like(**facts), 4096)
    assert fallback.weights == known.weights
    assert fallback.kv_cache >= known.kv_cache
    assert fallback.compute >= known.compute
    assert fallback.total >= known.total


def test_nothing_known_falls_back_on_the_file_size() -> None:
    blank = ModelEntry(key="x", path="/x.gguf", rel_path="x.gguf", size_bytes=4 * GiB)
    e = estimate(blank, 4096)
    assert e.kv_cache == 4 * GiB // 2048 * 4096  # 8 GiB: a 7B model with full attention needs 2 GiB
    assert e.total > 4 * GiB + e.kv_cache
    half = estimate(ModelEntry(key="x", path="/x.gguf", rel_path="x.gguf", size_bytes=2 * GiB), 4096)
    assert half.kv_cache == e.kv_cache // 2


def test_huge_values_stay_within_a_signed_64_bit_field() -> None:
    biggest = llama_like(n_layer=4096, n_head=16384, n_head_kv=16384, n_embd=1 << 20, head_dim_k=1 << 16,
                         head_dim_v=1 << 16, n_vocab=1 << 24, size_bytes=1 << 62)
    e = estimate(biggest, 1 << 40)
    assert 0 < e.total < 1 << 63
    assert all(0 <= part < 1 << 63 for part in (e.weights, e.kv_cache, e.compute, e.overhead))


# ------------------------------------------------------------------ the catalog's header facts


def test_catalog_reads_the_shape_from_a_real_header(tiny_file: Path, smollm2_file: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / tiny_file.name).symlink_to(tiny_file)
    (models / smollm2_file.name).symlink_to(smollm2_file)
    entries = {e.key: e for e in Catalog(models).scan()}
    tiny, smol = entries["lms-tiny-test"], entries["smollm2-135m-instruct"]
    # tests/support/tinymodel.py: 2 layers, n_embd 64, 4 heads (no GQA), SmolLM2's vocabulary
    assert [getattr(tiny, f) for f in SHAPE_FIELDS] == [2, 4, 4, 64, 16, 16, 49152]
    assert [getattr(smol, f) for f in SHAPE_FIELDS] == [30, 9, 3, 576, 64, 64, 49152]


def test_shape_survives_the_catalog_cache(tiny_file: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / tiny_file.name).symlink_to(tiny_file)
    cache = tmp_path / "catalog.json"
    first = Catalog(models, cache).scan()
    again = Catalog(models, cache).scan()
    assert first == again and again[0].n_layer == 2


def test_a_cache_from_before_the_shape_is_read_again(tiny_file: Path, tmp_path: Path) -> None:
    import json

    models = tmp_path / "models"
    models.mkdir()
    (models / tiny_file.name).symlink_to(tiny_file)
    cache = tmp_path / "catalog.json"
    Catalog(models, cache).scan()
    data = json.loads(cache.read_text())
    for meta in data["entries"].values():
        for f in SHAPE_FIELDS:
            meta.pop(f)
    data["version"] = 2
    cache.write_text(json.dumps(data))
    assert Catalog(models, cache).scan()[0].n_vocab == 49152


def write_gguf(path: Path, build: Callable[..., None]) -> Path:
    """A header-only GGUF (no tensors) whose key/values `build(writer)` adds after the architecture."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    build(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def describe(path: Path) -> dict[str, object]:
    return _describe(path, path.name, path.stat().st_size)


def good_header(w: object) -> None:
    w.add_block_count(24)  # type: ignore[attr-defined]
    w.add_embedding_length(2048)  # type: ignore[attr-defined]
    w.add_head_count(16)  # type: ignore[attr-defined]
    w.add_context_length(4096)  # type: ignore[attr-defined]


def test_defaults_when_optional_facts_are_absent(tmp_path: Path) -> None:
    meta = describe(write_gguf(tmp_path / "m.gguf", good_header))
    assert [meta[f] for f in SHAPE_FIELDS] == [24, 16, 16, 2048, 128, 128, 0]
    assert meta["max_context_length"] == 4096 and "error" not in meta


def test_per_layer_kv_heads_give_the_largest_and_vocab_size_is_a_fallback(tmp_path: Path) -> None:
    def build(w: object) -> None:
        good_header(w)
        w.add_array("llama.attention.head_count_kv", [0, 4, 8, 4] * 6)  # type: ignore[attr-defined]
        w.add_key_length(192)  # type: ignore[attr-defined]
        w.add_value_length(128)  # type: ignore[attr-defined]
        w.add_uint32("llama.vocab_size", 32000)  # type: ignore[attr-defined]

    meta = describe(write_gguf(tmp_path / "m.gguf", build))
    assert (meta["n_head_kv"], meta["head_dim_k"], meta["head_dim_v"], meta["n_vocab"]) == (8, 192, 128, 32000)


def test_a_long_token_list_is_counted_without_being_kept(tmp_path: Path) -> None:
    def build(w: object) -> None:
        good_header(w)
        w.add_token_list([f"t{i}" for i in range(5000)])  # type: ignore[attr-defined]
        w.add_uint32("llama.vocab_size", 7)  # type: ignore[attr-defined]

    path = write_gguf(tmp_path / "m.gguf", build)
    assert read_header(path).fields["tokenizer.ggml.tokens"] == SkippedArray(5000)
    assert describe(path)["n_vocab"] == 5000


HOSTILE: dict[str, Callable[[object], None]] = {
    "block_count 2**40": lambda w: w.add_uint64("llama.block_count", 2**40),  # type: ignore[attr-defined]
    "block_count -3": lambda w: w.add_int32("llama.block_count", -3),  # type: ignore[attr-defined]
    "block_count 0": lambda w: w.add_uint32("llama.block_count", 0),  # type: ignore[attr-defined]
    "block_count string": lambda w: w.add_string("llama.block_count", "24"),  # type: ignore[attr-defined]
    "block_count float": lambda w: w.add_float32("llama.block_count", 24.0),  # type: ignore[attr-defined]
    "block_count bool": lambda w: w.add_bool("llama.block_count", True),  # type: ignore[attr-defined]
    "block_count array of strings": lambda w: w.add_array("llama.block_count", ["a", "b"]),  # type: ignore
    "block_count empty array": lambda w: w.add_array("llama.block_count", []),  # type: ignore[attr-defined]
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_value_is_unknown_never_an_error(case: str, tmp_path: Path) -> None:
    def build(w: object) -> None:
        HOSTILE[case](w)
        w.add_embedding_length(2048)  # type: ignore[attr-defined]
        w.add_head_count(16)  # type: ignore[attr-defined]

    meta = describe(write_gguf(tmp_path / "m.gguf", build))
    assert "error" not in meta
    assert meta["n_layer"] == 0  # unknown
    assert (meta["n_embd"], meta["n_head"]) == (2048, 16)  # one bad field does not spoil the others


def test_a_header_full_of_nonsense_reads_as_unknown(tmp_path: Path) -> None:
    def build(w: object) -> None:
        w.add_uint64("llama.block_count", 2**63)  # type: ignore[attr-defined]
        w.add_int64("llama.embedding_length", -(2**62))  # type: ignore[attr-defined]
        w.add_string("llama.attention.head_count", "lots")  # type: ignore[attr-defined]
        w.add_array("llama.attention.head_count_kv", [4, -1, 4])  # type: ignore[attr-defined]
        w.add_uint64("llama.attention.key_length", 2**64 - 1)  # type: ignore[attr-defined]
        w.add_float64("llama.attention.value_length", float("nan"))  # type: ignore[attr-defined]
        w.add_uint64("llama.vocab_size", 2**40)  # type: ignore[attr-defined]
        w.add_int32("llama.context_length", -1)  # type: ignore[attr-defined]

    meta = describe(write_gguf(tmp_path / "m.gguf", build))
    assert "error" not in meta
    assert [meta[f] for f in SHAPE_FIELDS] == [0] * 7 and meta["max_context_length"] == 0
    entry = ModelEntry(key="x", path="/x", rel_path="x", size_bytes=1 * GiB, **meta)  # type: ignore[arg-type]
    assert estimate(entry, 4096).total >= estimate(llama_like(size_bytes=1 * GiB), 4096).total


def gguf_string(s: str) -> bytes:
    return struct.pack("<Q", len(s)) + s.encode()


def raw_gguf(path: Path, *kvs: bytes) -> Path:
    """A GGUF header written byte by byte, for what GGUFWriter refuses to write. Each kv: key, type, value."""
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs)
    path.write_bytes(data + bytes(-len(data) % 32))  # the (empty) tensor data starts aligned to 32
    return path


def test_a_wrong_architecture_value_is_not_trusted(tmp_path: Path) -> None:
    arch_as_array = gguf_string("general.architecture") + struct.pack("<IIQ", 9, 8, 1) + gguf_string("llama")
    block_count = gguf_string("['llama'].block_count") + struct.pack("<II", 4, 24)
    meta = describe(raw_gguf(tmp_path / "m.gguf", arch_as_array, block_count))
    assert meta["arch"] == "" and [meta[f] for f in SHAPE_FIELDS] == [0] * 7


def test_deeply_nested_arrays_are_a_corrupt_file_not_a_crash(tmp_path: Path) -> None:
    arch = gguf_string("general.architecture") + struct.pack("<I", 8) + gguf_string("llama")
    nested = struct.pack("<IQ", 9, 1) * 100_000 + struct.pack("<IQ", 4, 0)  # array of array of ... 100k deep
    path = raw_gguf(tmp_path / "nested.gguf", arch, gguf_string("x.nested") + struct.pack("<I", 9) + nested)
    assert "nested too deeply" in str(describe(path)["error"])
