"""Incremental detokenisation for streaming: text that is safe to print as tokens arrive.

A token can end in the middle of a UTF-8 character (byte-fallback pieces) or, with some tokenizers,
change how the text before it decodes. So each step decodes the whole growing id list and releases
only the new suffix, holding it back while it ends in U+FFFD (an incomplete character) or could be
the start of a stop string; a stop string ends the stream and is not printed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    """One row's generated text. `push(token)` returns the newly printable text ("" if none yet)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        """All text decoded so far (a stop string and what follows it are cut off once found)."""
        self.emitted = 0
        """Characters of `text` already returned."""
        self.stopped = False
        """A stop string was found."""

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        self.text = self._decode(self.ids)
        cuts = [i for i in (self.text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stop) if i >= 0]
        if cuts:
            self.text = self.text[: min(cuts)]
            self.stopped = True
            return self._release(len(self.text))
        if self.text.endswith(REPLACEMENT):
            return ""  # wait for the rest of the character
        return self._release(len(self.text) - self._stop_prefix_len())

    def finish(self) -> str:
        """The held-back rest, when generation ends for another reason (EOS, length)."""
        return self._release(len(self.text))

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of `text` that begins some stop string (held back)."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _release(self, end: int) -> str:
        end = max(end, self.emitted)
        out = self.text[self.emitted: end]
        self.emitted = end
        return out
