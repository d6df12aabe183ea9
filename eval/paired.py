"""Compare two decoded databases query by query: paired recall differences and distance distortion.

    python eval/main.py --model runs/a $EV --keep-decoded a.npy     # each codec's decoded database
    python eval/main.py --model runs/b $EV --keep-decoded b.npy
    python eval/paired.py --db base.u8bin --queries query.u8bin --gt gt.bin a.npy b.npy

Two codecs are searched on the same queries, so the difference of their recalls is judged by the queries
where they disagree: its standard error is sqrt((a_only + b_only - (b_only - a_only)^2 / n) / (n (n - 1))),
far larger than what two independent recalls would suggest when the codecs are close. The distortion
columns are what sets the ranking: how far each query's true nearest neighbour moves away from it
(d(q, x_hat) - d(q, x), mean over queries), and how much that change varies over the query's true top-`top`
(mean over queries of its standard deviation). The decoded databases are read in blocks (memory-mapped .npy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # `python eval/paired.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval import metrics  # noqa: E402
from qinco_jax import checks, data  # noqa: E402
from qinco_jax.checks import QincoInputError  # noqa: E402


def paired_recalls(I_a, I_b, gt, ks=(1, 10, 100)) -> dict:
    """{k: recall of a and of b, b - a, its paired standard error, queries found by a only and b only}."""
    gt = np.asarray(gt)[:, :1]
    out = {}
    for k in ks:
        ha = (np.asarray(I_a)[:, :k] == gt).any(axis=1)
        hb = (np.asarray(I_b)[:, :k] == gt).any(axis=1)
        d = hb.astype(np.float64) - ha
        n = len(d)
        se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
        out[int(k)] = dict(a=float(ha.mean()), b=float(hb.mean()), diff=float(d.mean()), se=se,
                           a_only=int((ha & ~hb).sum()), b_only=int((hb & ~ha).sum()))
    return out


def distortion(xq, xb, decoded, gt, top: int = 100) -> dict:
    """How decoding moves each query's true top-`top` neighbours (squared L2 in raw units): the nearest one's
    mean growth, and the mean over queries of the spread of that change over the top-`top`."""
    ids = np.asarray(gt)[:, :top].astype(np.int64)
    rows = np.unique(ids)
    pos = np.searchsorted(rows, ids)
    x = np.asarray(xb[rows], np.float32)[pos]  # (nq, top, d), read once per distinct row
    xh = np.asarray(decoded[rows], np.float32)[pos]
    q = np.asarray(xq, np.float32)[:, None]
    change = ((q - xh) ** 2).sum(-1) - ((q - x) ** 2).sum(-1)
    return dict(nn_growth=float(change[:, 0].mean()), spread=float(change.std(axis=1).mean()), top=int(ids.shape[1]))


def compare(xq, xb, gt, decoded_a, decoded_b, ks=(1, 10, 100), top: int = 100) -> dict:
    xq = checks.vectors(xq, None, "queries")
    xb = checks.vectors(xb, xq.shape[1], "database")
    gt = metrics.check_groundtruth(gt, xb.shape[0], xq.shape[0])
    result = {}
    for name, dec in (("a", decoded_a), ("b", decoded_b)):
        dec = checks.vectors(dec, xb.shape[1], f"decoded database {name}")
        if dec.shape[0] != xb.shape[0]:
            raise QincoInputError(f"decoded database {name} has {dec.shape[0]} vectors, the database {xb.shape[0]}")
        result[name] = dict(I=metrics.knn_search(xq, dec, max(ks))[1], **distortion(xq, xb, dec, gt, top))
    return dict(recalls=paired_recalls(result["a"]["I"], result["b"]["I"], gt, ks),
                distortion={n: {k: v for k, v in r.items() if k != "I"} for n, r in result.items()})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("decoded", nargs=2, metavar="DECODED.npy", help="the two decoded databases (a, then b)")
    p.add_argument("--db", required=True, help="the raw database vectors")
    p.add_argument("--queries", required=True)
    p.add_argument("--gt", required=True, help="ground-truth ids (nearest first)")
    p.add_argument("--top", type=int, default=100, help="true neighbours per query for the distortion spread")
    p.add_argument("--out", help="also write the results as JSON")
    args = p.parse_args(argv)
    try:
        res = compare(data.read_vectors(args.queries), data.read_vectors(args.db), data.read_groundtruth(args.gt),
                      data.read_vectors(args.decoded[0]), data.read_vectors(args.decoded[1]),
                      top=checks.batch_size(args.top, "--top"))
    except (QincoInputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"a = {args.decoded[0]}, b = {args.decoded[1]}")
    for k, r in res["recalls"].items():
        print(f"R@{k}: a {r['a']:.3f}  b {r['b']:.3f}  b - a {r['diff']:+.3f} ± {r['se']:.3f} (paired SE); "
              f"found by a only {r['a_only']}, by b only {r['b_only']}")
    for n, r in res["distortion"].items():
        print(f"{n}: true neighbour moved away by {r['nn_growth']:.1f} on average; spread over the true "
              f"top {r['top']}: {r['spread']:.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(a=args.decoded[0], b=args.decoded[1], **res), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
