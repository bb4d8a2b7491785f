"""Catalog: keys, collisions, GGUF header metadata, broken files, caching, name resolution."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lmsd.catalog import AmbiguousModel, Catalog, base_key
from lmsd.gguf_header import GGUFError, read_header


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
        ("Llama-3.2-1B-Instruct-Q4_K_M.gguf", "llama-3.2-1b-instruct"),
        ("qwen2.5-0.5b-instruct-iq3_xs.gguf", "qwen2.5-0.5b-instruct"),
        ("phi-2.F16.gguf", "phi-2"),
        ("nomic-embed-text-v1.5.bf16.gguf", "nomic-embed-text-v1.5"),
        ("plain.gguf", "plain"),
    ],
)
def test_key_drops_case_and_quantization_tag(name: str, key: str) -> None:
    assert base_key(name) == key


def test_metadata_from_header(smollm2_file: Path, tiny_file: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "pub" / "repo").mkdir(parents=True)
    os.symlink(smollm2_file, models / "pub" / "repo" / smollm2_file.name)
    os.symlink(tiny_file, models / tiny_file.name)
    entries = {e.key: e for e in Catalog(models).scan()}
    smol = entries["smollm2-135m-instruct"]
    assert (smol.arch, smol.quantization, smol.params, smol.max_context_length, smol.type) == (
        "llama", "Q4_1", 134515008, 8192, "llm")
    assert smol.has_chat_template and smol.rel_path == f"pub/repo/{smollm2_file.name}" and smol.publisher == "pub"
    tiny = entries["lms-tiny-test"]
    assert (tiny.quantization, tiny.max_context_length, tiny.error) == ("F16", 2048, "")


def test_colliding_keys_get_the_folder_then_the_quantization(tiny_file: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    for rel in ("a/x/model.Q4_0.gguf", "b/y/model.Q4_0.gguf", "c/z/model.Q8_0.gguf", "c/z/model.F16.gguf",
                "unique.gguf"):
        (models / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(tiny_file, models / rel)
    keys = sorted(e.key for e in Catalog(models).scan())
    # Both c/z files are the same F16 model underneath, so `@quant` is not enough: their paths decide.
    assert keys == ["a/x/model", "b/y/model", "c/z/model.f16", "c/z/model.q8_0", "unique"]


def test_truncated_and_garbage_files_are_marked_not_fatal(tiny_file: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    data = tiny_file.read_bytes()
    (models / "half.gguf").write_bytes(data[: len(data) // 2])
    (models / "header-only.gguf").write_bytes(data[:200])
    (models / "junk.gguf").write_bytes(b"\x00" * 64)
    (models / "empty.gguf").write_bytes(b"")
    entries = {e.key: e for e in Catalog(models).scan()}
    assert "truncated" in entries["half"].error
    assert "truncated" in entries["header-only"].error
    assert "not a GGUF file" in entries["junk"].error
    assert "not a GGUF file" in entries["empty"].error
    with pytest.raises(GGUFError):
        read_header(models / "junk.gguf")


def test_scan_uses_the_cache_until_a_file_changes(tiny_file: Path, tmp_path: Path, monkeypatch) -> None:
    models = tmp_path / "models"
    models.mkdir()
    for n in range(30):
        os.symlink(tiny_file, models / f"m{n}.F16.gguf")
    cache = tmp_path / "cache" / "catalog.json"
    Catalog(models, cache).scan()
    import lmsd.catalog as catalog_mod

    calls: list[Path] = []
    real = catalog_mod.read_header
    monkeypatch.setattr(catalog_mod, "read_header", lambda p: calls.append(p) or real(p))
    started = time.perf_counter()
    fresh = Catalog(models, cache)  # a new process: the cache file is read, no header is parsed
    assert len(fresh.scan()) == 30 and calls == []
    assert time.perf_counter() - started < 2.0
    (models / "m0.F16.gguf").unlink()
    (models / "m0.F16.gguf").write_bytes(b"GGUF")
    entries = {e.key: e for e in fresh.scan()}
    assert calls == [models / "m0.F16.gguf"] and entries["m0"].error


def test_resolve(tiny_file: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    for rel in ("p/r/alpha-one.F16.gguf", "p/r/alpha-two.F16.gguf", "p/s/beta.F16.gguf"):
        (models / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(tiny_file, models / rel)
    cat = Catalog(models)
    assert cat.resolve("beta").key == "beta"
    assert cat.resolve("BETA").key == "beta"
    assert cat.resolve("alpha-o").key == "alpha-one"
    assert cat.resolve("p/s/beta.F16.gguf").key == "beta"
    with pytest.raises(AmbiguousModel, match="alpha-one, alpha-two"):
        cat.resolve("alpha")
    with pytest.raises(LookupError, match="Did you mean: beta"):
        cat.resolve("betta")
    for path in ("../../etc/passwd", "/etc/passwd", "p/../../x.gguf", "~/x.gguf"):
        with pytest.raises(ValueError, match="looks like a filesystem path"):
            cat.resolve(path)


def test_symlink_loops_are_walked_once_and_quickly(tmp_path: Path) -> None:
    import os
    import time

    from lmsd.catalog import Catalog

    models = tmp_path / "models"
    (models / "pub" / "repo").mkdir(parents=True)
    (models / "pub" / "repo" / "m.Q4_1.gguf").write_bytes(b"GGUF")
    os.symlink(models, models / "pub" / "loop-a")  # two links back to the top: exponential without cycle checks
    os.symlink(models / "pub", models / "pub" / "repo" / "loop-b")
    started = time.monotonic()
    entries = Catalog(models).scan()
    assert time.monotonic() - started < 5
    assert [e.rel_path for e in entries] == ["pub/repo/m.Q4_1.gguf"]  # listed once, not once per path through a loop
