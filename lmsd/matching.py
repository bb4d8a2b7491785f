"""Matching a user's model name against catalog keys. Pure functions: the CLI imports this too."""

from __future__ import annotations

import difflib


def rank_matches(query: str, keys: list[str]) -> list[str]:
    """Keys that `query` may mean, best first: exact, then prefix, then substring, then fuzzy.

    Case-insensitive. An exact match is returned alone. Prefix and substring matches keep catalog order
    among themselves but shorter keys first (the more specific the query, the better the fit).
    """
    q = query.strip().lower()
    if not q:
        return []
    lowered = {k.lower(): k for k in keys}
    if q in lowered:
        return [lowered[q]]
    # A key may carry a publisher/repo path; let the last part match too ("smollm2" ~ "pub/repo/smollm2").
    def tail(k: str) -> str:
        return k.rsplit("/", 1)[-1]

    prefix = [k for k in keys if k.lower().startswith(q) or tail(k.lower()).startswith(q)]
    substring = [k for k in keys if k not in prefix and q in k.lower()]
    ranked = sorted(prefix, key=len) + sorted(substring, key=len)
    if ranked:
        return ranked
    # Typos: compare with each key's start (and its last path part) as much as with the whole key.
    # The cheap upper bounds come first: a long query (up to 512 characters reach here) is rarely near any key,
    # and ratio() is quadratic where the bounds are linear.
    scored = []
    matcher = difflib.SequenceMatcher(None)
    matcher.set_seq2(q)  # indexed once, compared with every candidate
    for low, key in lowered.items():
        score = 0.0
        for candidate in (low, low[: len(q)], tail(low)[: len(q)]):
            matcher.set_seq1(candidate)
            if matcher.real_quick_ratio() >= 0.75 and matcher.quick_ratio() >= 0.75:
                score = max(score, matcher.ratio())
        if score >= 0.75:
            scored.append((-score, len(key), key))
    return [key for _s, _n, key in sorted(scored)[:5]]


def is_unique_match(query: str, keys: list[str]) -> bool:
    """True when the query names exactly one key by exact match or unique prefix (safe without asking)."""
    q = query.strip().lower()
    lowered = [k.lower() for k in keys]
    if q in lowered:
        return True
    prefix = [k for k in lowered if k.startswith(q) or k.rsplit("/", 1)[-1].startswith(q)]
    return len(prefix) == 1
