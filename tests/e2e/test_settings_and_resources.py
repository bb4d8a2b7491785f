"""End to end: persisted settings, the daemon's memory over many loads, import, and the CLI's start-up cost."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import TINY_KEY, TINY_NAME, Home, Lms, wait_until


def test_settings_change_at_once_and_survive_restart(home: Home, lms: Lms) -> None:
    before = lms.json("server", "settings")
    assert before == {"jit": True, "auto_evict": True, "default_ttl": 3600, "port": 1234, "bind": "127.0.0.1",
                      "cors": False, "api_key_set": False, "memory_limit": "auto", "max_loaded_models": 0,
                      "load_timeout": 300, "max_wait": 300, "default_parallel": 4}
    out = lms("server", "settings", "--no-jit", "--default-ttl", "10m", check=True)
    assert "settings saved" in out.stderr
    assert re.search(r"jit\s+off", out.stdout) and "10m (600s)" in out.stdout
    out = lms("server", "settings", "--memory-limit", "6GB", "--max-loaded", "3", "--load-timeout", "2m",
              "--max-wait", "90s", "--default-parallel", "2", check=True)
    assert re.search(r"memory_limit\s+6\.0 GB", out.stdout) and re.search(r"max_loaded_models\s+3", out.stdout)
    assert re.search(r"default_parallel\s+2", out.stdout)
    for bad in (["--memory-limit", "lots"], ["--memory-limit", "0"], ["--max-loaded", "-1"], ["--max-wait", "0"],
                ["--default-parallel", "0"], ["--default-parallel", "65"]):
        out = lms("server", "settings", *bad)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    lms("daemon", "down", check=True)
    lms("daemon", "up", check=True)
    after = lms.json("server", "settings")
    assert (after["jit"], after["default_ttl"], after["auto_evict"]) == (False, 600, True)
    assert (after["memory_limit"], after["max_loaded_models"], after["load_timeout"], after["max_wait"],
            after["default_parallel"]) == (6 * 1024**3, 3, 120, 90, 2)
    saved = json.loads((home.root / "settings.json").read_text())
    assert saved["jit"] is False and saved["default_ttl"] == 600
    lms("server", "settings", "--jit", "--no-auto-evict", check=True)
    assert lms.json("server", "settings")["auto_evict"] is False


def test_bad_settings_values_are_refused(home: Home, lms: Lms) -> None:
    for bad in ("0", "-1", "soon"):
        out = lms("server", "settings", "--default-ttl", bad)
        assert out.returncode == 2 and "is not a TTL" in out.stderr


def test_corrupt_settings_file_is_kept_and_defaults_are_used(home: Home, lms: Lms) -> None:
    bad = '{"jit": false, "default_ttl": "soon"'
    (home.root / "settings.json").write_text(bad)
    shown = lms("server", "settings", check=True)
    assert "warning:" in shown.stderr and "running with default settings" in shown.stderr
    assert lms.json("server", "settings")["jit"] is True  # defaults in force
    assert (home.root / "settings.json").read_text() == bad  # not overwritten by starting up
    assert "not valid settings" in (home.root / "logs" / "lmsd.log").read_text()
    # The first change keeps the bad file aside and says where.
    out = lms("server", "settings", "--no-jit", check=True)
    assert "settings.json.bad" in out.stderr
    assert (home.root / "settings.json.bad").read_text() == bad
    assert "warning" not in lms("server", "settings", check=True).stderr  # said once, not on every call after
    assert json.loads((home.root / "settings.json").read_text())["jit"] is False


def test_import_copies_links_and_refuses_non_gguf(home: Home, lms: Lms, tiny_file: Path, tmp_path: Path) -> None:
    out = lms("import", str(tiny_file), "--user-repo", "me/tiny", check=True)
    dest = home.models / "me" / "tiny" / TINY_NAME
    assert Path(out.stdout.strip()) == dest and dest.is_file() and not dest.is_symlink()
    assert dest.read_bytes() == tiny_file.read_bytes()
    wait_until(lambda: [m["key"] for m in lms.json("ls")] == [TINY_KEY], what="the import listed under its short key")
    # A second file of the same name: the first model keeps the key scripts already use; the newcomer is qualified.
    linked = lms("import", str(tiny_file), "--mode", "link", check=True)
    assert Path(linked.stdout.strip()).is_symlink()
    again = lms("import", str(tiny_file), "--user-repo", "me/tiny")
    assert again.returncode == 1 and "already exists" in again.stderr
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"hello")
    bad = lms("import", str(junk))
    assert bad.returncode == 1 and "not a usable GGUF file" in bad.stderr
    assert not list(home.models.rglob("junk*"))
    listed = {m["key"]: m["path"] for m in lms.json("ls")}
    assert listed == {TINY_KEY: f"me/tiny/{TINY_NAME}", f"local/{TINY_KEY}/{TINY_KEY}": f"local/{TINY_KEY}/{TINY_NAME}"}


def test_get_unknown_source_is_a_usage_error(home: Home, lms: Lms) -> None:
    out = lms("get", "gpt-17")
    assert out.returncode == 2 and "smollm2-135m-instruct" in out.stderr and "lms import" in out.stderr


def test_lms_ps_and_completion_import_nothing_heavy(home: Home, lms: Lms, tiny_file: Path) -> None:
    """`lms ps` and a Tab run at every prompt: no llama_cpp, FastAPI or numpy, and neither pydantic (Typer's
    coercion of parameters not given) nor Rich (the table is plain text) — each would add a large part of a bare
    Typer + gRPC program's start-up (bench/bench_cli.py measures it)."""
    lms("import", str(tiny_file), check=True)
    lms("load", TINY_KEY, "--ttl", "5m", check=True)

    def run(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
        code = (
            "import sys\n"
            f"sys.argv = {['lms', *argv]!r}\n"
            "from lmscli.main import main\n"
            "try:\n"
            "    main()\n"
            "except SystemExit:\n"
            "    pass\n"
            "heavy = {m.split('.')[0] for m in sys.modules}\n"
            "heavy &= {'llama_cpp', 'fastapi', 'uvicorn', 'numpy', 'gguf', 'pydantic', 'rich'}\n"
            "print('HEAVY=' + ','.join(sorted(heavy)), file=sys.stderr)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], env={**home.env, **env}, capture_output=True, text=True,
                             timeout=60)
        assert "HEAVY=\n" in out.stderr, out.stderr
        return out

    assert [i["identifier"] for i in json.loads(run("ps", "--json").stdout)] == [TINY_KEY]
    header, row = run("ps").stdout.splitlines()
    assert header.split() == ["IDENTIFIER", "MODEL", "STATUS", "ORIGIN", "SIZE", "MEMORY", "CONTEXT", "PARALLEL", "TTL"]
    assert row.split()[:4] == [TINY_KEY, TINY_KEY, "idle", "manual"] and row.endswith("/ 5m")
    assert row.index("manual") == header.index("ORIGIN")  # aligned under its heading
    tab = run(_LMS_COMPLETE="complete_bash", COMP_WORDS="lms unload ", COMP_CWORD="2")
    assert tab.stdout.split() == [TINY_KEY]


def test_models_dir_can_live_elsewhere(home: Home, lms: Lms, tiny_file: Path, tmp_path: Path) -> None:
    """LMS_MODELS_DIR points lms at an existing folder (an LM Studio models folder, say) instead of LMS_HOME's."""
    elsewhere = tmp_path / "lmstudio-models"
    (elsewhere / "someone" / "tiny").mkdir(parents=True)
    os.symlink(tiny_file, elsewhere / "someone" / "tiny" / TINY_NAME)
    env = {**home.env, "LMS_MODELS_DIR": str(elsewhere)}
    out = lms("ls", "--json", env=env, check=True)
    assert [(m["key"], m["path"]) for m in json.loads(out.stdout)] == [(TINY_KEY, f"someone/tiny/{TINY_NAME}")]
    assert lms("load", TINY_KEY, env=env, check=True).stdout.strip() == TINY_KEY
    assert not (home.root / "models").exists() or not any((home.root / "models").iterdir())


def test_a_bad_environment_number_is_a_warning_not_a_crash(home: Home, lms: Lms) -> None:
    env = {**home.env, "LMS_MAX_QUEUE": "abc"}
    lms("daemon", "up", check=True, env=env)
    assert lms("daemon", "status", check=True).returncode == 0
    assert "LMS_MAX_QUEUE='abc' is not a whole number" in (home.root / "logs" / "lmsd.log").read_text()


def test_import_goes_where_the_running_daemon_looks_whatever_this_shell_says(home: Home, lms: Lms,
                                                                            tiny_file: Path, tmp_path: Path) -> None:
    """LMS_MODELS_DIR is read by the daemon when it starts: an `lms import` from a shell with another value used
    to land in a folder the daemon never scans."""
    theirs = tmp_path / "daemons-models"
    theirs.mkdir()
    lms("daemon", "up", env={**home.env, "LMS_MODELS_DIR": str(theirs)}, check=True)
    out = lms("import", str(tiny_file), "--user-repo", "me/tiny", check=True)  # this shell: the default folder
    assert Path(out.stdout.strip()) == theirs / "me" / "tiny" / TINY_NAME
    assert f"the running lmsd uses the models folder {theirs}" in out.stderr
    assert [m["path"] for m in lms.json("ls")] == [f"me/tiny/{TINY_NAME}"]
    assert not (home.models / "me").exists()
