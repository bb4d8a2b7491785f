"""`lms daemon install-service`: the systemd user unit, checked by systemd's own verifier where it exists, and
lmsd run the way the unit runs it (foreground, its environment) stopping cleanly on SIGTERM."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

from tests.conftest import Home, Lms, wait_until


def test_the_unit_is_written_where_systemd_looks_and_verifies(home: Home, lms: Lms, tmp_path: Path) -> None:
    printed = lms("daemon", "install-service", "--print", check=True).stdout
    assert f"Environment=LMS_HOME={home.root}" in printed and "Restart=on-failure" in printed
    env = {**home.env, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    out = lms("daemon", "install-service", env=env, check=True)
    unit = tmp_path / "config" / "systemd" / "user" / "lmsd.service"
    assert out.stdout.strip() == str(unit) and unit.read_text() == printed
    assert "systemctl --user daemon-reload && systemctl --user enable --now lmsd" in out.stderr
    assert not (home.root / "run" / "lmsd.pid").exists()  # writing the unit starts nothing
    analyze = shutil.which("systemd-analyze")
    if analyze:  # not on every machine (macOS, containers without systemd); where it is, it must be silent
        check = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0 and check.stderr.strip() == "", check.stderr


def test_lmsd_as_the_unit_starts_it_stops_cleanly_on_sigterm(home: Home, lms: Lms) -> None:
    unit = lms("daemon", "install-service", "--print", check=True).stdout
    lines = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    env = dict(home.env)
    for assignment in [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("Environment=")]:
        key, value = shlex.split(assignment)[0].split("=", 1)
        env[key] = value
    proc = subprocess.Popen(shlex.split(lines["ExecStart"]), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: lms("daemon", "status").returncode == 0, timeout=30, what="lmsd to answer")
        proc.send_signal(signal.SIGTERM)  # what `systemctl --user stop lmsd` sends
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (home.root / "run" / "lmsd.pid").exists() and not os.path.exists(home.root / "run" / "lmsd.sock")
