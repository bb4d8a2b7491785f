"""`lms get OWNER/REPO`: GGUF models from Hugging Face, through huggingface_hub.

What to fetch: `OWNER/REPO` lists the repo's GGUF files grouped by quantization and takes one (`--select` asks
on a terminal; otherwise Q4_K_M, else the quantization closest to it); `OWNER/REPO@Q8_0` names the
quantization, `OWNER/REPO/FILE.gguf` the file. A model split in shards (`-00001-of-00003.gguf`) is one choice
and every shard is fetched. Vision projectors (`mmproj-*.gguf`) are not models of their own and are not chosen.

Where it goes: models/OWNER/REPO/FILE.gguf, as LM Studio lays it out. Each file is downloaded with
huggingface_hub's `http_get` (what `hf_hub_download` uses, which in huggingface_hub 2.4 resumes only within one
call) into `models/.lms-downloads/<sha256>.part` — a folder the catalog never reads — locked against a second
`lms get` of the same file, and continued with a Range request by the next run after an interruption. When every
file of the choice (every shard) is down and matches the Hub's LFS sha256, they are renamed into place. A file
already in place with the right checksum is not fetched again. File names from the Hub's listing are checked:
one that would land outside models/OWNER/REPO is ignored.

huggingface_hub's own environment applies: HF_ENDPOINT (another Hub or a mirror), HF_TOKEN (gated and private
repos), HF_HUB_OFFLINE (no network: a clear error).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmscli.client import EXIT_USAGE, CliError
from lmscli.fetch import sha256_of
from lmscli.output import err, stderr
from lmsd.memory import format_bytes

PREFERRED = "Q4_K_M"  # LM Studio's and Ollama's usual default: the best size/quality trade-off
STAGING = ".lms-downloads"  # inside the models folder; the catalog skips dot-folders
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
# Quantization names as llama.cpp's quantize tool and the usual repos spell them, as a word of the file name.
_QUANT = re.compile(r"(?<![A-Za-z0-9])((?:I?Q\d(?:_[A-Z0-9]+)*)|BF16|F16|F32|FP16|FP32|MXFP4(?:_MOE)?|TQ\d_\d)"
                    r"(?![A-Za-z0-9])", re.IGNORECASE)
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


@dataclass(frozen=True)
class HubFile:
    name: str  # path in the repo
    size: int
    sha256: str  # the LFS sha256; "" when the Hub gives none


@dataclass
class Choice:
    """One downloadable model of a repo: a GGUF file, or the shards of one."""

    label: str  # the file name, shards named by their first part's name without the shard suffix
    quant: str  # "" when the name says none
    files: list[HubFile] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class Target:
    repo: str
    filename: str | None = None
    quant: str | None = None


def is_hub_name(name: str) -> bool:
    return "/" in name.strip().strip("/")


def parse_target(text: str) -> Target:
    """OWNER/REPO, OWNER/REPO@QUANT, OWNER/REPO/path/FILE.gguf, or any of them as a huggingface.co URL."""
    name = text.strip()
    for prefix in ("https://huggingface.co/", "http://huggingface.co/", "huggingface.co/", "hf.co/"):
        if name.lower().startswith(prefix):
            name = name[len(prefix):]
            break
    name = name.strip("/")
    quant = None
    if "@" in name:
        name, _, quant = name.rpartition("@")
        if not quant or not _QUANT.fullmatch(quant):
            raise CliError(f"'{text}': after @ comes a quantization such as {PREFERRED} or Q8_0", EXIT_USAGE)
    parts = name.split("/")
    if "blob" in parts[2:3] or "resolve" in parts[2:3]:  # a file's page URL: OWNER/REPO/blob/main/FILE.gguf
        parts = parts[:2] + parts[4:]
    if len(parts) < 2 or not all(_REPO_PART.match(p) for p in parts[:2]) or any(p in ("", ".", "..") for p in parts):
        raise CliError(f"'{text}' is not a Hugging Face repo: give OWNER/REPO, OWNER/REPO@{PREFERRED} or "
                       "OWNER/REPO/FILE.gguf", EXIT_USAGE)
    repo = "/".join(parts[:2])
    filename = "/".join(parts[2:]) or None
    if filename is not None and not filename.lower().endswith(".gguf"):
        raise CliError(f"'{filename}' is not a .gguf file: lms runs GGUF models only", EXIT_USAGE)
    if filename is not None and quant is not None:
        raise CliError("name a file or a quantization (@...), not both", EXIT_USAGE)
    return Target(repo, filename, quant)


def quant_of(filename: str) -> str:
    """The quantization a GGUF file name states (the last one it names), upper-cased; "" when none."""
    stem = _SHARD.sub("", Path(filename).name)
    stem = re.sub(r"\.gguf$", "", stem, flags=re.IGNORECASE)
    found = _QUANT.findall(stem)
    return found[-1].upper() if found else ""


def choices_of(files: list[HubFile]) -> list[Choice]:
    """The repo's models: GGUF files grouped by shards, projectors left out, smallest first."""
    by_label: dict[str, Choice] = {}
    for f in files:
        base = Path(f.name).name
        if not base.lower().endswith(".gguf") or base.lower().startswith("mmproj"):
            continue
        shard = _SHARD.search(f.name)
        label = _SHARD.sub(".gguf", f.name) if shard else f.name
        choice = by_label.setdefault(label, Choice(label=label, quant=quant_of(f.name)))
        choice.files.append(f)
    for choice in by_label.values():
        choice.files.sort(key=lambda f: f.name)
    return sorted(by_label.values(), key=lambda c: (c.size, c.label))


def default_choice(choices: list[Choice]) -> Choice:
    """Q4_K_M; else the quantization closest to it in bits (4-bit first, then 5, 3, 6 ...), K-quants and
    `_M` first among equals; else the smallest file."""
    def rank(c: Choice) -> tuple[float, int, int]:
        q = c.quant
        if q == PREFERRED:
            return (-1.0, 0, c.size)
        bits = re.search(r"\d+", q)
        if not bits:
            return (99.0, 9, c.size)
        b = int(bits.group())
        distance = abs(b - 4) + (0.5 if b < 4 else 0.0)  # 5 bits before 3: quality first
        flavour = 0 if "_K_M" in q else 1 if "_K" in q else 2
        return (distance, flavour, c.size)

    return min(choices, key=rank)


class Hub:
    """The calls into huggingface_hub, with its errors turned into clear ones."""

    def __init__(self) -> None:
        from huggingface_hub import constants

        self.endpoint = constants.ENDPOINT
        self.commit = "main"  # the revision files() found: every file comes from that one commit

    def files(self, repo: str) -> list[HubFile]:
        from huggingface_hub import HfApi

        info = self._call(repo, lambda: HfApi().model_info(repo, files_metadata=True))
        self.commit = str(info.sha or "main")
        out = []
        for s in info.siblings or []:
            lfs = s.lfs
            sha = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", "")) if lfs else ""
            size = s.size if s.size is not None else (lfs.get("size", 0) if isinstance(lfs, dict) else 0) if lfs else 0
            if _safe_name(s.rfilename):
                out.append(HubFile(s.rfilename, int(size or 0), str(sha or "")))
        if not any(f.name.lower().endswith(".gguf") for f in out):
            other = "an MLX model" if any("mlx" in t.lower() for t in (info.tags or [])) else \
                "safetensors weights" if any(f.name.endswith(".safetensors") for f in out) else "no model files"
            raise CliError(f"{repo} has no GGUF files ({other}); lms runs GGUF models only. Look for a GGUF "
                           f"version of it, often a repo named like {repo.split('/')[-1]}-GGUF.")
        return out

    def download(self, repo: str, f: HubFile, out: Any, bar: Any) -> None:
        """Appends the rest of `f` to `out`, an open `.part` file holding what an earlier run got (a Range request
        asks for the rest). The revision is the commit `files()` saw, so every shard comes from one version."""
        from huggingface_hub import errors, hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        url = hf_hub_url(repo, f.name, revision=self.commit)
        for attempt in range(2):
            done = out.seek(0, os.SEEK_END)
            if f.size and done >= f.size:
                return  # a finished part (interrupted while being checked): the checksum decides
            if done:
                err(f"resuming {f.name} at {format_bytes(done)} of {format_bytes(f.size)}")
            try:
                http_get(url, out, resume_size=done, headers=build_hf_headers(), expected_size=f.size or None,
                         displayed_filename=Path(f.name).name, tqdm_class=bar)
                return
            except errors.HfHubHTTPError as exc:
                if exc.response is not None and exc.response.status_code == 416 and done and not attempt:
                    out.seek(0)
                    out.truncate()  # the Hub has less than the part: its file changed; start over once
                    continue
                raise self._clear(exc, repo, f.name) from None
            except OSError as exc:
                if "Consistency check failed" not in str(exc):
                    raise self._clear(exc, repo, f.name) from None
                out.seek(0)
                out.truncate()
                raise CliError(f"the download of {f.name} did not end at the {format_bytes(f.size)} the Hub lists; "
                               "it was deleted. Run `lms get` again.") from None

    def _call(self, repo: str, fn: Any, filename: str | None = None) -> Any:
        try:
            return fn()
        except Exception as exc:
            raise self._clear(exc, repo, filename) from None

    def _clear(self, exc: Exception, repo: str, filename: str | None) -> Exception:
        """The one line a user sees for what huggingface_hub or the network raised; other errors stay as they are."""
        from huggingface_hub import errors

        if isinstance(exc, errors.OfflineModeIsEnabled):
            return CliError(f"HF_HUB_OFFLINE is set, so {repo} cannot be fetched; unset it to download "
                            "(models already downloaded are in `lms ls`)")
        if isinstance(exc, errors.GatedRepoError):
            return CliError(f"{repo} is gated: accept its terms on {self.endpoint}/{repo} and set HF_TOKEN to a "
                            "token of that account")
        if isinstance(exc, errors.RepositoryNotFoundError):
            return CliError(f"no repository {repo} on {self.endpoint} (a private one needs HF_TOKEN)")
        if isinstance(exc, errors.EntryNotFoundError):
            return CliError(f"{repo} has no file {filename}")
        if isinstance(exc, errors.HfHubHTTPError):
            return CliError(f"{self.endpoint} answered: {str(exc).splitlines()[0]}")
        transport = type(exc).__module__.split(".")[0].startswith("httpx") or "Timeout" in type(exc).__name__
        if isinstance(exc, (OSError, ConnectionError)) or transport:
            return CliError(f"cannot reach {self.endpoint}: {_cause(exc)}")
        return exc


def _safe_name(name: str) -> bool:
    """A repo file name that stays inside models/OWNER/REPO: relative, no `..`, no empty or odd segments."""
    parts = name.split("/")
    return (0 < len(name) <= 1000 and "\\" not in name and ":" not in name
            and all(p not in ("", ".", "..") and p.isprintable() and len(p.encode()) <= 255 for p in parts))


def _part(staging: Path, f: HubFile, commit: str) -> Path:
    """Where a file's download goes: named by its checksum, so a part of another version is never continued."""
    key = f.sha256 or hashlib.sha256(f"{commit}/{f.name}".encode()).hexdigest()
    return staging / f"{key}.part"


@contextlib.contextmanager
def _locked_part(path: Path, name: str) -> Iterator[Any]:
    """The part file, open for appending and locked: a second `lms get` of the same file is refused, never
    interleaved."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as out:
        try:
            fcntl.flock(out.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CliError(f"another `lms get` is downloading {name} right now; let it finish") from None
        yield out


def _cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def pick(target: Target, choices: list[Choice], files: list[HubFile], *, select: bool) -> Choice:
    if target.filename is not None:
        named = [c for c in choices if c.label == target.filename or any(f.name == target.filename for f in c.files)]
        if not named:
            known = [f.name for f in files if f.name.lower().endswith(".gguf")]
            raise CliError(f"{target.repo} has no file {target.filename}; its GGUF files: {', '.join(known[:20])}")
        return named[0]
    if not choices:
        raise CliError(f"{target.repo} has only vision projector GGUFs (mmproj), no model")
    if target.quant is not None:
        wanted = target.quant.upper()
        named = [c for c in choices if c.quant == wanted]
        if not named:
            raise CliError(f"{target.repo} has no {wanted} file; it has: "
                           f"{', '.join(sorted({c.quant or c.label for c in choices}))}")
        return min(named, key=lambda c: c.size)
    if select and sys.stdin.isatty() and stderr.is_terminal:
        return _ask(target.repo, choices)
    return default_choice(choices)


def _ask(repo: str, choices: list[Choice]) -> Choice:
    from rich.prompt import IntPrompt
    from rich.table import Table

    table = Table(title=f"GGUF files in {repo}", title_justify="left")
    for col in ("#", "QUANT", "SIZE", "FILE"):
        table.add_column(col, justify="right" if col in ("#", "SIZE") else "left")
    default = default_choice(choices)
    for i, c in enumerate(choices, 1):
        shards = f" ({len(c.files)} parts)" if len(c.files) > 1 else ""
        table.add_row(str(i), c.quant or "?", format_bytes(c.size), c.label + shards)
    stderr.print(table)
    n = IntPrompt.ask("Which one", console=stderr.console, default=choices.index(default) + 1,
                      choices=[str(i) for i in range(1, len(choices) + 1)], show_choices=False)
    return choices[n - 1]


def _free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def plan(models_dir: Path, repo: str, choice: Choice, commit: str) -> dict[str, Any]:
    """What fetching `choice` would do: its files, which are already in place (by size; the checksum is checked
    when fetching), the bytes still to download (an interrupted run's part counts as down), the disk."""
    dest = models_dir / repo
    files = []
    needed = 0
    for f in choice.files:
        final = dest / f.name
        present = final.is_file() and final.stat().st_size == f.size
        if not present:
            part = _part(models_dir / STAGING, f, commit)
            needed += max(0, f.size - (part.stat().st_size if part.is_file() else 0))
        files.append({"name": f.name, "size": f.size, "sha256": f.sha256, "path": str(final), "present": present})
    free = _free_bytes(dest)
    return {"repo": repo, "quantization": choice.quant, "label": choice.label, "files": files,
            "total_bytes": choice.size, "download_bytes": needed, "free_bytes": free,
            "fits": needed == 0 or needed < free}


def fetch(target_text: str, *, select: bool, dry_run: bool, models_dir: Path) -> dict[str, Any]:
    target = parse_target(target_text)
    hub = Hub()
    files = hub.files(target.repo)
    choice = pick(target, choices_of(files), files, select=select)
    result = plan(models_dir, target.repo, choice, hub.commit)
    if dry_run:
        return result
    if not result["fits"]:
        raise CliError(f"{choice.label} needs {format_bytes(result['download_bytes'])} and {models_dir} has "
                       f"{format_bytes(result['free_bytes'])} free; make room first")
    staging = models_dir / STAGING
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with contextlib.ExitStack() as held:
        todo = []
        for entry, f in zip(result["files"], choice.files, strict=True):
            final = Path(entry["path"])
            if entry["present"] and (not f.sha256 or sha256_of(final) == f.sha256):
                checked = "checksum verified" if f.sha256 else "size matches; the Hub lists no checksum"
                err(f"{f.name} is already in {final.parent} ({checked})")
                continue
            part = _part(staging, f, hub.commit)
            todo.append((entry, f, part, held.enter_context(_locked_part(part, f.name)), final))
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      console=stderr.console, transient=True, disable=not stderr.is_terminal) as progress:
            for _entry, f, part, out, _final in todo:
                err(f"Downloading {f.name} ({format_bytes(f.size)}) from {hub.endpoint}/{target.repo}")
                hub.download(target.repo, f, out, _bar(progress, Path(f.name).name))
                out.flush()
                os.fsync(out.fileno())
                got = sha256_of(part)
                if f.sha256 and got != f.sha256:
                    out.truncate(0)
                    raise CliError(f"checksum mismatch for {f.name}: the Hub lists sha256 {f.sha256}, the download "
                                   f"has {got}; it was deleted. Run `lms get` again.")
        for entry, _f, part, _out, final in todo:  # every part is down and checked: all of them go into place
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part, final)
            entry["present"] = True
    with contextlib.suppress(OSError):
        staging.rmdir()  # when empty: nothing else is being downloaded, or waits to be resumed
    return result


def _bar(progress: Any, label: str) -> type:
    """A tqdm-shaped class that huggingface_hub drives, drawing on our Rich progress."""

    class Bar:
        def __init__(self, *, total: int | None = None, initial: int = 0, **_kw: Any) -> None:
            self.task = progress.add_task(label, total=total, completed=initial)

        def update(self, n: int | None = 1) -> None:
            progress.advance(self.task, n or 0)

        def close(self) -> None:
            progress.remove_task(self.task)

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            self.close()

    return Bar

