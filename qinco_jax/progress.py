"""A dependency-free progress bar for long loops (stderr, one line, rate and ETA).

A bar is drawn only on a terminal: when stdout or the bar's stream is redirected (a log file, a
pipe, a batch job), it stays silent, so logs hold no carriage-return lines.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """Context manager: `with Progress(total, desc) as bar: bar.update(n, loss=...)`.

    enabled=True draws only when stdout and the stream are terminals; enabled="always" draws anyway.
    """

    def __init__(self, total: int, desc: str = "", enabled: bool | str = True, stream=None, min_interval: float = 0.2):
        self.total, self.desc = int(total), desc
        self.stream = stream or sys.stderr
        self.enabled = enabled == "always" or (bool(enabled) and _is_tty(sys.stdout) and _is_tty(self.stream))
        self.min_interval = min_interval
        self.done, self.info = 0, ""
        self.t0 = self.last = time.perf_counter()

    def __enter__(self):
        return self

    def update(self, n: int = 1, **info) -> None:
        self.done += n
        if info:
            self.info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.min_interval or self.done >= self.total):
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = now - self.t0
        frac = self.done / self.total if self.total else 1.0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        bar = "#" * int(24 * frac)
        self.stream.write(
            f"\r{self.desc} [{bar:<24}] {self.done}/{self.total} {rate:,.0f}/s "
            f"{elapsed:.0f}s<{eta:.0f}s {self.info}\x1b[K"
        )
        self.stream.flush()

    def __exit__(self, *exc):
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
        return False


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
