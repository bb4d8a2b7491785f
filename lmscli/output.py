"""Everything the CLI shows: Rich tables for people, stable JSON for scripts. Data on stdout, messages on stderr.

JSON field names are a documented interface (docs/cli.md): add fields, never rename or remove them.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text


class LazyConsole:
    """A Rich console made on first use. Importing Rich costs about 40 ms, and what runs on every prompt or Tab
    (`lms ps` with nothing loaded, completion) prints no table: a plain message is written as it is."""

    def __init__(self, to_stderr: bool) -> None:
        self._to_stderr = to_stderr

    @functools.cached_property
    def console(self) -> Console:
        from rich.console import Console

        # Off a terminal (pipes, scripts, tests) Rich would assume 80 columns and cut table cells; use room instead.
        file = sys.stderr if self._to_stderr else sys.stdout
        return Console(stderr=self._to_stderr, highlight=False, soft_wrap=True, width=None if file.isatty() else 240)

    @property
    def is_terminal(self) -> bool:
        return self.console.is_terminal if "console" in self.__dict__ else self._file.isatty()

    @property
    def _file(self) -> Any:
        return sys.stderr if self._to_stderr else sys.stdout

    def write(self, text: str, dim: bool = False) -> None:
        """Lines of plain text (no markup, no emoji codes), dimmed on a terminal when asked; through Rich only when
        Rich is already in use here (a progress bar or a live answer on the screen must not be written over)."""
        if "console" in self.__dict__:
            self.console.print(text, markup=False, highlight=False, emoji=False,
                               style="dim" if dim and self.console.is_terminal else None)
            return
        file = self._file
        if dim and file.isatty():
            text = f"\x1b[2m{text}\x1b[0m"
        file.write(text + "\n")
        file.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)


stdout = LazyConsole(to_stderr=False)
stderr = LazyConsole(to_stderr=True)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


_INVISIBLE = frozenset({"Cf", "Zl", "Zp", "Co", "Cs"})  # bidi overrides, zero-width, line separators, private
_JOINERS = frozenset("\u200c\u200d")  # ZWNJ and ZWJ are part of ordinary text (Persian words, emoji families)


def clean(value: object) -> str:
    """Text that came from a file or a client, safe for a terminal: control characters (escape sequences, carriage
    returns, bells) are shown escaped (`\\x1b`), never sent, and so are characters that change how the rest
    reads without showing themselves (bidi overrides such as U+202E, zero-width spaces: `\\u202e`). Pair it
    with markup off, or use `cell`."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))
    if text.isascii():
        return text
    import unicodedata

    return "".join(_escaped(c) if ord(c) > 0x7F and c not in _JOINERS and unicodedata.category(c) in _INVISIBLE
                   else c for c in text)


def _escaped(c: str) -> str:
    return f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"


def cell(value: object) -> Text:
    """A table cell shown as it is: no Rich markup (`[red]` stays `[red]`), control characters escaped."""
    from rich.text import Text

    return Text(clean(value))


def table(**options: Any) -> Table:
    from rich.table import Table

    return Table(pad_edge=False, **options)


def err(message: str) -> None:
    stderr.write(clean(message))


def info(message: str) -> None:
    stderr.write(clean(message), dim=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def format_duration(seconds: float) -> str:
    """`3599` -> `59m 59s`, `3600` -> `1h`, `90` -> `1m 30s`, `5` -> `5s`. Whole seconds, at most two units."""
    s = max(0, int(round(seconds)))
    units = [("d", 86400), ("h", 3600), ("m", 60), ("s", 1)]
    parts = []
    for name, size in units:
        if s >= size:
            parts.append(f"{s // size}{name}")
            s %= size
    return " ".join(parts[:2]) if parts else "0s"


def format_bytes(n: int) -> str:
    """A size for a table cell: "-" when unknown (0), else lmsd.memory's format (powers of 1024)."""
    from lmsd.memory import format_bytes as size

    return size(n) if n > 0 else "-"


def format_params(n: int) -> str:
    if n <= 0:
        return "-"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}".replace(".0", "")
    return str(n)


# ---------------------------------------------------------------- lms ps


def instance_json(i: Any) -> dict[str, Any]:
    return {
        "identifier": i.identifier,
        "model": i.model,
        "status": i.status,
        "origin": i.origin,
        "ttl_seconds": i.ttl_seconds if i.HasField("ttl_seconds") else None,
        "ttl_remaining_seconds": round(i.ttl_remaining_seconds, 1) if i.HasField("ttl_remaining_seconds") else None,
        "context_length": i.context_length,
        "size_bytes": i.size_bytes,
        "memory_bytes": i.memory_bytes,
        "pid": i.pid,
        "in_flight": i.in_flight,
        "queued": i.queued,
        "parallel": i.parallel,
        "estimated_memory_bytes": i.estimated_memory_bytes,
        "last_used_unix": round(i.last_used_unix, 3) if i.last_used_unix else None,
        "message": i.message or None,
    }


def memory_json(m: Any) -> dict[str, Any]:
    return {"used_bytes": m.used_bytes, "budget_bytes": m.budget_bytes if m.HasField("budget_bytes") else None,
            "available_bytes": m.available_bytes, "limit": m.limit}


def memory_line(m: Any) -> str:
    limit = {"auto": "auto: available memory less a safety margin", "off": "no budget"}.get(m.limit, "fixed")
    budget = f"{format_bytes(m.budget_bytes)} budget" if m.HasField("budget_bytes") else "no budget"
    return (f"Memory: {format_bytes(m.used_bytes) if m.used_bytes else '0 B'} used by loaded models of {budget} "
            f"({limit}); the system has {format_bytes(m.available_bytes)} available")


def estimate_json(e: Any) -> dict[str, Any]:
    return {"model": e.model, "context_length": e.context_length, "estimated_memory_bytes": e.estimated_memory_bytes,
            "budget_bytes": e.budget_bytes if e.HasField("budget_bytes") else None,
            "available_bytes": e.available_bytes, "fits": e.fits}


def ttl_cell(i: Any) -> str:
    if not i.HasField("ttl_seconds"):
        return "-"
    total = format_duration(i.ttl_seconds)
    if i.status != "idle":
        return f"{total} (paused while {i.status})"
    return f"{format_duration(i.ttl_remaining_seconds)} / {total}"


def print_instances(instances: list[Any], memory: Any = None) -> None:
    """`lms ps`: a plain aligned table, written without Rich (its import would double what `lms ps` costs over a
    bare Typer + gRPC program; `lms ps` runs at every prompt of some users' shells)."""
    if not instances:
        info("No models are loaded. Load one with `lms load <model>`.")
        if memory is not None:
            info(memory_line(memory))
        return
    rows = []
    for i in instances:
        status = i.status
        if i.in_flight or i.queued:
            status += f" ({i.in_flight} running, {i.queued} queued)"
        rows.append([clean(i.identifier), clean(i.model), clean(status), clean(i.origin), format_bytes(i.size_bytes),
                     format_bytes(i.memory_bytes), str(i.context_length or "-"), str(i.parallel or "-"), ttl_cell(i)])
    stdout.write(aligned(["IDENTIFIER", "MODEL", "STATUS", "ORIGIN", "SIZE", "MEMORY", "CONTEXT", "PARALLEL", "TTL"],
                        rows, bold_header=stdout.is_terminal))
    for i in instances:
        if i.status == "failed":
            err(f"{i.identifier}: load failed: {i.message}")
    if memory is not None:
        info(memory_line(memory))


def aligned(header: list[str], rows: list[list[str]], bold_header: bool = False) -> str:
    """Columns two spaces apart, each as wide as its widest cell (on a terminal: a wide character counts twice), as
    Rich's borderless table draws them. Cells must be `clean`ed."""
    widths = [max(_width(r[n]) for r in [header, *rows]) for n in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c + " " * (w - _width(c)) for c, w in zip(cells, widths, strict=True)).rstrip()

    top = line(header)
    return "\n".join([f"\x1b[1m{top}\x1b[0m" if bold_header else top, *(line(r) for r in rows)])


def _width(text: str) -> int:
    if text.isascii():
        return len(text)
    import unicodedata

    return sum(0 if unicodedata.combining(c) or unicodedata.category(c) == "Cf"
               else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


# ---------------------------------------------------------------- lms ls


def model_json(m: Any) -> dict[str, Any]:
    return {
        "key": m.key,
        "path": m.path,
        "size_bytes": m.size_bytes,
        "arch": m.arch or None,
        "quantization": m.quantization or None,
        "params": m.params or None,
        "max_context_length": m.max_context_length or None,
        "type": m.type,
        "loaded": m.loaded,
        "error": m.error or None,
    }


def print_models(models: list[Any], models_dir: str) -> None:
    if not models:
        info(f"No models in {models_dir}. Fetch one with `lms get smollm2-135m-instruct` or `lms import <file>`.")
        return
    rows = table(box=None, header_style="bold")
    for col in ("MODEL", "PARAMS", "ARCH", "QUANT", "SIZE", "CONTEXT", "TYPE", "LOADED"):
        rows.add_column(col, no_wrap=col != "MODEL")
    for m in models:
        if m.error:
            rows.add_row(cell(m.key), "-", "-", "-", format_bytes(m.size_bytes), "-", "[red]unreadable[/red]", "")
            continue
        rows.add_row(cell(m.key), format_params(m.params), cell(m.arch), cell(m.quantization),
                     format_bytes(m.size_bytes),
                     str(m.max_context_length or "-"), m.type, "✓" if m.loaded else "")
    stdout.print(rows)
    bad = [m for m in models if m.error]
    for m in bad:
        err(f"warning: {m.path} cannot be used: {m.error}")
    info(f"{len(models) - len(bad)} model(s) in {models_dir}")


# ---------------------------------------------------------------- lms server settings


def settings_json(s: Any) -> dict[str, Any]:
    return {
        "jit": s.jit,
        "auto_evict": s.auto_evict,
        "default_ttl": s.default_ttl,
        "port": s.port,
        "bind": s.bind,
        "cors": s.cors,
        "api_key_set": s.api_key_set,
        "memory_limit": int(s.memory_limit) if s.memory_limit.isdigit() else s.memory_limit,
        "max_loaded_models": s.max_loaded_models,
        "load_timeout": s.load_timeout,
        "max_wait": s.max_wait,
        "default_parallel": s.default_parallel,
    }


def print_settings(s: Any) -> None:
    rows = table(box=None, show_header=False)
    rows.add_column("setting", style="bold")
    rows.add_column("value")
    rows.add_column("meaning", style="dim")
    rows.add_row("jit", _on(s.jit), "requests for an unloaded model load it just in time")
    rows.add_row("auto_evict", _on(s.auto_evict), "a JIT load first unloads other JIT-loaded models")
    rows.add_row("default_ttl", f"{format_duration(s.default_ttl)} ({s.default_ttl}s)", "idle TTL of JIT loads")
    rows.add_row("port", str(s.port), "HTTP endpoint port")
    rows.add_row("bind", cell(s.bind), "HTTP endpoint address")
    rows.add_row("cors", _on(s.cors), "answer cross-origin HTTP requests")
    limit = format_bytes(int(s.memory_limit)) if s.memory_limit.isdigit() else s.memory_limit
    rows.add_row("memory_limit", limit, "memory budget of all loaded models (auto: available less a margin)")
    rows.add_row("max_loaded_models", str(s.max_loaded_models or "no limit"), "instances loaded at once")
    rows.add_row("load_timeout", f"{format_duration(s.load_timeout)}", "a load without progress this long is killed")
    rows.add_row("max_wait", f"{format_duration(s.max_wait)}", "how long a request may wait for its model")
    rows.add_row("default_parallel", str(s.default_parallel), "requests one model decodes together")
    rows.add_row("api_key", "set" if s.api_key_set else "not set", "HTTP requests need `Authorization: Bearer "
                 "<key>` (--api-key-set / --api-key-clear)")
    stdout.print(rows)
    if s.warning:
        err(f"warning: {s.warning}")


def _on(flag: bool) -> str:
    return "on" if flag else "off"


# ---------------------------------------------------------------- lms server status


def http_json(h: Any) -> dict[str, Any]:
    return {"running": h.running, "port": h.port, "bind": h.bind, "cors": h.cors, "url": h.url or None,
            "api_key_set": h.api_key_set}


def print_http(h: Any) -> None:
    if h.running:
        stdout.print(f"HTTP endpoint running at {h.url} (cors {_on(h.cors)}, API key "
                     f"{'required' if h.api_key_set else 'not required'})", markup=False)
    else:
        stdout.print(f"HTTP endpoint stopped (would listen on {h.bind}:{h.port}); start it with `lms server start`",
                     markup=False)


# ---------------------------------------------------------------- lms log stream


# Event fields that are numbers (the control plane carries every field as text): JSON gets them as numbers.
_NUMERIC_FIELDS = {"prompt_tokens", "completion_tokens", "tokens_per_second", "duration", "time_to_first_token",
                   "load_seconds", "context_length", "estimated_memory_bytes", "ttl", "inputs", "http_status"}


def event_json(e: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for k, v in e.fields.items():
        if k in _NUMERIC_FIELDS:
            fields[k] = _number(v)
        elif e.kind == "settings":
            try:
                fields[k] = json.loads(v)  # settings events carry JSON values (true, 3600, "auto")
            except ValueError:
                fields[k] = v
        else:
            fields[k] = v
    return {"time": e.time_unix, "kind": e.kind, "identifier": e.identifier or None, "model": e.model or None,
            "reason": e.reason or None, "message": e.message or None, **fields}


def _number(text: str) -> int | float | None:
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return None


def event_line(e: Any) -> str:
    """One line of `lms log stream`, with everything a client or a file put in it made safe for the terminal."""
    return clean(_event_line(e))


def _event_line(e: Any) -> str:
    import datetime

    ts = datetime.datetime.fromtimestamp(e.time_unix).strftime("%H:%M:%S")
    f = dict(e.fields)
    if e.kind == "request":
        tokens = f"{f.get('prompt_tokens', '0')} in / {f.get('completion_tokens', '0')} out"
        speed = f", {f['tokens_per_second']} tok/s" if "tokens_per_second" in f else ""
        return (f"{ts} request  {e.identifier} {f.get('endpoint', '')}: {f.get('status', '')}, {tokens} tokens"
                f"{speed}, {f.get('duration', '?')}s")
    if e.kind == "loaded":
        ttl = f", ttl {f['ttl']}s" if f.get("ttl") else ""
        return f"{ts} loaded   {e.identifier} (origin {f.get('origin', '?')}{ttl}, context {f.get('context_length')})"
    if e.kind == "unloaded":
        why = f": {e.message}" if e.message else ""
        return f"{ts} unloaded {e.identifier} (reason {e.reason}{why})"
    if e.kind == "load_failed":
        return f"{ts} failed   {e.identifier}: {e.message}"
    if e.kind == "crashed":
        return f"{ts} crashed  {e.identifier}: {e.message}"
    return f"{ts} {e.kind} {e.message}".rstrip()
