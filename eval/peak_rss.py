"""Run a command and report its peak memory, split into anonymous memory and mapped file pages.

    python eval/peak_rss.py -- python eval/search.py build --model M --db big.u8bin --train learn.u8bin --out idx

/usr/bin/time -v reports the peak resident set size, which also counts the pages of memory-mapped files that
were read (file-backed, reclaimable page cache). This samples /proc/PID/status of the command every 0.1 s and
prints the peak of RssAnon (memory the process allocated) and of RssFile (mapped file pages) beside VmHWM.
Linux only.
"""

from __future__ import annotations

import subprocess
import sys
import time


def _status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        sys.exit("usage: python eval/peak_rss.py -- COMMAND ...")
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv)
    peak = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    while proc.poll() is None:
        for k, v in _status(proc.pid).items():
            peak[k] = max(peak[k], v)
        time.sleep(0.1)
    mb = {k: v / 2**20 for k, v in peak.items()}
    print(f"exit {proc.returncode}, {time.perf_counter() - t0:.1f}s; peak RSS (VmHWM) {mb['VmHWM']:.0f} MiB, "
          f"peak anonymous {mb['RssAnon']:.0f} MiB, peak mapped-file pages {mb['RssFile']:.0f} MiB", file=sys.stderr)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
