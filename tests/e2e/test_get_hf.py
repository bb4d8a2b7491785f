"""`lms get OWNER/REPO` end to end: the real `lms` against a local fake Hugging Face Hub (tests/fakehub.py) that
HF_ENDPOINT points at, through the real huggingface_hub."""

from __future__ import annotations

import hashlib
import json
import os
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
    assert result["model"] == "tiny"
    assert dest.read_bytes() == files["Tiny-Q4_K_M.gguf"]

    out = get(lms, env, "someone/Tiny-GGUF@q8_0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(dest.with_name("Tiny-Q8_0.gguf")) and "lms load" in out.stderr
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
    assert not list((home.models / ".lms-downloads").rglob("*.part"))


@pytest.mark.parametrize(("repo", "setup", "message"), [
    ("nobody/Missing-GGUF", None, "no repository nobody/Missing-GGUF"),
    ("someone/Model-MLX", {"model.safetensors": b"\0" * 64, "README.md": b"# MLX"}, "has no GGUF files"),
    ("someone/Gated-GGUF", "gated", "is gated"),
])
def test_a_repo_that_cannot_give_a_gguf_is_a_clear_error(lms: Lms, env: dict[str, str], hub: FakeHub, repo: str,
                                                         setup: object, message: str) -> None:
    if setup == "gated":
        hub.add_repo(repo, {"G-Q4_K_M.gguf": tiny_gguf("g")}, gated=True)
    elif isinstance(setup, dict):
        hub.add_repo(repo, setup)
    out = get(lms, env, repo)
    assert out.returncode == 1, out
    assert message in out.stderr and "Traceback" not in out.stderr


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
    """A part left by an interrupted run of an older version of the file (named by its checksum) is not glued onto
    the new version's bytes."""
    data = tiny_gguf("v2", extra_bytes=3000)
    hub.add_repo("someone/V-GGUF", {"V-Q4_K_M.gguf": data})
    stale = home.models / ".lms-downloads" / "someone" / "V-GGUF" / f"V-Q4_K_M.gguf.{'0' * 16}.part"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old" * 100)
    out = get(lms, env, "someone/V-GGUF")
    assert out.returncode == 0, out.stderr
    assert sha(home.models / "someone" / "V-GGUF" / "V-Q4_K_M.gguf") == hashlib.sha256(data).hexdigest()
    assert os.path.exists(home.models / "someone" / "V-GGUF" / "V-Q4_K_M.gguf")
