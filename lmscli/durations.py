"""Parsing TTLs the way people type them: `3600`, `90s`, `5m`, `1h`, `1h30m`, `2d`."""

from __future__ import annotations

import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"(\d+)([smhd])")
MAX_TTL = 365 * 86400  # a year: beyond this a TTL is a typo, not a plan

HELP = "whole seconds (3600) or a duration such as 90s, 5m, 1h, 1h30m; at least 1s"


def parse_ttl(text: str) -> int:
    """Seconds in `text`. Raises ValueError with a message that says what is allowed."""
    t = text.strip().lower()
    if re.fullmatch(r"\d+", t):
        seconds = int(t)
    elif t and re.fullmatch(r"(?:\d+[smhd])+", t):
        seconds = sum(int(n) * _UNITS[u] for n, u in _PART.findall(t))
    else:
        raise ValueError(f"'{text}' is not a TTL: use {HELP}")
    if seconds < 1:
        raise ValueError(f"'{text}' is not a TTL: it must be at least 1 second ({HELP})")
    if seconds > MAX_TTL:
        raise ValueError(f"'{text}' is not a TTL: at most 365 days")
    return seconds


def ttl_callback(value: str | None) -> int | None:
    """Typer callback for --ttl options: a bad TTL is a usage error (exit 2) naming what is allowed."""
    if value is None:
        return None
    try:
        return parse_ttl(value)
    except ValueError as exc:
        import typer

        raise typer.BadParameter(str(exc)) from None
