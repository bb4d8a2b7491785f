"""The catalog as the daemon runs it: an index built in the background and kept current by watching the folder
(or polling it), split models, and requests that never walk the folder. Real files in tmp_path; where the watcher
must notice a change, the test polls the index with a deadline."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lmsd.catalog as catalog_mod
import lmsd.catalog_index as index_mod
from lmsd.catalog import Catalog, ModelEntry, base_key

DEADLINE = 15.0  # seconds a test waits for the watcher; it reports a change within about 0.2 s


def small_gguf(path: Path, n_tensors: int = 1, arch: str | None = "llama", context: int = 1024) -> Path:
    """A valid GGUF of a few hundred bytes: `n_tensors` 4x4 F32 tensors; the architecture keys only for a first
    part (the other parts of a split model carry tensors only). Written under a hidden name and moved into place,
    as `lms get` does: a watched index never sees it half-written."""
    from gguf import GGUFWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.part")
    w = GGUFWriter(str(partial), arch or "llama")
    if arch is None:
        w.kv_data[0].pop("general.architecture", None)
    else:
        w.add_context_length(context)
        w.add_block_count(2)
    for i in range(n_tensors):
        w.add_tensor(f"t{path.stem}.{i}", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    partial.replace(path)
    return path


def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE}s: {what}")
        time.sleep(0.02)


def keys(cat: Catalog) -> list[str]:
    return [e.key for e in cat.scan()]


@pytest.fixture
def started() -> Iterator[Callable[..., Catalog]]:
    """Starts catalogs and stops them after the test."""
    running: list[Catalog] = []

    def start(models: Path, cache: Path | None = None, **kw: object) -> Catalog:
        cat = Catalog(models, cache, **kw)  # type: ignore[arg-type]
        cat.start()
        running.append(cat)
        return cat

    yield start
    for cat in running:
        cat.stop()


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, any_thread: bool = False) -> list[object]:
    """The calls of owner.name made by this thread (the test's requests), or by any (the index's own too)."""
    calls: list[object] = []
    real = getattr(owner, name)
    me = threading.get_ident()

    def counting(*args: object, **kw: object) -> object:
        if any_thread or threading.get_ident() == me:
            calls.append(args[0] if args else None)
        return real(*args, **kw)

    monkeypatch.setattr(owner, name, counting)
    return calls


# ---------------------------------------------------------------- the watched index


def test_files_added_and_removed_are_followed_without_walking_per_request(
        tmp_path: Path, started: Callable[..., Catalog], monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    small_gguf(models / "pub" / "repo" / "alpha.Q4_0.gguf")
    cat = started(models)
    assert keys(cat) == ["alpha"]
    until(lambda: cat.mode == "watching", "the watch is set")
    walks = count_calls(monkeypatch, catalog_mod, "walk", any_thread=True)

    small_gguf(models / "pub" / "repo" / "beta.Q8_0.gguf")
    until(lambda: "beta" in keys(cat), "a new file in a known folder is indexed")
    assert cat.resolve("beta").arch == "llama"  # its header was read
    (models / "pub" / "repo" / "alpha.Q4_0.gguf").unlink()
    until(lambda: keys(cat) == ["beta"], "a removed file leaves the index")
    assert walks == []  # files in folders the index knows: one stat each, no walk

    small_gguf(models / "newpub" / "repo" / "gamma.gguf")  # a new folder: what is below it is walked
    until(lambda: "gamma" in keys(cat), "a file in a new folder is indexed")
    walked = len(walks)
    assert walked >= 1
    for _ in range(50):
        assert cat.resolve("gamma").rel_path == "newpub/repo/gamma.gguf"
    assert len(walks) == walked  # per folder event, not per request


def test_resolving_does_not_walk_the_folder(tmp_path: Path, started: Callable[..., Catalog],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    for i in range(40):
        small_gguf(models / f"pub{i % 4}" / "repo" / f"model-{i:02d}.Q4_0.gguf")
    small_gguf(models / "pub0" / "zephyr" / "zephyr-7b-beta.Q4_K_M.gguf")
    cat = started(models)
    cat.scan()
    calls = [count_calls(monkeypatch, os, name) for name in ("walk", "scandir", "listdir", "stat", "lstat")]
    for _ in range(100):
        assert cat.resolve("model-07").key == "model-07"  # exact key
        assert cat.resolve("MODEL-39").key == "model-39"  # any case
        assert cat.resolve("zeph").key == "zephyr-7b-beta"  # unique prefix
        assert cat.resolve("pub3/repo/model-03.Q4_0.gguf").key == "model-03"  # path in the folder
        assert cat.resolve("pub3/repo/model-03.Q4_0").key == "model-03"
    with pytest.raises(catalog_mod.AmbiguousModel):
        cat.resolve("model-1")
    assert calls == [[]] * 5


def test_a_unique_prefix_resolves_by_bisection(tmp_path: Path, started: Callable[..., Catalog],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    for name in ("qwen2.5-7b-instruct.Q4_K_M", "qwen2.5-0.5b-instruct.Q8_0", "llama-3.2-1b.Q4_0"):
        small_gguf(models / "pub" / name.split(".Q")[0] / f"{name}.gguf")
    cat = started(models)
    cat.scan()
    walks = count_calls(monkeypatch, os, "walk")
    assert cat.resolve("qwen2.5-7").key == "qwen2.5-7b-instruct"
    assert cat.resolve("LLAMA").key == "llama-3.2-1b"
    with pytest.raises(catalog_mod.AmbiguousModel, match="several models: qwen2.5-7b-instruct, qwen2.5-0.5b-instruct"):
        cat.resolve("qwen")
    assert walks == []


def test_an_unknown_name_waits_for_the_watcher_then_fails(tmp_path: Path, started: Callable[..., Catalog],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    small_gguf(models / "alpha.gguf")
    cat = started(models)
    cat.scan()
    walks = count_calls(monkeypatch, os, "walk")
    with pytest.raises(LookupError, match="Did you mean: alpha"):
        cat.resolve("alpah")
    assert walks == []


def test_a_file_just_written_is_found_by_its_path_before_the_watcher_reports_it(
        tmp_path: Path, started: Callable[..., Catalog]) -> None:
    models = tmp_path / "models"
    small_gguf(models / "alpha.gguf")
    never = threading.Event()

    def silent(root: str, stop: threading.Event) -> Iterator[set[tuple[int, str]]]:
        yield set()  # the watch is set; it then never reports anything
        stop.wait()
        never.set()

    cat = started(models, watch=silent)
    cat.scan()
    small_gguf(models / "pub" / "repo" / "fresh.Q4_0.gguf")
    entry = cat.resolve("pub/repo/fresh.Q4_0.gguf")  # one file looked at directly
    assert (entry.key, entry.arch, entry.max_context_length) == ("fresh", "llama", 1024)
    assert cat.resolve("fresh").rel_path == "pub/repo/fresh.Q4_0.gguf"  # and in the index from now on


def test_links_are_followed_and_watched(tmp_path: Path, started: Callable[..., Catalog]) -> None:
    elsewhere = tmp_path / "lmstudio" / "publisher"
    small_gguf(elsewhere / "repo" / "linked.Q4_0.gguf")
    models = tmp_path / ".lmstudio" / "models"  # a hidden folder above the models folder hides nothing in it
    models.mkdir(parents=True)
    os.symlink(elsewhere, models / "publisher")
    cat = started(models)
    assert [e.rel_path for e in cat.scan()] == ["publisher/repo/linked.Q4_0.gguf"]
    until(lambda: cat.mode == "watching", "the watch is set")
    small_gguf(elsewhere / "repo" / "added.Q4_0.gguf")  # written through the real path
    until(lambda: "added" in keys(cat), "a file added behind a link is indexed")


def test_a_request_during_a_cold_start_waits_for_names_not_for_every_header(
        tmp_path: Path, started: Callable[..., Catalog], monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    for name in ("aaa", "bbb", "ccc", "ddd"):
        small_gguf(models / "pub" / name / f"{name}.gguf")
    gate = threading.Event()
    real = catalog_mod.read_header

    def slow(path: Path, *args: object) -> object:
        if path.name != "ddd.gguf":
            gate.wait(DEADLINE)  # the index's own reads are stuck until the test opens the gate
        return real(path)

    monkeypatch.setattr(catalog_mod, "read_header", slow)
    cat = started(models, tmp_path / "catalog.json")
    try:
        entry = cat.resolve("ddd")  # reads its own header in the request
        assert (entry.arch, entry.max_context_length, entry.error) == ("llama", 1024, "")
        assert not gate.is_set()
    finally:
        gate.set()
    assert [e.arch for e in cat.scan()] == ["llama"] * 4


def test_the_cache_file_spares_the_headers_on_restart(tmp_path: Path, started: Callable[..., Catalog],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    for i in range(10):
        small_gguf(models / "pub" / f"r{i}" / f"m{i}.gguf")
    cache = tmp_path / "cache" / "catalog.json"
    first = started(models, cache)
    assert len(first.scan()) == 10
    first.stop()
    reads = count_calls(monkeypatch, catalog_mod, "read_header", any_thread=True)  # the index's reads too
    again = started(models, cache)  # a daemon restart
    assert [e.arch for e in again.scan()] == ["llama"] * 10 and reads == []


def test_without_watching_the_folder_is_polled(tmp_path: Path, started: Callable[..., Catalog]) -> None:
    def cannot_watch(root: str, stop: threading.Event) -> Iterator[set[tuple[int, str]]]:
        raise OSError(28, "inotify watch limit reached")

    models = tmp_path / "models"
    small_gguf(models / "alpha.gguf")
    cat = started(models, watch=cannot_watch, poll_interval=0.05)
    assert keys(cat) == ["alpha"]
    until(lambda: cat.mode == "polling", "polling instead of watching")
    small_gguf(models / "pub" / "repo" / "beta.gguf")
    until(lambda: "beta" in keys(cat), "a poll finds the new file")


def test_polling_a_miss_asks_for_a_poll_now(tmp_path: Path, started: Callable[..., Catalog]) -> None:
    def cannot_watch(root: str, stop: threading.Event) -> Iterator[set[tuple[int, str]]]:
        raise OSError(28, "inotify watch limit reached")

    models = tmp_path / "models"
    small_gguf(models / "alpha.gguf")
    cat = started(models, watch=cannot_watch, poll_interval=3600)  # never on its own during the test
    cat.scan()
    until(lambda: cat.mode == "polling", "polling instead of watching")
    small_gguf(models / "pub" / "repo" / "beta.Q4_0.gguf")
    assert cat.resolve("beta").rel_path == "pub/repo/beta.Q4_0.gguf"


def test_a_folder_that_does_not_exist_yet_is_waited_for(tmp_path: Path, started: Callable[..., Catalog]) -> None:
    models = tmp_path / "models"
    cat = started(models, poll_interval=0.05)
    assert cat.scan() == []
    with pytest.raises(LookupError, match="no model 'alpha'"):
        cat.resolve("alpha")
    assert cat.mode == "waiting"
    small_gguf(models / "alpha.gguf")
    until(lambda: keys(cat) == ["alpha"], "the folder, once created, is indexed")
    until(lambda: cat.mode == "watching", "and watched")
    small_gguf(models / "beta.gguf")
    until(lambda: keys(cat) == ["alpha", "beta"], "changes are followed")


def test_stop_ends_the_thread_and_the_catalog_reads_the_folder_again(tmp_path: Path) -> None:
    models = tmp_path / "models"
    small_gguf(models / "alpha.gguf")
    cat = Catalog(models)
    cat.start()
    assert keys(cat) == ["alpha"]
    started_at = time.monotonic()
    cat.stop()
    assert time.monotonic() - started_at < 5 and cat.mode == "off"
    small_gguf(models / "beta.gguf")
    assert keys(cat) == ["alpha", "beta"]  # not started any more: each call reads the folder


# ---------------------------------------------------------------- split models


def write_split(folder: Path, name: str, parts: int, missing: tuple[int, ...] = ()) -> list[Path]:
    paths = []
    for n in range(1, parts + 1):
        path = folder / f"{name}-{n:05d}-of-{parts:05d}.gguf"
        if n not in missing:
            small_gguf(path, n_tensors=n, arch="llama" if n == 1 else None)
            paths.append(path)
    return paths


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("Meta-Llama-3.1-70B-Instruct-Q4_K_M-00001-of-00002.gguf", "meta-llama-3.1-70b-instruct"),
        ("qwen2.5-72b-instruct-q8_0-00003-of-00012.gguf", "qwen2.5-72b-instruct"),
        ("big-00001-of-00003.gguf", "big"),
    ],
)
def test_key_drops_the_part_number_then_the_quantization(name: str, key: str) -> None:
    assert base_key(name) == key


@pytest.mark.parametrize("indexed", [False, True])
def test_a_split_model_is_listed_once_as_its_first_part(tmp_path: Path, started: Callable[..., Catalog],
                                                        indexed: bool) -> None:
    models = tmp_path / "models"
    paths = write_split(models / "pub" / "repo", "Big-Q4_K_M", 3)
    small_gguf(models / "pub" / "other" / "small.Q4_0.gguf")
    cat = started(models) if indexed else Catalog(models)
    entries = {e.key: e for e in cat.scan()}
    assert sorted(entries) == ["big", "small"]
    big = entries["big"]
    assert big.rel_path == "pub/repo/Big-Q4_K_M-00001-of-00003.gguf" and big.path == str(paths[0])
    assert big.size_bytes == sum(p.stat().st_size for p in paths)
    assert big.params == 16 * (1 + 2 + 3)  # every part's tensors
    assert (big.arch, big.max_context_length, big.error) == ("llama", 1024, "")
    for name in ("big", "bi", "pub/repo/Big-Q4_K_M-00001-of-00003.gguf", "pub/repo/Big-Q4_K_M"):
        assert cat.resolve(name).key == "big"
    with pytest.raises(LookupError):
        cat.resolve("pub/repo/Big-Q4_K_M-00002-of-00003")  # a later part is not a model of its own


@pytest.mark.parametrize("indexed", [False, True])
def test_a_split_model_with_a_part_missing_says_which(tmp_path: Path, started: Callable[..., Catalog],
                                                      indexed: bool) -> None:
    models = tmp_path / "models"
    paths = write_split(models / "pub" / "repo", "Big-Q4_K_M", 3, missing=(2,))
    cat = started(models) if indexed else Catalog(models)
    (big,) = cat.scan()
    assert big.key == "big" and big.size_bytes == sum(p.stat().st_size for p in paths)
    assert big.error == "part 2 of 3 is missing (Big-Q4_K_M-00002-of-00003.gguf)"
    assert cat.resolve("big").error == big.error  # the scheduler refuses to load an entry with an error


def test_a_split_model_completed_later_becomes_loadable(tmp_path: Path, started: Callable[..., Catalog]) -> None:
    models = tmp_path / "models"
    write_split(models / "pub" / "repo", "Big", 2, missing=(1,))
    cat = started(models)
    (big,) = cat.scan()
    assert big.error == "part 1 of 2 is missing (Big-00001-of-00002.gguf)"
    until(lambda: cat.mode == "watching", "the watch is set")
    small_gguf(models / "pub" / "repo" / "Big-00001-of-00002.gguf", n_tensors=1)
    until(lambda: cat.scan()[0].error == "", "the first part arrives")
    assert cat.scan()[0].params == 16 * (1 + 2)


def test_a_damaged_part_makes_the_model_unreadable(tmp_path: Path) -> None:
    models = tmp_path / "models"
    paths = write_split(models / "pub" / "repo", "Big", 2)
    paths[1].write_bytes(paths[1].read_bytes()[:40])
    (big,) = Catalog(models).scan()
    assert big.error.startswith("part 2 of 2 (Big-00002-of-00002.gguf): ")


def test_entries_are_copies(tmp_path: Path, started: Callable[..., Catalog]) -> None:
    models = tmp_path / "models"
    small_gguf(models / "alpha.gguf")
    cat = started(models)
    entry: ModelEntry = cat.resolve("alpha")
    entry.error = "patched by a caller"
    assert cat.resolve("alpha").error == "" and cat.scan()[0].error == ""


def test_index_functions_are_pure(tmp_path: Path) -> None:
    """The index is a function of the files and the header metadata: no file is read to build it."""
    files = {f"/m/pub/r/{n}.gguf": index_mod.File(f"pub/r/{n}.gguf", 10, "1:10") for n in ("a.Q4_0", "a.Q8_0")}
    entries, pending = index_mod.models(files, {})
    assert sorted(e.key for e in entries) == ["pub/r/a@q4_0", "pub/r/a@q8_0"] and pending == set(files)


def test_a_damaged_cache_file_costs_header_reads_not_the_index(tmp_path: Path, started: Callable[..., Catalog]) -> None:
    models = tmp_path / "models"
    small_gguf(models / "alpha.gguf")
    small_gguf(models / "beta.gguf")
    cache = tmp_path / "catalog.json"
    Catalog(models, cache).scan()
    import json

    data = json.loads(cache.read_text())
    first, second = sorted(data["entries"])
    data["entries"][first]["surprise"] = 1
    data["entries"][second] = ["not", "a", "dict"]
    cache.write_text(json.dumps(data))
    assert [e.arch for e in started(models, cache).scan()] == ["llama", "llama"]


@pytest.mark.parametrize("damage", [
    {"key": "x"}, {"path": "/elsewhere"}, {"params": "x"}, {"params": 10**30}, {"params": -1}, {"n_layer": True},
    {"type": "chat"}, {"arch": None}, {"error": "unreadable", "arch": "llama"},
])
def test_a_cache_entry_of_the_wrong_shape_costs_only_its_own_header_read(
        tmp_path: Path, started: Callable[..., Catalog], monkeypatch: pytest.MonkeyPatch,
        damage: dict[str, object]) -> None:
    import json

    models = tmp_path / "models"
    damaged = small_gguf(models / "pub" / "big" / "big-00001-of-00002.gguf", n_tensors=1)
    small_gguf(models / "pub" / "big" / "big-00002-of-00002.gguf", n_tensors=2, arch=None)
    small_gguf(models / "beta.gguf")
    cache = tmp_path / "catalog.json"
    Catalog(models, cache).scan()
    data = json.loads(cache.read_text())
    data["entries"][str(damaged)].update(damage)
    cache.write_text(json.dumps(data))
    reads = count_calls(monkeypatch, catalog_mod, "read_header", any_thread=True)
    cat = started(models, cache)
    entries = {e.key: e for e in cat.scan()}
    assert cat.mode != "off"  # the index thread survived the cache
    assert (entries["big"].arch, entries["big"].params, entries["big"].error) == ("llama", 16 * 3, "")
    assert cat.resolve("beta").arch == "llama"
    assert reads == [damaged]


def test_a_hung_walk_does_not_hold_requests(tmp_path: Path, started: Callable[..., Catalog],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    small_gguf(models / "alpha.gguf")
    gate, returned = threading.Event(), threading.Event()
    real = catalog_mod.walk

    def hung(root: str, stopping: Callable[[], bool]) -> object:  # a network mount that does not answer
        gate.wait(DEADLINE)
        returned.set()
        return real(root, stopping)

    monkeypatch.setattr(catalog_mod, "walk", hung)
    monkeypatch.setattr(catalog_mod, "NAMES_WAIT", 0.1)
    monkeypatch.setattr(catalog_mod, "CATCH_UP_WAIT", 0.1)
    cat = started(models)
    try:
        entry = cat.resolve("alpha")  # one file looked at directly, while the walk hangs
        assert (entry.key, entry.arch) == ("alpha", "llama")
        assert not returned.is_set()
    finally:
        gate.set()
    until(lambda: cat.mode == "watching", "the walk ends and the folder is watched")
    assert keys(cat) == ["alpha"]


def test_a_models_folder_removed_and_made_again_is_watched_again(tmp_path: Path,
                                                                 started: Callable[..., Catalog]) -> None:
    import shutil

    models = tmp_path / "models"
    small_gguf(models / "alpha.gguf")
    cat = started(models)
    assert keys(cat) == ["alpha"]
    until(lambda: cat.mode == "watching", "the watch is set")
    shutil.rmtree(models)
    models.mkdir()  # on ext4 and tmpfs, often with the removed folder's inode
    until(lambda: keys(cat) == [], "the removed model leaves the index")
    small_gguf(models / "beta.gguf")
    until(lambda: keys(cat) == ["beta"], "a file in the new folder is indexed")
    small_gguf(models / "gamma.gguf")
    until(lambda: keys(cat) == ["beta", "gamma"], "the new folder is watched, not only walked once")


def test_a_folder_linked_under_a_second_name_is_followed(tmp_path: Path, started: Callable[..., Catalog]) -> None:
    models = tmp_path / "models"
    small_gguf(models / "aa" / "r" / "one.gguf")
    os.symlink(models / "aa", models / "zz")  # the same folder under two names: indexed once, as aa
    cat = started(models)
    assert [e.rel_path for e in cat.scan()] == ["aa/r/one.gguf"]
    until(lambda: cat.mode == "watching", "the watch is set")
    small_gguf(models / "aa" / "r" / "two.gguf")  # the watcher may report it under either name
    until(lambda: "two" in keys(cat), "a file in the folder with two names is indexed")
    assert [e.rel_path for e in cat.scan()] == ["aa/r/one.gguf", "aa/r/two.gguf"]


def test_a_request_cannot_add_a_model_under_a_folder_s_second_name(tmp_path: Path,
                                                                   started: Callable[..., Catalog]) -> None:
    models = tmp_path / "models"
    small_gguf(models / "aa" / "r" / "one.gguf")
    os.symlink(models / "aa", models / "zz")
    cat = started(models)
    assert keys(cat) == ["one"]
    with pytest.raises(LookupError, match="no model 'zz/r/one'"):
        cat.resolve("zz/r/one")
    assert keys(cat) == ["one"] and cat.resolve("one").rel_path == "aa/r/one.gguf"


def assert_keys_unique_and_found(names: list[str]) -> None:
    """The models the files make: every key non-empty, none shared, each finding its own model."""
    files = {f"/m/{rel}": index_mod.File(rel, 10, "1:10") for rel in names}
    entries, _pending = index_mod.models(files, {})
    assert all(e.key for e in entries) and len({e.key for e in entries}) == len(entries)
    view = index_mod.View(entries)
    for e in entries:
        assert view.find(e.key) is e


@pytest.mark.parametrize("names", [
    ["p/r/X-00001-of-00002.gguf", "p/r/X-00002-of-00002.gguf", "p/r/X.gguf"],  # split next to merged
    ["p/r/X-00001-of-00002.gguf", "p/r/X-00002-of-00002.gguf", "p/r/X-00001-of-00003.gguf"],
    ["p/r/Model.gguf", "p/r/model.gguf"],  # case only
    ["-00001-of-00001.gguf"],  # nothing left of the name
    ["a/-00000-of-00000.gguf", "b/x.Q4_0.gguf"],
])
def test_keys_are_unique_and_never_empty(names: list[str]) -> None:
    assert_keys_unique_and_found(names)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["a", "A", "b", "x.Q4_0", "x.q4_0", "x", "-00001-of-00002",
                                          "-00002-of-00002", "-00001-of-00001", "x-00001-of-00002"]),
                         min_size=1, max_size=3).map(lambda parts: "/".join(parts[:-1] + [parts[-1] + ".gguf"])),
                max_size=8, unique=True))
def test_any_names_make_unique_keys(names: list[str]) -> None:
    assert_keys_unique_and_found(names)


def test_a_model_keeps_its_key_when_a_file_of_the_same_name_arrives(
        tmp_path: Path, started: Callable[..., Catalog]) -> None:
    """The key scripts and clients use never changes under them: the newcomer gets the longer key, and both keys
    survive a restart of the daemon (the cache holds them)."""
    models, cache = tmp_path / "models", tmp_path / "catalog.json"
    small_gguf(models / "local" / "smol" / "Smol.Q8_0.gguf")
    cat = started(models, cache)
    assert keys(cat) == ["smol"]
    small_gguf(models / "bob" / "smol" / "Smol.Q8_0.gguf")
    until(lambda: len(keys(cat)) == 2, "the second file is indexed")
    assert cat.resolve("smol").rel_path == "local/smol/Smol.Q8_0.gguf"
    assert cat.resolve("bob/smol/smol").rel_path == "bob/smol/Smol.Q8_0.gguf"
    small_gguf(models / "local" / "smol" / "Smol.Q4_0.gguf")  # same folder: the quantization tells it apart
    until(lambda: len(keys(cat)) == 3, "the third file is indexed")
    assert keys(cat) == ["bob/smol/smol", "local/smol/smol@q4_0", "smol"]
    cat.stop()
    assert keys(started(models, cache)) == ["bob/smol/smol", "local/smol/smol@q4_0", "smol"]
    # Files that arrive together, with nothing known before, are both qualified, as always.
    assert keys(Catalog(models)) == ["bob/smol/smol", "local/smol/smol@q4_0", "local/smol/smol@q8_0"]


def _state(rel: str, state: str) -> tuple[str, index_mod.File, index_mod.Meta | None]:
    """A file as the index may see it: its header read ("read"), not read yet ("pending"), or unreadable ("error":
    a file still being written)."""
    meta: index_mod.Meta | None = {"stamp": "1:10", "quantization": index_mod.quant_from_name(rel.rsplit("/")[-1])}
    if state == "error":
        meta = {"stamp": "1:10", "error": "truncated"}
    return f"/m/{rel}", index_mod.File(rel, 10, "1:10"), None if state == "pending" else meta


NAMES = ["a/r/x.Q4_0.gguf", "a/r/x.Q8_0.gguf", "b/r/x.Q4_0.gguf", "x.gguf", "x.q4_0.gguf", "a/r/x.gguf", "A/r/x.gguf",
         "x@q4_0.gguf", "a/r/x@q4_0.gguf", "x-00001-of-00001.gguf"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.dictionaries(st.sampled_from(NAMES), st.sampled_from(["read", "read", "pending", "error"]),
                                          max_size=6), st.booleans()), min_size=1, max_size=6))
def test_keys_stay_stable_as_files_come_and_go(steps: list[tuple[dict[str, str], bool]]) -> None:
    """Whatever files come and go — read, not read yet, half-written — and whether a walk saw the whole folder: a
    model keeps the key it had while it stays, a key is kept only once the header is read well, no two models
    share a key, and a walk that missed files never costs a key."""
    kept: dict[str, str] = {}
    for files_now, complete in steps:
        files, meta = {}, {}
        for rel, state in files_now.items():
            path, file, m = _state(rel, state)
            files[path] = file
            if m is not None:
                meta[path] = m
        entries, pending = index_mod.models(files, meta, kept)
        assert all(e.key for e in entries) and len({e.key for e in entries}) == len(entries)
        for e in entries:
            assert kept.get(e.rel_path, e.key) == e.key
        view = index_mod.View(entries)
        assert all(view.find(e.key) is e for e in entries)
        before = kept
        kept = index_mod.known_keys(entries, pending, kept, prune=complete)
        assert all(kept.get(e.rel_path) in (None, e.key) for e in entries)
        assert all(rel not in kept for rel, state in files_now.items() if state != "read" and rel not in before)
        if not complete:
            assert all(kept[rel] == key for rel, key in before.items())  # nothing forgotten
        assert len(set(kept.values())) == len(kept)  # a key kept for one model only


def test_a_key_is_kept_only_once_the_header_is_read() -> None:
    """Before its header is read a model's key may still take its quantization from the header: it is not kept."""
    files = {f"/m/{rel}": index_mod.File(rel, 10, "1:10") for rel in ("p/r/m.gguf", "q/r/m.gguf")}
    entries, pending = index_mod.models(files, {})
    assert index_mod.known_keys(entries, pending, {}, prune=True) == {}


def test_keys_survive_a_start_without_the_models_folder(tmp_path: Path) -> None:
    """A drive or a network mount not there yet when the daemon starts (a systemd unit at login): the models'
    keys come back with it, and a file of the same name that arrived meanwhile does not take them."""
    models, cache = tmp_path / "models", tmp_path / "catalog.json"
    small_gguf(models / "local" / "smol" / "Smol.Q8_0.gguf")
    assert keys(Catalog(models, cache)) == ["smol"]
    models.rename(tmp_path / "unmounted")
    assert keys(Catalog(models, cache)) == []
    (tmp_path / "unmounted").rename(models)
    small_gguf(models / "bob" / "smol" / "Smol.Q8_0.gguf")
    assert keys(Catalog(models, cache)) == ["bob/smol/smol", "smol"]
    elsewhere = tmp_path / "other-models"  # another LMS_MODELS_DIR: keys start afresh there
    small_gguf(elsewhere / "local" / "smol" / "Smol.Q8_0.gguf")
    small_gguf(elsewhere / "bob" / "smol" / "Smol.Q8_0.gguf")
    assert keys(Catalog(elsewhere, cache)) == ["bob/smol/smol", "local/smol/smol"]


def test_a_half_written_file_does_not_fix_its_key_too_early(tmp_path: Path) -> None:
    """`cp` into the folder: the first read sees a truncated header. The key waits for a good read, and then takes
    the quantization the header gives."""
    models = tmp_path / "models"
    small_gguf(models / "pub" / "m-gguf" / "M-Q4_K_M.gguf")
    cat = Catalog(models)
    assert keys(cat) == ["m"]
    whole = small_gguf(tmp_path / "M-Q8_0.gguf").read_bytes()
    target = models / "pub" / "m-gguf" / "M-Q8_0.gguf"
    target.write_bytes(whole[:40])
    assert keys(cat) == ["m", "pub/m-gguf/m@q8_0"]  # from the name, while the header cannot be read
    target.write_bytes(whole)
    os.utime(target, ns=(1, 1))  # a new stamp, as the rest of the copy gives it
    assert keys(cat) == ["m", "pub/m-gguf/m@q8_0"]


@pytest.mark.parametrize("indexed", [False, True])
def test_a_name_that_is_not_utf8_is_skipped_not_fatal(tmp_path: Path, started: Callable[..., Catalog],
                                                      indexed: bool) -> None:
    import shutil

    models = tmp_path / "models"
    good = small_gguf(models / "good.gguf")
    shutil.copy(good, os.fsencode(models) + b"/caf\xe9.gguf")
    os.makedirs(os.fsencode(models) + b"/pub\xff/repo")
    shutil.copy(good, os.fsencode(models) + b"/pub\xff/repo/inside.gguf")
    cat = started(models) if indexed else Catalog(models)
    entries = cat.scan()
    assert [e.rel_path for e in entries] == ["good.gguf"]
    for e in entries:
        e.key.encode("utf-8"), e.rel_path.encode("utf-8"), e.path.encode("utf-8")  # what ListModels sends
    with pytest.raises(LookupError):
        cat.resolve(os.fsdecode(b"caf\xe9"))  # a request naming it directly
    assert [e.rel_path for e in cat.scan()] == ["good.gguf"]
