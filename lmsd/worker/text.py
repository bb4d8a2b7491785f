"""The text of one generation as it streams: token bytes in, exact text out.

A token's bytes may end inside a UTF-8 character (the rest comes with the next token), and a stop string may
span several tokens. `TextStream` holds back exactly what it must — an incomplete character, or a tail that
could still become a stop string — and nothing more, so however the bytes are split into tokens, the pieces
joined are the text up to the first stop string (the one that begins first; of two, `["ab.", "b"]` on "ab.",
"ab." wins). Bytes that can never be UTF-8 become U+FFFD, as llama-server does, and the stream goes on.
"""

from __future__ import annotations

import codecs


class TextStream:
    def __init__(self, stops: list[str] | None = None) -> None:
        self.stops = [s for s in (stops or []) if s]
        self._longest = max((len(s) for s in self.stops), default=0)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded text not yet given out: it may be the start of a stop string
        self.stopped = False  # a stop string was found; everything after it is dropped
        self.hit = ""  # ... which one

    def feed(self, data: bytes) -> str:
        """The text that can be given out now that `data` has arrived ("" while it is held back)."""
        if self.stopped:
            return ""
        held = self._held + self._utf8.decode(data)
        if not self.stops:
            self._held = ""
            return held
        # The held text is shorter than the longest stop string, so searching all of it costs little.
        cut = _first_stop(held, self.stops)
        # A stop string that begins before `cut` but is not complete yet may still turn out to be the first one.
        start = self._partial(held)
        if 0 <= cut <= start:
            self._stop_at(held, cut)
            self._held = ""
            return held[:cut]
        self._held = held[start:]
        return held[:start]

    def finish(self) -> str:
        """What is still held when the generation ends for another reason (length, end of text, cancel)."""
        if self.stopped:
            return ""
        rest = self._held + self._utf8.decode(b"", final=True)
        self._held = ""
        cut = _first_stop(rest, self.stops)
        if cut >= 0:  # held back for a longer stop string that never came, or completed by a U+FFFD
            self._stop_at(rest, cut)
            return rest[:cut]
        return rest

    def _stop_at(self, text: str, cut: int) -> None:
        self.stopped = True
        self.hit = next(s for s in self.stops if text.find(s) == cut)

    def _partial(self, text: str) -> int:
        """Where the longest tail of `text` that begins a stop string (without completing it) starts; len(text)
        when there is none."""
        for i in range(max(0, len(text) - self._longest + 1), len(text)):
            tail = text[i:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self.stops):
                return i
        return len(text)


def _first_stop(text: str, stops: list[str]) -> int:
    """Where the first stop string in `text` begins, or -1."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
