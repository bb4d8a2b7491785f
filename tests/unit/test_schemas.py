"""Which regex `pattern`s a JSON schema may carry: the subset llama-cpp-python turns into a grammar safely."""

from __future__ import annotations

import re

import pytest

from lmsd.http.schemas import check_pattern


@pytest.mark.parametrize("pattern", [
    r"^\d{4}-\d{2}-\d{2}$", "^[a-z]{1,32}@[a-z]{1,32}$", r"^a\{5000\}$", "^(ab){16}(c{8})$", "^(cat|dog)+$",
    r"^[^\]]*$", "^a.b?c*$", "^[a-f0-9]{8}-[a-f0-9]{4}$", "^a{0,500}$", "^$", r"^\$$",
])
def test_ordinary_patterns_are_accepted(pattern: str) -> None:
    check_pattern(pattern)


@pytest.mark.parametrize("pattern, why", [
    ("^a{0,5000}$", "more than 1024 copies"),  # llama.cpp's grammar parser overflowed its stack: SIGSEGV
    ("^(a{0,256}){0,256}$", "repeats itself"),  # one sampling step took minutes
    ("^((a{0,10}){0,10}){0,10}$", "repeats itself"),
    ("^(a*)*$", "repeats itself"),
    ("^]$", "escape it"),  # the converter looped forever on a stray ] or }
    ("^a{2}}$", "escape it"),
    ("^[]a{0,5000}]$", "empty []"),
    ("^a{0,+5000}$", "plain digits"),  # int() reads what the converter does not
    ("^a{0,5_000}$", "plain digits"),
    ("^(|a)*$", "empty alternative"),  # llama.cpp refused the grammar and the sampler crashed
    ("^(?:a)$", "(?...)"),
    ("^[abc$", "unclosed ["),
    ("^(a$", "unclosed ("),
    ("a", "start with ^"),
    ("^a" + "b" * 1000 + "$", "longer than 1000"),
])
def test_patterns_that_hang_crash_or_explode_are_refused(pattern: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        check_pattern(pattern)


def test_zero_values_reach_the_worker_as_sent() -> None:
    """temperature 0 (greedy), top_k 0 and penalties of 0 are settings, not absent fields (0 == False in Python:
    they were dropped, and temperature 0 sampled at the default 0.2)."""
    from lmsd.http.schemas import ChatRequest

    body = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], temperature=0, top_k=0,
                       presence_penalty=0.0, seed=0)
    params = body.sampling_params()
    assert params["temperature"] == 0 and params["top_k"] == 0 and params["presence_penalty"] == 0 \
        and params["seed"] == 0
    assert "ignore_eos" not in params and "top_p" not in params
