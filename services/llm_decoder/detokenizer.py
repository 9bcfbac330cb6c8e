"""Incremental detokenization with stop strings: O(1) work per token, whatever the answer's length.

tokenizers' `DecodeStream` turns each new id into the text it completes (None while a UTF-8
character is still partial); `StopStrings` holds back only the tail that could still begin a stop
string, so a client never sees text it would later have to retract.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class StopStrings:
    """Text pieces in, final text out; cut before the first occurrence of any stop string."""

    def __init__(self, stop: tuple[str, ...] = ()):
        self.stop = stop
        self.held = ""  # the longest emitted-text tail that is a proper prefix of a stop string
        self.stopped = False

    def add(self, piece: str) -> str:
        """The part of `held + piece` that is now final ("" if none)."""
        if self.stopped:
            return ""
        text = self.held + piece  # any stop occurrence starts inside it (see `_prefix_tail`)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[:min(hits)]
        keep = self._prefix_tail(text)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out

    def _prefix_tail(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


class Detokenizer:
    """Token ids -> text deltas for one sequence."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)
        self.unfinished: list[int] = []  # ids the stream has not turned into text yet
        self.stops = StopStrings(stop)

    @property
    def stopped(self) -> bool:
        return self.stops.stopped

    def add(self, token_id: int) -> str:
        """Append a token; return the new text that is now final ("" if none)."""
        piece = self.stream.step(self.tokenizer, token_id)
        if piece is None:
            self.unfinished.append(token_id)
            return ""
        self.unfinished.clear()
        return self.stops.add(piece)

    def flush(self) -> str:
        """The rest of the text at the end of generation (bytes of a character left incomplete
        decode to U+FFFD, as a full decode would)."""
        rest = self.tokenizer.decode(self.unfinished, skip_special_tokens=True) if self.unfinished else ""
        self.unfinished.clear()
        return self.stops.add(rest) + self.stops.flush()
