"""Additive tables fitted to QINCo codes by least squares, and what they give: additive reconstructions, their
squared norms and brute-force additive distances (the reference of the faiss shortlist)."""

from __future__ import annotations

import numpy as np

from qinco_jax import checks
from qinco_jax.checks import QincoInputError
from qinco_jax.progress import Progress
from qinco_jax.search.common import split_codes

LSTSQ_CHUNK = 16384


def targets(x: np.ndarray, lists: np.ndarray | None, centroids: np.ndarray | None) -> np.ndarray:
    """What the additive tables reconstruct: x (flat) or the residual x - c[list] (IVF), float64."""
    x = np.asarray(x, np.float64)
    return x if lists is None else x - centroids[lists]


def sum_rows_by_label(labels: np.ndarray, x: np.ndarray, nlabels: int,
                      dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """(sums (nlabels, d), counts (nlabels,)) of the rows of x grouped by integer label (sort + reduceat)."""
    labels = np.asarray(labels, np.int64)
    counts = np.bincount(labels, minlength=nlabels)
    sums = np.zeros((nlabels, x.shape[1]), dtype)
    if labels.size:
        order = np.argsort(labels, kind="stable")
        present = np.flatnonzero(counts)
        starts = np.concatenate([[0], np.cumsum(counts[present])[:-1]])
        sums[present] = np.add.reduceat(np.asarray(x, dtype)[order], starts, axis=0)
    return sums, counts


def lstsq_tables(codes, x, K: int, *, centroids=None, chunk: int = LSTSQ_CHUNK, rtol: float = 1e-10,
                 progress: bool = False) -> np.ndarray:
    """Additive codebooks fitted by least squares to QINCo codes (spec v1 §4.1).

    Minimises sum_i ||t_i - sum_m T_m[codes[i, m]]||^2 with t = x (flat) or t = x - centroids[codes[:, 0]]
    (IVF: column 0 holds list ids, the tables use the other columns). The normal equations
    G T = B (G = one-hot Gram, (M K, M K); B = one-hot^T t, (M K, d)) are accumulated chunk by chunk from pair
    counts and row sums, never as an n x M K matrix, and solved in float64 for the minimal-norm solution,
    like np.linalg.lstsq on the one-hot matrix: codewords no vector uses come out as exact zeros, and the
    shifts between tables that leave every reconstruction unchanged are resolved to the smallest norm.

    Args:
      codes: (n, M) codes, or (n, 1 + M) with list ids in column 0 when centroids is given.
      x: (n, d) vectors in raw units (a memmap is read chunk by chunk).
      K: codebook size.
      centroids: (nlist, d) IVF centroids in raw units, or None.
      rtol: eigenvalues of G below rtol * max are treated as zero.

    Returns:
      (M, K, d) float32 tables.
    """
    x = checks.vectors(x, None, "training vectors")
    if centroids is not None:
        centroids = np.asarray(checks.vectors(centroids, x.shape[1], "IVF centroids"), np.float64)
    codes = np.asarray(codes) if not isinstance(codes, np.ndarray) else codes
    if codes.ndim != 2 or codes.shape[0] != x.shape[0]:
        raise QincoInputError(f"codes {codes.shape} and vectors {x.shape} must have one row per vector")
    n, d = x.shape
    M = codes.shape[1] - (centroids is not None)
    MK = M * K
    gram = np.zeros(MK * MK, np.int64)
    rhs = np.zeros((MK, d), np.float64)
    offsets = (np.arange(M) * K)[None, :]
    chunk = checks.batch_size(chunk, "chunk")
    with Progress(n, desc="lstsq", enabled=progress) as bar:
        for i in range(0, n, chunk):
            c, lists = split_codes(codes[i:i + chunk], K, centroids)
            checks.finite_chunk(np.asarray(x[i:i + chunk]), i, "training vectors")
            t = targets(x[i:i + chunk], lists, centroids)
            flat = c.astype(np.int64) + offsets  # (b, M) column in the one-hot matrix
            gram += np.bincount((flat[:, :, None] * MK + flat[:, None, :]).ravel(), minlength=MK * MK)
            rhs += sum_rows_by_label(flat.ravel(), np.repeat(t, M, axis=0), MK)[0]
            bar.update(t.shape[0])
    gram = gram.reshape(MK, MK)
    used = np.flatnonzero(np.diag(gram) > 0)
    G = gram[np.ix_(used, used)].astype(np.float64)
    w, V = np.linalg.eigh(G)
    keep = w > rtol * max(w.max(initial=0.0), 1.0)
    T = np.zeros((MK, d), np.float64)
    T[used] = V[:, keep] @ ((V[:, keep].T @ rhs[used]) / w[keep][:, None])
    return T.reshape(M, K, d).astype(np.float32)


def additive_decode(tables: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """sum_m tables[m, codes[:, m]]: (n, d) float32 additive reconstruction of (n, M) codes."""
    codes = np.asarray(codes)
    out = np.zeros((codes.shape[0], tables.shape[2]), np.float32)
    for m in range(codes.shape[1]):
        out += tables[m][codes[:, m]]
    return out


def additive_norms(tables: np.ndarray, codes: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """(n,) float32 squared norms of the additive reconstructions of (n, M) codes, chunk by chunk."""
    out = np.empty(codes.shape[0], np.float32)
    for i in range(0, codes.shape[0], chunk):
        r = additive_decode(tables, np.asarray(codes[i:i + chunk]))
        out[i:i + r.shape[0]] = np.einsum("nd,nd->n", r, r)
    return out


def additive_distances(tables: np.ndarray, xq: np.ndarray, codes: np.ndarray,
                       centroids: np.ndarray | None = None) -> np.ndarray:
    """Brute-force reference: ||q - (c[list] + sum_m T_m[i_m])||^2 for each query and each of its candidate code
    rows (nq, k, M (+1)); float64."""
    xq = np.asarray(xq, np.float64)
    nq, k = codes.shape[:2]
    flat = codes.reshape(nq * k, -1)
    if centroids is not None:
        rec = np.asarray(centroids, np.float64)[flat[:, 0]] + additive_decode(tables, flat[:, 1:])
    else:
        rec = additive_decode(tables, flat).astype(np.float64)
    diff = xq[:, None, :] - rec.reshape(nq, k, -1)
    return np.einsum("qkd,qkd->qk", diff, diff)
