"""Settings persistence and the CLI's pure helpers (TTL parsing, formatting, matching)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from lmscli.durations import parse_ttl
from lmscli.output import format_bytes, format_duration
from lmsd.config import Paths, Settings, SettingsStore
from lmsd.matching import rank_matches


def test_paths_follow_lms_home_and_models_dir(tmp_path: Path) -> None:
    p = Paths.from_env({"LMS_HOME": str(tmp_path)})
    assert (p.models, p.settings, p.socket, p.pid_file, p.log_file) == (
        tmp_path / "models", tmp_path / "settings.json", tmp_path / "run" / "lmsd.sock",
        tmp_path / "run" / "lmsd.pid", tmp_path / "logs" / "lmsd.log")
    other = Paths.from_env({"LMS_HOME": str(tmp_path), "LMS_MODELS_DIR": str(tmp_path / "lmstudio")})
    assert other.models == tmp_path / "lmstudio"


def test_settings_round_trip_atomically(tmp_path: Path) -> None:
    store = SettingsStore(tmp_path / "settings.json")
    assert store.settings == Settings() and store.warning == ""
    store.update(jit=False, default_ttl=60)
    assert SettingsStore(tmp_path / "settings.json").settings.default_ttl == 60
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".settings.")]  # no temp files left


@pytest.mark.parametrize("bad", [{"default_ttl": 0}, {"default_ttl": -1}, {"default_ttl": 1.5},
                                 {"port": 0}, {"port": 70000}, {"jit": "yes"}, {"bind": ""}])
def test_invalid_settings_are_refused_and_nothing_changes(tmp_path: Path, bad: dict) -> None:
    store = SettingsStore(tmp_path / "settings.json")
    with pytest.raises(ValueError):
        store.update(**bad)
    assert store.settings == Settings() and not (tmp_path / "settings.json").exists()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"default_ttl": "soon"}', '{"jit": 3}'])
def test_corrupt_settings_file_falls_back_without_overwriting(tmp_path: Path, content: str) -> None:
    path = tmp_path / "settings.json"
    path.write_text(content)
    store = SettingsStore(path)
    assert store.settings == Settings() and "default settings" in store.warning
    assert path.read_text() == content


def test_unknown_settings_keys_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "settings.json").write_text(json.dumps({"jit": False, "from_the_future": 1}))
    assert SettingsStore(tmp_path / "settings.json").settings.jit is False


def test_full_disk_leaves_settings_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SettingsStore(tmp_path / "settings.json")
    store.update(default_ttl=100)

    def no_space(*_a: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left"):
        store.update(default_ttl=200)
    assert store.settings.default_ttl == 100
    assert json.loads((tmp_path / "settings.json").read_text())["default_ttl"] == 100
    assert [p.name for p in tmp_path.iterdir()] == ["settings.json"]


@pytest.mark.parametrize(("text", "seconds"), [("3600", 3600), ("90s", 90), ("5m", 300), ("1h", 3600),
                                                ("1h30m", 5400), ("2d", 172800), (" 10M ", 600), ("1", 1)])
def test_parse_ttl_accepts(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["0", "-5", "abc", "1.5.2", "1.5", "", "0s", "5 m", "h", "999d", "1e3"])
def test_parse_ttl_rejects_with_what_is_allowed(text: str) -> None:
    with pytest.raises(ValueError, match="is not a TTL"):
        parse_ttl(text)


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (5, "5s"), (90, "1m 30s"), (3598.6, "59m 59s"),
                                                (3600, "1h"), (5400, "1h 30m"), (90061, "1d 1h")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_format_bytes() -> None:
    assert (format_bytes(0), format_bytes(98362432), format_bytes(512)) == ("-", "93.8 MB", "512 B")


def test_rank_matches() -> None:
    keys = ["qwen2.5-7b-instruct", "qwen2.5-0.5b-instruct", "smollm2-135m-instruct", "pub/repo/llama-3"]
    assert rank_matches("SMOLLM2-135M-INSTRUCT", keys) == ["smollm2-135m-instruct"]
    assert rank_matches("qwen", keys) == ["qwen2.5-7b-instruct", "qwen2.5-0.5b-instruct"]
    assert rank_matches("llama", keys) == ["pub/repo/llama-3"]
    assert rank_matches("instruct", keys)[0] == "qwen2.5-7b-instruct"
    assert rank_matches("smolm2", keys) == ["smollm2-135m-instruct"]  # a typo still finds it
    assert rank_matches("zzz", keys) == []
    assert rank_matches("pub/repo/lama-3", keys) == ["pub/repo/llama-3"]  # a typo in a long key
    assert rank_matches("qwen2.5-7b-instruct" * 26, keys) == []  # 494 characters: near nothing, refused quickly


def test_fetch_with_a_wrong_checksum_writes_nothing(tmp_path: Path) -> None:
    import io

    from lmscli.client import CliError
    from lmscli.fetch import write_atomically as fetch_write

    target = tmp_path / "models" / "pub" / "repo" / "m.gguf"
    with pytest.raises(CliError, match="checksum mismatch"):
        fetch_write(io.BytesIO(b"GGUF" * 1000), target, 4000, expect_sha256="0" * 64, label="m.gguf")
    assert not target.exists() and list(target.parent.iterdir()) == []
    fetch_write(io.BytesIO(b"GGUF"), target, 4, expect_sha256=None, label="m.gguf")
    assert target.read_bytes() == b"GGUF" and [p.name for p in target.parent.iterdir()] == ["m.gguf"]


def test_worker_log_rotates_and_stays_bounded(tmp_path: Path) -> None:
    from lmsd.worker.handle import rotate

    log = tmp_path / "workers.log"
    for n in range(6):
        log.write_bytes(bytes([65 + n]) * 100)
        rotate(log, max_bytes=50, keep=3)
    assert not log.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["workers.log.1", "workers.log.2", "workers.log.3"]
    assert (tmp_path / "workers.log.1").read_bytes()[:1] == b"F"  # the newest
    log.write_bytes(b"small")
    rotate(log, max_bytes=50, keep=3)
    assert log.read_bytes() == b"small"  # under the limit: left alone


def test_text_from_files_and_clients_cannot_hide_or_reorder_itself_in_a_terminal() -> None:
    from lmscli.output import clean

    # U+202E (right-to-left override) would show `safe...exe.fdp` for a key that reads otherwise; zero-width
    # characters make two different keys look the same.
    assert clean("safe\u202egguf.exe\u2066\u200b-x") == "safe\\u202egguf.exe\\u2066\\u200b-x"
    assert clean("\x1b]8;;http://evil\x07link\r") == "\\x1b]8;;http://evil\\x07link\\x0d"
    assert clean("café 日本語 🙂 [red]x[/red]") == "café 日本語 🙂 [red]x[/red]"  # ordinary text stays as it is
    assert clean("👨\u200d👩\u200d👧 می\u200cخواهم 🫨") == "👨\u200d👩\u200d👧 می\u200cخواهم 🫨"  # joiners, new emoji
    assert clean("x\U000e0041y") == "x\\U000e0041y"  # an invisible tag character beyond U+FFFF
