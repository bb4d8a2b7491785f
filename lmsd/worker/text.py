"""The text of one generation as it streams: token bytes in, exact text out.

A token's bytes may end inside a UTF-8 character (the rest comes with the next token), and a stop string may
span several tokens. `TextStream` holds back exactly what it must — an incomplete character, or a tail that
could still become a stop string — and nothing more, so a stream's pieces joined are the text a non-streamed
answer has. Bytes that can never be UTF-8 become U+FFFD, as llama-server does, and the stream goes on.
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

    def feed(self, data: bytes) -> str:
        """The text that can be given out now that `data` has arrived ("" while it is held back)."""
        if self.stopped:
            return ""
        held = self._held + self._utf8.decode(data)
        if not self.stops:
            self._held = ""
            return held
        # The held text is shorter than the longest stop string, so searching all of it costs little.
        cut = min((i for i in (held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return held[:cut]
        keep = self._partial(held)
        self._held = held[len(held) - keep:] if keep else ""
        return held[:len(held) - keep]

    def finish(self) -> str:
        """What is still held when the generation ends for another reason (length, end of text, cancel)."""
        if self.stopped:
            return ""
        rest = self._held + self._utf8.decode(b"", final=True)
        self._held = ""
        if self.stops:
            cut = min((i for i in (rest.find(s) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:  # an incomplete character turned into U+FFFD may complete a stop string
                self.stopped = True
                return rest[:cut]
        return rest

    def _partial(self, text: str) -> int:
        """The length of the longest tail of `text` that is the beginning of a stop string."""
        for n in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
