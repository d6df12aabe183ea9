"""Split one vector file into train / database / query .fvecs files (deterministic).

    python eval/split_file.py ../shared/data/sift5k_ngt.fvecs --out data/sift5k --nt 3500 --nb 1300
    python eval/split_file.py vectors.npy --out data/mine --nt 100000 --nb 50000 --nq 1000 --seed -1

The rows are shuffled by a fixed seed (--seed; -1 keeps the file order), then the first nt rows go to
train.fvecs, the next nb to db.fvecs and the next nq (default: all the rest) to queries.fvecs. Train a codec
on train.fvecs (train/main.py takes its last --nval rows as validation) and evaluate it with
`eval/main.py --db OUT/db.fvecs --queries OUT/queries.fvecs --train OUT/train.fvecs`.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

if __package__ in (None, ""):  # `python eval/split_file.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qinco_jax import checks, data  # noqa: E402
from qinco_jax.checks import QincoInputError  # noqa: E402

PARTS = ("train", "db", "queries")


def parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="vector file (.fvecs .bvecs .fbin .u8bin .npy ...)")
    ap.add_argument("--out", required=True, help="output folder for train.fvecs, db.fvecs, queries.fvecs")
    ap.add_argument("--nt", type=int, required=True, help="training vectors (validation included)")
    ap.add_argument("--nb", type=int, required=True, help="database vectors")
    ap.add_argument("--nq", type=int, help="query vectors (default: all the remaining rows)")
    ap.add_argument("--seed", type=int, default=0, help="shuffling seed; -1 keeps the file order (default 0)")
    return ap


def split_sizes(n: int, nt: int, nb: int, nq: int | None) -> tuple[int, int, int]:
    """(nt, nb, nq) checked against the n rows of the file; nq defaults to the rest."""
    nq = n - nt - nb if nq is None else nq
    if min(nt, nb, nq) < 1 or nt + nb + nq > n:
        raise QincoInputError(f"cannot split {n:,} rows into nt={nt:,}, nb={nb:,}, nq={nq:,} (each >= 1)")
    return nt, nb, nq


def split(x: np.ndarray, nt: int, nb: int, nq: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """{'train', 'db', 'queries'}: disjoint float32 row sets of x, after a seeded shuffle (seed -1: none)."""
    sizes = split_sizes(x.shape[0], nt, nb, nq)
    order = np.arange(x.shape[0]) if seed < 0 else np.random.default_rng(seed).permutation(x.shape[0])
    bounds = np.cumsum((0,) + sizes)
    return {p: np.asarray(x[order[a:b]], np.float32) for p, a, b in zip(PARTS, bounds, bounds[1:])}


def main(argv=None) -> None:
    """Command-line entry point."""
    args = parser().parse_args(argv)
    try:
        x = data.read_vectors(args.input)
        checks.finite(x, args.input)
        parts = split(x, args.nt, args.nb, args.nq, args.seed)
        os.makedirs(args.out, exist_ok=True)
        for name, part in parts.items():
            path = os.path.join(args.out, f"{name}.fvecs")
            data.write_vectors(path, part)
            print(f"{path}: {part.shape[0]:,} x {part.shape[1]}")
    except (QincoInputError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
