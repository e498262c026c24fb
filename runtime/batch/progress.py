"""The batch job's progress bar (images/s and ETA, on stderr) and its end-of-run summary."""

from __future__ import annotations

import shutil
import time


class Progress:
    """``[####......] 12/24 images  3.1 img/s  ETA 4s  failed 1`` redrawn in place on a terminal; elsewhere
    (a log file, a cluster job's output) the same text as a plain line every ``every`` seconds."""

    def __init__(self, total: int, stream, bar: bool, every: float = 30.0, width: int = 24) -> None:
        self.total, self.stream, self.bar, self.every, self.width = total, stream, bar, every, width
        self.done = self.failed = 0
        self.t0 = time.monotonic()
        self._last = self.t0 if not bar else 0.0
        self._drawn = False

    def update(self, done: int = 0, failed: int = 0) -> None:
        """``done`` more images finished, ``failed`` of them with an error row."""
        self.done += done
        self.failed += failed
        now = time.monotonic()
        if self.bar and (now - self._last >= 0.1 or self.done >= self.total):
            self.stream.write("\r" + self.text(now))
            self.stream.flush()
            self._drawn, self._last = True, now
        elif not self.bar and now - self._last >= self.every and self.done < self.total:
            self.stream.write(self.text(now) + "\n")
            self.stream.flush()
            self._last = now

    def text(self, now: float | None = None) -> str:
        spent = (now or time.monotonic()) - self.t0
        frac = self.done / self.total if self.total else 1.0
        fill = int(round(frac * self.width))
        rate = self.done / spent if spent > 0 else 0.0
        eta = f"ETA {(self.total - self.done) / rate:.0f}s" if 0 < rate and self.done < self.total else f"{spent:.1f}s"
        tail = f"  failed {self.failed}" if self.failed else ""
        bar = "#" * fill + "." * (self.width - fill)
        line = f"[{bar}] {self.done}/{self.total} images  {rate:.2f} img/s  {eta}{tail}"
        return line[: max(shutil.get_terminal_size((100, 20)).columns - 1, 20)] if self.bar else line

    def finish(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def summary(done: int, skipped: int, failed: int, seconds: float, out) -> str:
    """The last line of a run: what it did and how fast."""
    rate = f", {done / seconds:.2f} images/s" if done and seconds > 0 else ""
    return (f"done {done}, skipped {skipped} (already in {out}), failed {failed}, "
            f"time {seconds:.1f}s{rate}")
