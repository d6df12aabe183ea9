"""Write a large uint8 vector file (big-ann-benchmarks .u8bin, memory-mapped) for memory measurements.

    python eval/make_big_file.py --out data/big/learn8M.u8bin             # 8M x 128 uint8 = 1 GiB
    python eval/make_big_file.py --out /tmp/x.u8bin --n 1000000 --d 64

The vectors are the built-in synthetic distribution (qinco_jax.data.synthetic's), rounded to uint8,
generated and written chunk by chunk: the script itself holds one chunk at a time.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

if __package__ in (None, ""):  # `python eval/make_big_file.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qinco_jax.data import synth  # noqa: E402
from qinco_jax.progress import Progress  # noqa: E402

CHUNK = 131072


def write_big_file(path: str, n: int, d: int = 128, seed: int = 0, progress: bool = True) -> str:
    """An (n, d) uint8 .u8bin file of synthetic vectors; returns the path."""
    if n < 1 or d < 1:
        raise ValueError(f"need n, d >= 1, got n={n}, d={d}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    p = synth._synthetic_map(d, seed)
    with open(path, "wb") as f:
        f.write(np.array([n, d], "<u4").tobytes())
    out = np.memmap(path, np.uint8, "r+", offset=8, shape=(n, d))
    with Progress(n, desc="write", enabled=progress) as bar:
        for i in range(0, n, CHUNK):
            m = min(CHUNK, n - i)
            x = synth._synthetic_draw(p, m, np.random.default_rng([seed, 7, i]))
            out[i:i + m] = np.clip(np.rint(x), 0, 255).astype(np.uint8)
            bar.update(m)
    out.flush()
    del out
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the .u8bin file to write")
    ap.add_argument("--n", type=int, default=8_000_000, help="number of vectors (default 8000000)")
    ap.add_argument("--d", type=int, default=128, help="dimension (default 128)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic distribution (default 0)")
    a = ap.parse_args(argv)
    write_big_file(a.out, a.n, a.d, a.seed)
    print(f"{a.out}: {a.n:,} x {a.d} uint8, {os.path.getsize(a.out) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
