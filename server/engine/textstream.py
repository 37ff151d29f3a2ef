"""Turn generated token bytes into text that is safe to stream: whole UTF-8 characters, stop strings cut.

Text that might be the start of a stop string is held back until it either completes the stop string (then it
is dropped and generation ends) or stops matching (then it is released). Engines feed it one token's bytes at
a time; it knows nothing of tokens or llama.cpp.
"""

from __future__ import annotations

import codecs


class TextAssembler:
    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._pending = ""
        self.stopped = False

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that can be shown now ("" while held back)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(piece)
        if not self._stop:
            out, self._pending = self._pending, ""
            return out
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        keep = self._held_suffix()
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        return out

    def flush(self) -> str:
        """The text still held back, once generation has ended without a stop string."""
        if self.stopped:
            return ""
        out = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return out

    def _first_stop(self) -> int | None:
        hits = [i for i in (self._pending.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _held_suffix(self) -> int:
        # The longest tail of the pending text that is a proper prefix of some stop string.
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:n]):
                    best = n
                    break
        return best
