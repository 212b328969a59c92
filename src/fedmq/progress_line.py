"""One line of progress on a terminal, redrawn in place; nothing at all elsewhere.

Under systemd (or any non-terminal stderr) the structured JSON log lines are the only
output; a person at a terminal also sees where a long run is ("round 7/30: 4/10
reported"). Writes are throttled, so a busy loop can call ``show`` freely.
"""

import sys
import time
from collections.abc import Callable
from typing import TextIO


class ProgressLine:
    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self.enabled = self._stream.isatty()
        self._interval = interval
        self._clock = clock
        self._shown = ""
        self._at = float("-inf")

    def show(self, text: str, *, force: bool = False) -> None:
        """Redraw the line with ``text`` (unchanged text or too soon: nothing)."""
        if not self.enabled or text == self._shown:
            return
        now = self._clock()
        if not force and now - self._at < self._interval:
            return
        self._stream.write(f"\r{text}\x1b[K")
        self._stream.flush()
        self._shown, self._at = text, now

    def close(self) -> None:
        """End the line, so what follows starts on a fresh one."""
        if self.enabled and self._shown:
            self._stream.write("\n")
            self._stream.flush()
            self._shown = ""
