"""Reconstruction error, exact blocked k-NN search and 1-recall@k (numpy and faiss only)."""

from __future__ import annotations

import numpy as np

from qinco_jax import checks, faiss_ops
from qinco_jax.checks import QincoInputError


def mse(x, xhat, chunk: int = 65536) -> float:
    """Mean over vectors of the squared L2 error, streamed in chunks with float64 accumulation."""
    x = checks.vectors(x, None, "x")
    xhat = checks.vectors(xhat, x.shape[1], "xhat")
    if xhat.shape[0] != x.shape[0]:
        raise QincoInputError(f"x has {x.shape[0]} vectors but xhat has {xhat.shape[0]}")
    chunk = checks.batch_size(chunk, "chunk")
    total = 0.0
    for i0 in range(0, x.shape[0], chunk):
        diff = np.asarray(x[i0:i0 + chunk], dtype=np.float64) - np.asarray(xhat[i0:i0 + chunk], dtype=np.float64)
        total += float(np.einsum("ij,ij->", diff, diff))
    return total / x.shape[0]


def knn_search(xq, xb, k: int, block: int = 131072) -> tuple[np.ndarray, np.ndarray]:
    """Exact L2 k-NN of xq in xb, reading xb in blocks of rows; returns (D, I) with global ids like faiss.knn."""
    xq = checks.vectors(xq, None, "xq")
    xb = checks.vectors(xb, xq.shape[1], "xb")
    return faiss_ops.knn(xq, xb, checks.batch_size(k, "k"), checks.batch_size(block, "block"))


def stream_evaluate(xb, decoded, xq=None, k: int = 100) -> tuple[float, np.ndarray | None]:
    """MSE of a database against its reconstructions, which arrive as (start, xhat chunk) in order,
    and the exact k-NN ids of xq among the reconstructions (None without queries). Only one chunk of
    reconstructions is held at a time."""
    xb = checks.vectors(xb, None, "xb")
    search = None if xq is None else faiss_ops.BlockedKnn(checks.vectors(xq, xb.shape[1], "xq"), k)
    total, seen = 0.0, 0
    for start, xhat in decoded:
        if start != seen:
            raise ValueError(f"reconstructions arrive out of order: chunk at {start}, expected {seen}")
        diff = np.asarray(xb[start:start + xhat.shape[0]], np.float64) - np.asarray(xhat, np.float64)
        total += float(np.einsum("ij,ij->", diff, diff))
        seen += xhat.shape[0]
        if search is not None:
            search.add(start, xhat)
    if seen != xb.shape[0]:
        raise ValueError(f"{seen} reconstructions for {xb.shape[0]} database vectors")
    return total / seen, None if search is None else search.result()[1]


def recalls(I, gt, ks=(1, 10, 100)) -> dict:
    """{k: share of queries whose true nearest neighbour gt[:, 0] is among I[:, :k]}."""
    I, gt = np.asarray(I), np.asarray(gt)
    if gt.ndim == 1:
        gt = gt[:, None]
    if I.ndim != 2 or gt.ndim != 2:
        raise QincoInputError(f"I and gt must be 2-D, got shapes {I.shape} and {gt.shape}")
    if I.shape[0] != gt.shape[0]:
        raise QincoInputError(f"I has {I.shape[0]} rows but ground truth has {gt.shape[0]}")
    out = {}
    for k in ks:
        if not 1 <= k <= I.shape[1]:
            raise QincoInputError(f"recall@{k} needs at least {k} results per query, search returned {I.shape[1]}")
        out[int(k)] = float((I[:, :k] == gt[:, :1]).any(axis=1).mean())
    return out


def check_groundtruth(gt, nb: int, nq: int) -> np.ndarray:
    """Check a (nq, k) ground-truth id matrix against nb database vectors; returns it as an ndarray."""
    gt = np.asarray(gt)
    if gt.ndim == 1:
        gt = gt[:, None]
    if gt.dtype.kind not in "ui":
        raise QincoInputError(f"ground truth must hold integer ids, got dtype {gt.dtype}")
    if gt.ndim != 2 or gt.shape[1] == 0:
        raise QincoInputError(f"ground truth must be a 2-D array (nq, k), got shape {gt.shape}")
    if gt.shape[0] != nq:
        raise QincoInputError(f"ground truth has {gt.shape[0]} rows but there are {nq} queries")
    lo, hi = int(gt.min()), int(gt.max())
    if lo < 0 or hi >= nb:
        bad = lo if lo < 0 else hi
        raise QincoInputError(
            f"ground truth refers to database id {bad} but only {nb} vectors are in the database "
            "(wrong database file or size?)"
        )
    return gt


def exact_groundtruth(xq, xb, k: int = 100, block: int = 131072) -> np.ndarray:
    """(nq, min(k, nb)) int64 ids of the exact L2 nearest neighbours of xq in xb."""
    nb = checks.vectors(xb, None, "xb").shape[0]
    _, I = knn_search(xq, xb, min(checks.batch_size(k, "k"), nb), block=block)
    return I
