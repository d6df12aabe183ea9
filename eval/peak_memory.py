"""Run a command and report its peak anonymous memory (RssAnon, sampled from /proc/PID/status).

    python eval/peak_memory.py [--interval 0.05] [--json out.json] -- python train/main.py ...

RssAnon is the memory the kernel cannot drop: it leaves out the pages of memory-mapped files, which
the page cache holds and can evict. The peak is over the command and all its descendants (summed at
each sample). Linux only. Prints one line: peak RssAnon, peak VmRSS (sampled), wall seconds, exit status.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _status_kib(pid: int, fields=("RssAnon", "VmRSS")) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in fields:
                    out[key] = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def _tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(_children(p))
    return seen


def measure(cmd: list[str], interval: float = 0.05, **popen) -> dict:
    """Run cmd; return {'peak_rss_anon_mib', 'peak_vm_rss_mib', 'wall_s', 'returncode'}."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, **popen)
    peak_anon = peak_rss = 0
    while proc.poll() is None:
        stats = [_status_kib(p) for p in _tree(proc.pid)]
        peak_anon = max(peak_anon, sum(s.get("RssAnon", 0) for s in stats))
        peak_rss = max(peak_rss, sum(s.get("VmRSS", 0) for s in stats))
        time.sleep(interval)
    return {"peak_rss_anon_mib": peak_anon / 1024, "peak_vm_rss_mib": peak_rss / 1024,
            "wall_s": time.perf_counter() - t0, "returncode": proc.returncode}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between samples (default 0.05)")
    ap.add_argument("--json", help="also write the result as JSON here")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        ap.error("give the command to measure after --")
    res = measure(cmd, a.interval)
    print(f"peak RssAnon {res['peak_rss_anon_mib']:.0f} MiB, peak VmRSS {res['peak_vm_rss_mib']:.0f} MiB, "
          f"wall {res['wall_s']:.1f} s, exit status {res['returncode']}", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    sys.exit(res["returncode"])


if __name__ == "__main__":
    main()
