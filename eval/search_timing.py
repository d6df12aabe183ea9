"""The timing loop of `eval/search.py search`: every setting (ours and the faiss baselines') is run once for its
recalls (ours staged, so that each stage is timed apart), then all settings are timed in turn, --reps times
(interleaved: a load change on a shared machine hits every method alike), and each row reports the median."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import numpy as np

from qinco_jax import search as S

KS = (1, 10, 100)


@functools.lru_cache(maxsize=2)
def _matmul(n: int):
    """(the jitted float32 matmul, its (n, n) operand on the device), compiled and warmed once per n: the rate
    is measured after every staged run of a sweep."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST))
    a = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32))
    f(a, a).block_until_ready()
    return f, a


def matmul_rate(n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of a jitted float32 (n x n) @ (n x n) matmul on JAX's default device (median of reps)."""
    f, a = _matmul(n)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * n ** 3 / float(np.median(ts)) / 1e9


@dataclasses.dataclass
class Setting:
    """One operating point: its row (method and parameters), what runs it, and its timed runs."""

    row: dict
    run: Callable[[], object]
    runs: list = dataclasses.field(default_factory=list)


def qinco_settings(p: S.Pipeline, xq: np.ndarray, gt, args, recall_cols, name: str, log) -> tuple[list, list]:
    """(settings, shortlist settings) of the QINCo pipeline: one setting per nprobe x nshort x pairwise factor x
    scan, and the same shortlists alone (no re-rank)."""
    settings, extra, nq = [], [], xq.shape[0]
    flops = p.reranker.flops_per_candidate()
    for scan in args.scan:
        for nprobe in (args.nprobe if p.ivf else [1]):
            for nshort in args.nshort:
                for pf in args.pairwise_factor:
                    kw = dict(k=max(KS), nshort=nshort, nprobe=nprobe, pairwise_factor=pf, ef_search=args.ef_search,
                              scan=scan)
                    S.search(p, xq, staged=True, **kw)  # warm-up: compiles the jitted functions it needs
                    r, t, paired = staged_runs(p, xq, kw, args.reps, flops)
                    label = name + (" +pairwise" if pf > 1 else "") + (" (faiss scan)" if scan == "faiss" else "")
                    row = {"method": label, "nprobe": nprobe if p.ivf else None, "nshort": nshort, "pf": pf,
                           "scan": scan}
                    row.update(recall_cols(r.I, gt, nshort))
                    row.update(recall_cols(r.I_short, gt, nshort, "_short"))
                    row.update({f"t_{k}_ms": t[v] * 1e3 / nq for k, v in
                                (("coarse", "coarse"), ("short", "shortlist"), ("pair", "pairwise"),
                                 ("decode", "decode"), ("rerank", "rerank"))})
                    row["t_staged_ms"] = t["total"] * 1e3 / nq  # the staged run's total (stages without overlap)
                    row["decode_us_per_cand"] = t["decode"] * 1e6 / (nq * nshort)
                    row.update(paired)
                    if pf > 1:
                        row["pair_us_per_cand"] = t["pairwise"] * 1e6 / (nq * nshort * pf)
                    settings.append(Setting(row, lambda kw=kw: S.search(p, xq, **kw)))
                    if pf == 1:
                        short = {"method": label.replace(name, name + " shortlist (no re-rank)"),
                                 "nprobe": row["nprobe"], "nshort": nshort, "pf": 1, "scan": scan}
                        short.update({f"r{k}": row[f"r{k}_short"] for k in KS})
                        extra.append(Setting(short, lambda kw=kw: S.search(p, xq, rerank=False, **kw)))
    return settings, extra


def staged_runs(p: S.Pipeline, xq: np.ndarray, kw: dict, reps: int, flops: float | None):
    """reps staged runs of one setting, each followed by the matmul rate (so that the decode's share of it is
    measured under the same load): (the first run's result, the stage times of the run of median total time, the
    decode's medians: µs per candidate, GFLOP/s, the paired matmul rate and the median of the per-run shares)."""
    runs, shares, rates, us = [], [], [], []
    nc = xq.shape[0] * kw["nshort"]
    for _ in range(max(1, reps)):
        runs.append(S.search(p, xq, staged=True, **kw))
        rates.append(matmul_rate(reps=3))
        us.append(runs[-1].times["decode"] * 1e6 / nc)
        if flops:
            shares.append(flops / us[-1] / 1e3 / rates[-1])
    mid = sorted(runs, key=lambda r: r.times["total"])[len(runs) // 2]  # the run of median total time
    times = mid.times
    paired = {"decode_us_per_cand_runs": us, "matmul_gflops_paired": float(np.median(rates))}
    if flops:
        paired.update(decode_gflops=flops / float(np.median(us)) / 1e3, decode_share_of_matmul=float(np.median(shares)))
    return runs[0], times, paired


def baseline_settings(indexes: dict, probes, xq, gt, recall_cols) -> list:
    """One setting per faiss baseline (label -> index) and nprobe (None for a flat index)."""
    import faiss

    out = []
    for label, index in indexes.items():
        for nprobe in probes:
            def run(index=index, nprobe=nprobe):
                if nprobe is not None:
                    faiss.extract_index_ivf(index).nprobe = nprobe
                return index.search(xq, max(KS))[1]

            row = {"method": label, "nprobe": nprobe}
            row.update(recall_cols(run(), gt, max(KS)))
            out.append(Setting(row, run))
    return out


MIN_RUN_S = 0.05  # a setting faster than this runs several times per timing (a timeslice lost on a shared
                  # machine is then a small part of the time)


def time_interleaved(settings: list, nq: int, reps: int, log) -> list[dict]:
    """Time every setting reps times, in turn; rows with the median QPS (and every run's)."""
    inner = []
    for s in settings:
        t = time.perf_counter()
        s.run()
        inner.append(max(1, int(np.ceil(MIN_RUN_S / max(time.perf_counter() - t, 1e-6)))))
    for rep in range(reps):
        for s, n in zip(settings, inner):
            t = time.perf_counter()
            for _ in range(n):
                s.run()
            s.runs.append((time.perf_counter() - t) / n)
        log(f"timing: repetition {rep + 1} of {reps} done")
    rows = []
    for s in settings:
        med = float(np.median(s.runs))
        row = {**s.row, "qps": nq / med, "qps_runs": [nq / t for t in s.runs],
               "timing": f"median of {reps}, interleaved"}
        if "t_decode_ms" not in row:  # a shortlist alone or a faiss baseline: one stage, the whole time
            row["t_short_ms"] = med * 1e3 / nq
        rows.append(row)
    return rows
