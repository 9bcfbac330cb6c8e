"""Incremental detokenization with stop strings, for streaming text as tokens arrive."""

from __future__ import annotations

from typing import Callable

REPLACEMENT = "\ufffd"  # what a byte-level BPE decodes an incomplete UTF-8 sequence to


class Detokenizer:
    """Turns a growing list of token ids into text deltas; holds back text that may still change.

    Text is held back while it ends in an incomplete UTF-8 character or could be the beginning of
    a stop string, so a client never sees text it would later have to retract.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self.decode = decode
        self.stop = stop
        self.ids: list[int] = []
        self.emitted = 0  # characters of text already returned
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append a token; return the new text that is now final ("" if none)."""
        self.ids.append(token_id)
        text = self.decode(self.ids)
        cut = self._stop_cut(text)
        if cut is not None:
            self.stopped = True
            return self._emit(text[:cut])
        if text.endswith(REPLACEMENT):
            return ""
        return self._emit(text[: len(text) - self._stop_prefix_len(text)])

    def flush(self) -> str:
        """The rest of the text at the end of generation."""
        return "" if self.stopped else self._emit(self.decode(self.ids))

    @property
    def text(self) -> str:
        text = self.decode(self.ids)
        cut = self._stop_cut(text)
        return text if cut is None else text[:cut]

    def _emit(self, final: str) -> str:
        delta = final[self.emitted:]
        self.emitted = max(self.emitted, len(final))
        return delta

    def _stop_cut(self, text: str) -> int | None:
        hits = [i for i in (text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
