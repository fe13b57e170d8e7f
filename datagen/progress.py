"""Progress of the long data commands (data build, synth, the feeder's prompt-length scan) on stderr: a tqdm bar on a
terminal (common/progress.py), one line per interval otherwise (what lands in the launcher's log files, where a bar
would print nothing or fill them with redraws), and one final line either way."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from common.progress import bar


class Progress:
    def __init__(
        self,
        label: str,
        total: int | None = None,
        quiet: bool = False,
        interval_s: float = 1.0,
        stream: TextIO | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.quiet = quiet
        self.interval_s = interval_s
        self.stream = stream or sys.stderr
        self.done = 0
        self._start = self._last = time.monotonic()
        self._tty = self.stream.isatty()
        self._bar = None if quiet or not self._tty else bar(total, label, file=self.stream, disable=False,
                                                             delay_s=interval_s)  # fmt: skip

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            return
        now = time.monotonic()
        if not self.quiet and now - self._last >= self.interval_s:
            self._last = now
            self._emit(note, final=False)

    def close(self, note: str = "") -> None:
        if self._bar is not None:
            self._bar.close()  # erased: the final line below stays
        if not self.quiet:
            self._emit(note, final=True)

    def _emit(self, note: str, final: bool) -> None:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        line = (
            f"{self.label}: {self.done}{of} ({self.done / elapsed:.1f}/s, {elapsed:.1f} s){' ' + note if note else ''}"
        )
        if self._tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
