"""An independent numpy implementation of QINCo v1 and IVF-QINCo (the original's naive formulation), for tests.

IVF (ivf=True): codebook0 is the centroid table, searched exhaustively, and steps step_1 .. step_M follow
(M neural steps, codes with M + 1 columns); plain QINCo has steps step_1 .. step_{M-1}.
"""

from __future__ import annotations

import numpy as np


def _step_f(sp: dict, c: np.ndarray, xhat: np.ndarray, L: int, lowrank: bool) -> np.ndarray:
    """f(c, xhat) = c + concat([c, xhat]) followed by L residual blocks, computed on the full concat."""
    cc = np.concatenate([c, xhat], axis=-1).astype(np.float64)
    if lowrank:
        z = c + cc @ sp["concat_in"]["kernel"] @ sp["concat_out"]["kernel"]
    else:
        z = c + cc @ sp["concat"]["kernel"] + sp["concat"]["bias"]
    for l in range(L):
        b = sp[f"block_{l}"]
        z = z + np.maximum(z @ b["up"]["kernel"], 0) @ b["down"]["kernel"]
    return z


def encode(params: dict, x: np.ndarray, M: int, L: int, lowrank: bool = False, ivf: bool = False):
    """Greedy encoding in float64: all K candidates per step, squared L2, first index on ties."""
    x = x.astype(np.float64)
    cb0 = np.asarray(params["codebook0"], np.float64)
    code = np.array([((xi - cb0) ** 2).sum(-1).argmin() for xi in x], np.int64)  # one row at a time
    xhat, codes = cb0[code], [code]
    for m in range(1, M + ivf):
        sp = params[f"step_{m}"]
        C = np.asarray(sp["codebook"], np.float64)
        n, K = x.shape[0], C.shape[0]
        z = _step_f(sp, np.repeat(C[None], n, 0), np.repeat(xhat[:, None], K, 1), L, lowrank)
        cand = xhat[:, None, :] + z
        code = ((cand - x[:, None, :]) ** 2).sum(-1).argmin(1)
        xhat = cand[np.arange(n), code]
        codes.append(code)
    return np.stack(codes, 1), xhat


def decode(params: dict, codes: np.ndarray, L: int, lowrank: bool = False) -> np.ndarray:
    """Reconstruction from the first codes.shape[1] codes, in float64."""
    xhat = np.asarray(params["codebook0"], np.float64)[codes[:, 0]]
    for m in range(1, codes.shape[1]):
        sp = params[f"step_{m}"]
        c = np.asarray(sp["codebook"], np.float64)[codes[:, m]]
        xhat = xhat + _step_f(sp, c, xhat, L, lowrank)
    return xhat
