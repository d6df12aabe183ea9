"""Training on a memory-mapped file never converts it whole: anonymous memory grows far less than the file.

The same one-epoch `train/main.py` command runs on a small and on a 10x larger uint8 file (both above
the RQ initialisation's --rq-nt sample; without the end-of-run faiss baselines, whose own memory
would hide the training's);
the peak RssAnon (sampled from /proc) of the larger run may exceed the smaller one's by a small part
of the extra file size, where converting it to float32 would cost 4x that size.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval import make_big_file, peak_memory  # noqa: E402

D = 128


def _peak(path, workdir) -> dict:
    # glibc gives each allocating thread its own arena; how many arenas a run touches depends on thread
    # timing, which made identical runs differ by 16-91 MiB of RssAnon on a loaded 2-core machine. Two
    # arenas leave the program's own allocations: the same pair of runs then differed by -4 to 0 MiB.
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=1",
               MALLOC_ARENA_MAX="2")
    cmd = [sys.executable, str(ROOT / "train" / "main.py"), "--train", str(path), "--nval", "2000", "--rq-nt", "20000", "--baseline-nt", "0",
           "--K", "16", "--M", "2", "--L", "1", "--h", "16", "--epochs", "1", "--batch-size", "8192",
           "--workdir", str(workdir), "--no-progress"]
    res = peak_memory.measure(cmd, interval=0.02, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert res["returncode"] == 0
    return res


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_anonymous_memory_stays_far_below_the_file_size(tmp_path):
    small = make_big_file.write_big_file(str(tmp_path / "small.u8bin"), 120_000, D, progress=False)
    big = make_big_file.write_big_file(str(tmp_path / "big.u8bin"), 1_200_000, D, progress=False)
    extra_mib = (os.path.getsize(big) - os.path.getsize(small)) / 2**20  # 132 MiB more uint8 data
    a = _peak(small, tmp_path / "run_small")
    b = _peak(big, tmp_path / "run_big")
    growth = b["peak_rss_anon_mib"] - a["peak_rss_anon_mib"]
    # a float32 copy of the extra rows would add 4 * extra_mib (527 MiB), a uint8 copy 132 MiB; the
    # epoch's index permutation adds 8 MiB
    assert growth < 0.5 * extra_mib, (growth, a, b)
    assert a["peak_rss_anon_mib"] < 2 * 2**10  # the whole run, small file included, stays well under 2 GiB
