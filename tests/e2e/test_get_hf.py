"""`lms get OWNER/REPO` end to end: the real `lms` against a local fake Hugging Face Hub (tests/fakehub.py) that
HF_ENDPOINT points at, through the real huggingface_hub."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Home, Lms, wait_until
from tests.fakehub import FakeHub, tiny_gguf

MiB = 1 << 20


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as h:
        yield h


@pytest.fixture
def env(home: Home, hub: FakeHub) -> dict[str, str]:
    env = {k: v for k, v in home.env.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home.root / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1")
    return env


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def get(lms: Lms, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return lms("get", *args, env=env)


def test_a_repo_gives_its_q4_k_m_and_a_named_quantization_gives_that(lms: Lms, env: dict[str, str], hub: FakeHub,
                                                                    home: Home) -> None:
    files = {f"Tiny-{q}.gguf": tiny_gguf(f"tiny-{q}", extra_bytes=i * 1000)
             for i, q in enumerate(["Q2_K", "Q4_K_M", "Q8_0"])}
    hub.add_repo("someone/Tiny-GGUF", {**files, "mmproj-Tiny-f16.gguf": tiny_gguf("proj"), "README.md": b"# Tiny"})

    out = get(lms, env, "someone/Tiny-GGUF", "--yes", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    dest = home.models / "someone" / "Tiny-GGUF" / "Tiny-Q4_K_M.gguf"
    assert result["quantization"] == "Q4_K_M" and result["files"][0]["path"] == str(dest)
    assert result["model"] == "someone/Tiny-GGUF/Tiny-Q4_K_M"  # the name that loads this file, whatever the keys
    assert dest.read_bytes() == files["Tiny-Q4_K_M.gguf"]

    out = get(lms, env, "someone/Tiny-GGUF@q8_0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(dest.with_name("Tiny-Q8_0.gguf"))
    assert "lms load someone/Tiny-GGUF/Tiny-Q8_0`" in out.stderr
    assert sorted(p.name for p in dest.parent.iterdir()) == ["Tiny-Q4_K_M.gguf", "Tiny-Q8_0.gguf"]
    assert not (home.models / ".lms-downloads").exists()  # nothing left behind

    gets = sum(1 for m, _p, _h in hub.requests if m == "GET" and "/resolve/" in _p)
    again = get(lms, env, "someone/Tiny-GGUF/Tiny-Q8_0.gguf")  # already there: verified, not fetched again
    assert again.returncode == 0 and "already" in again.stderr
    assert sum(1 for m, _p, _h in hub.requests if m == "GET" and "/resolve/" in _p) == gets

    listed = lms.json("ls")  # the daemon's catalog lists what came in
    assert {"someone/Tiny-GGUF/Tiny-Q4_K_M.gguf", "someone/Tiny-GGUF/Tiny-Q8_0.gguf"} <= {m["path"] for m in listed}


def test_a_sharded_model_downloads_every_part_and_dry_run_shows_the_size(lms: Lms, env: dict[str, str],
                                                                        hub: FakeHub, home: Home) -> None:
    parts = {f"Big-Q4_K_M-0000{i}-of-00003.gguf": tiny_gguf(f"big{i}", extra_bytes=5000) for i in (1, 2, 3)}
    hub.add_repo("someone/Big-GGUF", {**parts, "Big-Q8_0.gguf": tiny_gguf("big8")})

    dry = get(lms, env, "someone/Big-GGUF", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert [f["name"] for f in plan["files"]] == sorted(parts)
    assert plan["download_bytes"] == plan["total_bytes"] == sum(len(d) for d in parts.values()) and plan["fits"]
    assert not (home.models / "someone").exists()  # a dry run fetches nothing

    out = get(lms, env, "someone/Big-GGUF", "--json")
    assert out.returncode == 0, out.stderr
    for name, data in parts.items():
        assert (home.models / "someone" / "Big-GGUF" / name).read_bytes() == data


def test_an_interrupted_download_resumes_where_it_stopped(lms: Lms, env: dict[str, str], hub: FakeHub,
                                                          home: Home) -> None:
    data = tiny_gguf("large", extra_bytes=11 * MiB)  # huggingface_hub writes in 10 MiB chunks
    hub.add_repo("someone/Large-GGUF", {"Large-Q4_K_M.gguf": data})
    release = hub.stall_after("someone/Large-GGUF", "Large-Q4_K_M.gguf", 10 * MiB + MiB // 2)
    staging = home.models / ".lms-downloads"
    proc = subprocess.Popen([lms.exe, "get", "someone/Large-GGUF"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        part = wait_until(lambda: next((p for p in staging.rglob("*.part") if p.stat().st_size >= 10 * MiB), None),
                          timeout=60, what="the first 10 MiB on disk")
        second = get(lms, env, "someone/Large-GGUF")  # the same file, while the first run is at it
        assert second.returncode == 1 and "another `lms get` is downloading" in second.stderr, second.stderr
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        _, stderr = proc.communicate(timeout=30)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    assert part.stat().st_size == 10 * MiB
    assert not (home.models / "someone").exists()  # nothing half-written in the models folder

    out = get(lms, env, "someone/Large-GGUF")
    assert out.returncode == 0, out.stderr
    assert "resuming" in out.stderr
    ranges = [h.get("range") for m, p, h in hub.requests if m == "GET" and "/resolve/" in p]
    assert ranges[-1] == f"bytes={10 * MiB}-", ranges
    final = home.models / "someone" / "Large-GGUF" / "Large-Q4_K_M.gguf"
    assert sha(final) == hashlib.sha256(data).hexdigest()
    assert not staging.exists()


def test_a_checksum_mismatch_keeps_nothing(lms: Lms, env: dict[str, str], hub: FakeHub, home: Home) -> None:
    data = tiny_gguf("tiny", extra_bytes=2000)
    hub.add_repo("someone/Bad-GGUF", {"Bad-Q4_K_M.gguf": data})
    hub.serve_wrong_bytes("someone/Bad-GGUF", "Bad-Q4_K_M.gguf", data[:-10] + b"x" * 10)
    out = get(lms, env, "someone/Bad-GGUF")
    assert out.returncode == 1 and "checksum mismatch" in out.stderr and "Traceback" not in out.stderr
    assert not (home.models / "someone").exists()
    assert not [p for p in (home.models / ".lms-downloads").rglob("*.part") if p.stat().st_size]


def test_a_download_that_ends_short_is_a_clear_error_and_the_next_run_starts_afresh(
        lms: Lms, env: dict[str, str], hub: FakeHub, home: Home) -> None:
    data = tiny_gguf("short", extra_bytes=4000)
    hub.add_repo("someone/Short-GGUF", {"Short-Q4_K_M.gguf": data})
    hub.serve_wrong_bytes("someone/Short-GGUF", "Short-Q4_K_M.gguf", data[:-100])
    out = get(lms, env, "someone/Short-GGUF")
    assert out.returncode == 1 and "did not end at the" in out.stderr and "cannot reach" not in out.stderr
    hub.add_repo("someone/Short-GGUF", {"Short-Q4_K_M.gguf": data})  # served right again
    again = get(lms, env, "someone/Short-GGUF")
    assert again.returncode == 0, again.stderr
    assert sha(home.models / "someone" / "Short-GGUF" / "Short-Q4_K_M.gguf") == hashlib.sha256(data).hexdigest()


def test_file_names_in_a_listing_that_would_leave_the_repo_folder_are_ignored(
        lms: Lms, env: dict[str, str], hub: FakeHub, home: Home) -> None:
    hub.add_repo("someone/Evil-GGUF", {"../../../ESCAPED-Q4_K_M.gguf": tiny_gguf("evil"),
                                       f"{home.root}/OUTSIDE-Q4_K_M.gguf": tiny_gguf("evil2"),
                                       "Fine-Q8_0.gguf": tiny_gguf("fine")})
    out = get(lms, env, "someone/Evil-GGUF", "--json")
    assert out.returncode == 0, out.stderr
    assert [f["name"] for f in json.loads(out.stdout)["files"]] == ["Fine-Q8_0.gguf"]
    assert [p.name for p in home.root.rglob("*.gguf")] == ["Fine-Q8_0.gguf"]


@pytest.mark.parametrize(("repo", "setup", "message"), [
    ("nobody/Missing-GGUF", None, "no repository nobody/Missing-GGUF"),
    ("someone/Tiny-GGUF/missing.gguf", {"Tiny-Q4_K_M.gguf": b"x"},
     "someone/Tiny-GGUF has no file missing.gguf; its GGUF files: Tiny-Q4_K_M.gguf"),
    ("someone/Model-MLX", {"model.safetensors": b"\0" * 64, "README.md": b"# MLX"}, "has no GGUF files"),
    ("someone/Gated-GGUF", "gated", "is gated"),
])
def test_a_repo_that_cannot_give_a_gguf_is_a_clear_error(lms: Lms, env: dict[str, str], hub: FakeHub, repo: str,
                                                         setup: object, message: str) -> None:
    if setup == "gated":
        hub.add_repo(repo, {"G-Q4_K_M.gguf": tiny_gguf("g")}, gated=True, token="hf_right")
    elif isinstance(setup, dict):
        hub.add_repo("/".join(repo.split("/")[:2]), setup)
    out = get(lms, env, repo)
    assert out.returncode == 1, out
    assert message in out.stderr and "Traceback" not in out.stderr


def test_hf_token_opens_a_gated_repo(lms: Lms, env: dict[str, str], hub: FakeHub, home: Home) -> None:
    hub.add_repo("someone/Gated-GGUF", {"G-Q4_K_M.gguf": tiny_gguf("g")}, gated=True, token="hf_right")
    out = get(lms, {**env, "HF_TOKEN": "hf_right"}, "someone/Gated-GGUF")
    assert out.returncode == 0, out.stderr
    assert (home.models / "someone" / "Gated-GGUF" / "G-Q4_K_M.gguf").is_file()


def test_no_network_and_offline_mode_are_clear_errors(lms: Lms, env: dict[str, str], hub: FakeHub) -> None:
    hub.add_repo("someone/Tiny-GGUF", {"Tiny-Q4_K_M.gguf": tiny_gguf("t")})
    offline = get(lms, {**env, "HF_HUB_OFFLINE": "1"}, "someone/Tiny-GGUF")
    assert offline.returncode == 1 and "HF_HUB_OFFLINE" in offline.stderr and "Traceback" not in offline.stderr
    url = hub.url
    hub.stop()  # nothing listens there any more
    out = get(lms, env, "someone/Tiny-GGUF")
    assert out.returncode == 1 and f"cannot reach {url}" in out.stderr and "Traceback" not in out.stderr


def test_the_interrupted_part_of_another_version_is_not_continued(lms: Lms, env: dict[str, str], hub: FakeHub,
                                                                  home: Home) -> None:
    """A run of version 1 is interrupted; the repo moves to version 2; the next run must not glue version 2's
    remaining bytes onto version 1's start (parts are named by the content's checksum)."""
    v1 = tiny_gguf("version-1", extra_bytes=11 * MiB)
    hub.add_repo("someone/V-GGUF", {"V-Q4_K_M.gguf": v1})
    release = hub.stall_after("someone/V-GGUF", "V-Q4_K_M.gguf", 10 * MiB + MiB // 2)
    proc = subprocess.Popen([lms.exe, "get", "someone/V-GGUF"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: any(p.stat().st_size >= 10 * MiB for p in (home.models / ".lms-downloads").rglob("*.part")),
                   timeout=60, what="the first 10 MiB of version 1 on disk")
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
    v2 = tiny_gguf("version-2", extra_bytes=11 * MiB)
    hub.add_repo("someone/V-GGUF", {"V-Q4_K_M.gguf": v2})
    before = len(hub.requests)
    out = get(lms, env, "someone/V-GGUF")
    assert out.returncode == 0, out.stderr
    assert all("range" not in h for m, p, h in hub.requests[before:] if m == "GET" and "/resolve/" in p)
    assert sha(home.models / "someone" / "V-GGUF" / "V-Q4_K_M.gguf") == hashlib.sha256(v2).hexdigest()


def test_select_asks_on_a_terminal_with_the_default_preselected(lms: Lms, env: dict[str, str], hub: FakeHub,
                                                                home: Home) -> None:
    from tests.e2e.test_chat import Terminal

    files = {f"Tiny-{q}.gguf": tiny_gguf(f"tiny-{q}", extra_bytes=i * 1000)
             for i, q in enumerate(["Q2_K", "Q4_K_M", "Q8_0"])}
    hub.add_repo("someone/Tiny-GGUF", files)
    term = Terminal([lms.exe, "get", "someone/Tiny-GGUF", "--select"], env)
    try:
        shown = term.read_until("Which one")
        assert all(q in shown for q in ("Q2_K", "Q4_K_M", "Q8_0")) and "(2)" in shown  # Q4_K_M pre-selected
        term.send("3\r")  # the list is smallest first: Q8_0
        assert term.proc.wait(60) == 0, term.seen[-2000:]
    finally:
        term.close()
    assert [p.name for p in (home.models / "someone" / "Tiny-GGUF").iterdir()] == ["Tiny-Q8_0.gguf"]
