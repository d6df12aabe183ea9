"""Write a large memory-mappable vector file for build-memory tests, chunk by chunk (never held in memory).

    python eval/make_big_db.py --src ../shared/data/devsift/base.u8bin --n 2000000 --out /tmp/big2M.u8bin

Row i is source row (i mod n_src) plus small integer noise (uniform in [-2, 2], clipped to the source dtype's
range), so the file is as large as asked and looks like the source data.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qinco_jax import data  # noqa: E402

CHUNK = 65536


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="source vectors (any supported format)")
    ap.add_argument("--n", type=int, required=True, help="rows to write")
    ap.add_argument("--out", required=True, help="output .u8bin (uint8 sources) or .fbin file")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    src = data.read_vectors(args.src)
    n_src, d = src.shape
    dtype = np.dtype(np.uint8) if args.out.endswith(".u8bin") else np.dtype("<f4")
    rng = np.random.default_rng(args.seed)
    with open(args.out, "wb") as f:
        f.write(np.array([args.n, d], "<u4").tobytes())
        for i0 in range(0, args.n, CHUNK):
            rows = np.arange(i0, min(args.n, i0 + CHUNK)) % n_src
            x = np.asarray(src[rows], np.int32)
            x = x + rng.integers(-2, 3, x.shape)
            if dtype == np.uint8:
                x = np.clip(x, 0, 255)
            f.write(np.ascontiguousarray(x, dtype).tobytes())
    print(f"{args.out}: {args.n:,} x {d} {dtype}, {os.path.getsize(args.out):,} bytes")


if __name__ == "__main__":
    main()
