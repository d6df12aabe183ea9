"""Time the shortlist scan with one look-up table per query against faiss IVF-PQ and faiss's IVF-RQ scanner,
per scanned code, on the same codes and the same queries.

    python eval/bench_scan.py --db base.u8bin --train learn.u8bin --queries query.u8bin --threads 2

The codes are those of a faiss IVF-PQ M x 8 index (nlist lists, trained on --nt vectors): the PQ centroids,
each placed in its block of a d-vector, are additive tables, so the scan computes the same distances as IVF-PQ
(the top-k ids are compared). The same codes also go into a faiss IndexIVFResidualQuantizer with these tables
(faiss's additive scanner, one table per probed list). Every method includes its coarse search; the methods are
timed in turn inside each repetition (interleaved), and the median over the repetitions is reported, in ns per
scanned code (the codes in the probed lists) and as a ratio against IVF-PQ's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qinco_jax import data  # noqa: E402
from qinco_jax import search as S  # noqa: E402
from qinco_jax.search import scan as SC  # noqa: E402


def pq_tables(pq, d: int) -> np.ndarray:
    """(M, K, d) additive tables equal to a faiss ProductQuantizer's centroids, each in its block."""
    import faiss

    M, K, ds = pq.M, pq.ksub, pq.dsub
    cent = faiss.vector_to_array(pq.centroids).reshape(M, K, ds)
    T = np.zeros((M, K, d), np.float32)
    for m in range(M):
        T[m, :, m * ds:(m + 1) * ds] = cent[m]
    return T


def run_scan(scanner, quantizer, xq, nprobe, nshort, qb, out_I):
    Dq, Iq = quantizer.search(xq, nprobe)
    parts = scanner.scan(xq, Iq, Dq, nshort, qb=qb)
    for rows, n, (_, ids, _) in parts:
        out_I[rows[:n]] = np.asarray(ids)[:n]
    return out_I


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--queries", required=True)
    ap.add_argument("--nt", type=int, default=50_000)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--M", type=int, default=8)
    ap.add_argument("--nprobe", default="1,4,16,64")
    ap.add_argument("--nshort", type=int, default=100)
    ap.add_argument("--qb", default="0", help="queries per jitted sub-batch, comma-separated, each timed (0: the "
                    "scan's default, 64, or 32 above 1,024 codes per query)")
    ap.add_argument("--term", default="float32", choices=SC.TERMS)
    ap.add_argument("--no-rq", dest="rq", action="store_false", help="leave faiss's IVF-RQ scanner out")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="JSON results")
    args = ap.parse_args(argv)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    xb = np.ascontiguousarray(data.read_vectors(args.db), np.float32)
    xt = np.ascontiguousarray(data.read_vectors(args.train)[: args.nt], np.float32)
    xq = np.ascontiguousarray(data.read_vectors(args.queries, mmap=False), np.float32)
    d = xb.shape[1]
    ivfpq = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, args.nlist, args.M, 8)
    ivfpq.train(xt)
    ivfpq.add(xb)
    cent = ivfpq.quantizer.reconstruct_n(0, args.nlist)
    lists = ivfpq.quantizer.search(xb, 1)[1][:, 0]
    codes = np.concatenate([lists[:, None], ivfpq.pq.compute_codes(xb - cent[lists]).astype(np.int64)], 1)
    T = pq_tables(ivfpq.pq, d)
    scanner = SC.Scanner(SC.build_lists(codes, T, cent, term=args.term), T, True)
    methods = {"IVF-PQ8 (faiss)": "pq"}
    qbs = [int(v) for v in args.qb.split(",")]
    for qb in qbs:
        methods[f"scan qb={qb or 'auto'}"] = qb or None
    if args.rq:
        rq = S.new_index(T, cent, norm="float")
        S.add_codes(rq, T, codes)
        methods["IVF-RQ scanner (faiss)"] = "rq"
    quantizer = ivfpq.quantizer
    nq, k = xq.shape[0], args.nshort
    rows = []
    for nprobe in [int(v) for v in args.nprobe.split(",")]:
        ivfpq.nprobe = nprobe
        if args.rq:
            rq.nprobe = nprobe
        scanned = int(np.asarray(scanner.counts_np)[quantizer.search(xq, nprobe)[1]].sum())
        I = {}
        for name, how in methods.items():  # warm-up (compiles every bucket this nprobe uses)
            I[name] = (ivfpq.search(xq, k)[1] if how == "pq" else rq.search(xq, k)[1] if how == "rq"
                       else run_scan(scanner, quantizer, xq, nprobe, k, how, np.empty((nq, k), np.int64)))
        times = {name: [] for name in methods}
        for _ in range(args.reps):
            for name, how in methods.items():
                t = time.perf_counter()
                if how == "pq":
                    ivfpq.search(xq, k)
                elif how == "rq":
                    rq.search(xq, k)
                else:
                    run_scan(scanner, quantizer, xq, nprobe, k, how, np.empty((nq, k), np.int64))
                times[name].append(time.perf_counter() - t)
        base = float(np.median(times["IVF-PQ8 (faiss)"]))
        for name in methods:
            med = float(np.median(times[name]))
            same = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(I[name], I["IVF-PQ8 (faiss)"])]))
            rows.append({"nprobe": nprobe, "codes_per_query": scanned / nq, "method": name,
                         "ns_per_code": med / scanned * 1e9, "ratio_vs_ivfpq": med / base, "qps": nq / med,
                         "top_k_overlap_with_ivfpq": same, "times_s": times[name]})
            print(f"nprobe {nprobe:3d} codes/q {scanned / nq:7.0f} {name:24s} {med / scanned * 1e9:7.1f} ns/code "
                  f"x{med / base:5.2f} QPS {nq / med:8.0f} top-{k} overlap {same:.3f}", flush=True)
    res = {"rows": rows, "threads": args.threads, "reps": args.reps, "nq": nq, "nb": xb.shape[0],
           "nlist": args.nlist, "M": args.M, "term": args.term, "cpu_count": os.cpu_count(),
           "loadavg": os.getloadavg()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
