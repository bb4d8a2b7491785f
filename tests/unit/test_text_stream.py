"""TextStream: the text of a generation from token bytes, exact however the bytes are split into tokens."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lmsd.worker.text import TextStream

TEXT = st.text(alphabet=st.sampled_from(list("ab \n.é€😀")), max_size=40)


def _expected(data: bytes, stops: list[str]) -> str:
    text = data.decode("utf-8", errors="replace")
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[:min(cuts)] if cuts else text


@given(st.data(), TEXT, st.lists(st.text(alphabet=st.sampled_from(list("ab.é😀")), min_size=1, max_size=4),
                                 max_size=3))
def test_pieces_joined_are_the_text_up_to_the_first_stop_string(data: st.DataObject, text: str,
                                                                 stops: list[str]) -> None:
    raw = text.encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    stream = TextStream(stops)
    out = "".join(stream.feed(c) for c in chunks) + stream.finish()
    assert out == _expected(raw, stops)
    assert stream.stopped == any(s in text for s in stops)


@given(st.lists(st.binary(max_size=4), max_size=20))
def test_bytes_that_are_not_utf8_become_replacement_characters_and_the_stream_goes_on(chunks: list[bytes]) -> None:
    stream = TextStream()
    out = "".join(stream.feed(c) for c in chunks) + stream.finish()
    assert out == b"".join(chunks).decode("utf-8", errors="replace")


def test_a_character_split_across_tokens_is_given_out_whole() -> None:
    stream = TextStream()
    euro = "€".encode()
    assert stream.feed(euro[:1]) == ""
    assert stream.feed(euro[1:2]) == ""
    assert stream.feed(euro[2:] + b"!") == "€!"


def test_only_a_possible_stop_string_is_held_back() -> None:
    stream = TextStream(["###"])
    assert stream.feed(b"ab#") == "ab"  # "#" may begin "###"
    assert stream.feed(b"#x") == "##x"  # "##x" cannot
    assert stream.feed(b"y##") == "y"
    assert stream.feed(b"#tail") == ""
    assert stream.stopped and stream.finish() == ""


def test_held_text_comes_out_when_the_generation_ends_otherwise() -> None:
    stream = TextStream(["stop here"])
    assert stream.feed(b"we stop") == "we "
    assert stream.finish() == "stop"


def test_a_longer_stop_string_that_begins_first_wins_however_the_tokens_split() -> None:
    """Found in review: stops "ab." and "b" on "ab." gave "a" or "" depending on where a token ended."""
    for chunks in ([b"ab", b"."], [b"ab."], [b"a", b"b", b"."]):
        stream = TextStream(["ab.", "b"])
        assert "".join(stream.feed(c) for c in chunks) + stream.finish() == ""
    stream = TextStream(["ab.", "b"])
    assert stream.feed(b"ab") == "" and stream.feed(b"c") == "a"  # "ab." did not come: "b" stops at 1
    assert stream.stopped
