"""A dependency-free progress display for long loops (stderr, rate and ETA).

On a terminal it is a one-line bar redrawn in place. When stdout or the stream is redirected (a log file,
nohup, a SLURM log, a pipe) it prints plain lines instead, at a bounded rate: one each time another 10% is
done or 30 s have passed, whichever comes first, and one at the end; loops shorter than 10 s print none,
and logs hold no carriage returns.
"""

from __future__ import annotations

import sys
import time

LINE_FRACTION = 0.1  # plain lines: one per 10% done ...
LINE_SECONDS = 30.0  # ... or per 30 s
QUIET_SECONDS = 10.0  # loops done sooner print no plain line (a training epoch's bar would flood the log)


class Progress:
    """Context manager: `with Progress(total, desc) as bar: bar.update(n, loss=...)`.

    enabled=True draws a bar when stdout and the stream are terminals, plain lines otherwise;
    enabled="always" draws the bar anyway; False draws nothing. `initial` units were done before (a resumed
    job): they count toward the total but not toward the rate.
    """

    def __init__(self, total: int, desc: str = "", enabled: bool | str = True, stream=None, min_interval: float = 0.2,
                 initial: int = 0):
        self.total, self.desc = int(total), desc
        self.stream = stream or sys.stderr
        tty = _is_tty(sys.stdout) and _is_tty(self.stream)
        self.enabled = enabled == "always" or (bool(enabled) and tty)
        self.plain = bool(enabled) and enabled != "always" and not tty
        self.min_interval = min_interval
        self.initial = self.done = int(initial)
        self.info = ""
        self.t0 = self.last = time.perf_counter()
        self.lines = 0
        self.next_frac = (int(self._frac() / LINE_FRACTION) + 1) * LINE_FRACTION

    def __enter__(self):
        return self

    def _frac(self) -> float:
        return self.done / self.total if self.total else 1.0

    def update(self, n: int = 1, **info) -> None:
        self.done += n
        if info:
            self.info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.min_interval or self.done >= self.total):
            self.last = now
            self._draw(now)
        elif (self.plain and self.done < self.total and now - self.t0 >= QUIET_SECONDS
              and (self._frac() >= self.next_frac or now - self.last >= LINE_SECONDS)):
            self.last = now
            self.next_frac = (int(self._frac() / LINE_FRACTION) + 1) * LINE_FRACTION
            self._line(now)

    def _rate_eta(self, now: float) -> tuple[float, float, float]:
        elapsed = now - self.t0
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        return elapsed, rate, eta

    def _draw(self, now: float) -> None:
        elapsed, rate, eta = self._rate_eta(now)
        bar = "#" * int(24 * self._frac())
        self.stream.write(
            f"\r{self.desc} [{bar:<24}] {self.done}/{self.total} {rate:,.0f}/s "
            f"{elapsed:.0f}s<{eta:.0f}s {self.info}\x1b[K"
        )
        self.stream.flush()

    def _line(self, now: float) -> None:
        self.lines += 1
        elapsed, rate, eta = self._rate_eta(now)
        eta_s = f", {eta:.0f}s left" if self.done < self.total else ""
        self.stream.write(f"{self.desc}: {100 * self._frac():.0f}% ({self.done:,}/{self.total:,}) {rate:,.0f}/s, "
                          f"{elapsed:.0f}s{eta_s}{' ' + self.info if self.info else ''}\n")
        self.stream.flush()

    def __exit__(self, *exc):
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
        elif self.plain and exc[0] is None and self.lines:
            self._line(time.perf_counter())
        return False


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
