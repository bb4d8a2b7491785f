"""Which Host headers the endpoint answers while bound to loopback (DNS rebinding) — the header logic alone; the
end-to-end refusal is in tests/e2e/test_http.py."""

from __future__ import annotations

import pytest

from lmsd.http.server import _Guard


def guard(*, cors: bool = False, loopback: bool = True) -> _Guard:
    return _Guard(lambda *_: None, lambda: None, 1024, cors=cors, loopback=loopback)  # type: ignore[arg-type]


@pytest.mark.parametrize("host", ["localhost:1234", "LOCALHOST", "127.0.0.1:1234", "127.0.0.2:80", "[::1]:1234",
                                  "[0:0:0:0:0:0:0:1]:9", "127.255.0.1"])
def test_every_spelling_of_this_machines_loopback_is_answered(host: str) -> None:
    assert guard()._foreign({"host": host}) == ""


@pytest.mark.parametrize("host", ["evil.example", "evil.example:1234", "localhost.", "127.0.0.1.", "127.1",
                                  "[::ffff:127.0.0.1]", "0.0.0.0:1234", "localhost.evil.example",
                                  "127.0.0.1.nip.io"])
def test_names_a_rebinding_page_could_send_are_refused(host: str) -> None:
    assert "DNS rebinding" in guard()._foreign({"host": host})
    assert guard(loopback=False)._foreign({"host": host}) == ""  # bound to the network: any name


def test_an_origin_is_refused_unless_cors_allows_web_pages() -> None:
    assert "CORS is off" in guard()._foreign({"host": "localhost", "origin": "null"})
    assert guard(cors=True)._foreign({"host": "localhost", "origin": "https://example.com"}) == ""
