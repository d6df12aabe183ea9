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


# ----------------------------------------------------------------------------------------------
# QINCo2 (and v1 in the same search): step network and beam search, one vector at a time


def step2_f(sp: dict, c: np.ndarray, xhat: np.ndarray, L: int) -> np.ndarray:
    """QINCo2's f(c, xhat) = c + P_out(blocks(z0 + W_cat [z0; xhat] + b)), z0 = P_in c (float64)."""
    c, xhat = np.asarray(c, np.float64), np.asarray(xhat, np.float64)
    z0 = c @ sp["in_proj"]["kernel"] if "in_proj" in sp else c
    z = z0 + np.concatenate([z0, xhat], axis=-1) @ sp["concat"]["kernel"] + sp["concat"]["bias"]
    for l in range(L):
        b = sp[f"block_{l}"]
        z = z + np.maximum(z @ b["up"]["kernel"], 0) @ b["down"]["kernel"]
    return c + (z @ sp["out_proj"]["kernel"] if "out_proj" in sp else z)


def step_f(params: dict, m: int, c, xhat, L: int, variant: str, lowrank: bool = False):
    sp = params[f"step_{m}"]
    return step2_f(sp, c, xhat, L) if variant == "qinco2" else _step_f(sp, c, xhat, L, lowrank)


def decode_any(params: dict, codes: np.ndarray, L: int, variant: str, lowrank: bool = False) -> np.ndarray:
    """Reconstruction of either family from the first codes.shape[1] codes, in float64."""
    xhat = np.asarray(params["codebook0"], np.float64)[codes[:, 0]]
    for m in range(1, codes.shape[1]):
        c = np.asarray(params[f"step_{m}"]["codebook"], np.float64)[codes[:, m]]
        xhat = xhat + step_f(params, m, c, xhat, L, variant, lowrank)
    return xhat


def beam_encode(params: dict, x: np.ndarray, M: int, L: int, variant: str, A: int, B: int):
    """The spec's beam search (2.1), written plainly: per vector, a list of (error, codes, xhat) beams.

    Pre-selection keeps, per beam, the A codes nearest to the residual in the step's pre-selection
    book (A = 0: all K); the F_in * A candidates of a vector are pooled and the B best kept (1 at
    the last step). Stable sorts: the first candidate wins ties.
    """
    x = np.asarray(x, np.float64)
    cb0 = np.asarray(params["codebook0"], np.float64)
    K = cb0.shape[0]
    out_codes, out_xhat = [], []
    for xv in x:
        d0 = ((xv - cb0) ** 2).sum(1)
        keep = np.argsort(d0, kind="stable")[: 1 if M == 1 else min(B, K)]
        beams = [((k,), cb0[k]) for k in keep]
        for m in range(1, M):
            sp = params[f"step_{m}"]
            C = np.asarray(sp["codebook"], np.float64)
            cands = []
            for codes, xhat in beams:
                r = xv - xhat
                if A:
                    pre = np.asarray(sp["presel_codebook"], np.float64)
                    ids = np.argsort(((r - pre) ** 2).sum(1), kind="stable")[:A]
                else:
                    ids = np.arange(K)
                new = xhat + step_f(params, m, C[ids], np.repeat(xhat[None], len(ids), 0), L, variant)
                for k, xn in zip(ids, new):
                    cands.append((((xv - xn) ** 2).sum(), codes + (int(k),), xn))
            order = np.argsort([c[0] for c in cands], kind="stable")
            F = 1 if m == M - 1 else min(B, len(cands))
            beams = [(cands[i][1], cands[i][2]) for i in order[:F]]
        out_codes.append(beams[0][0])
        out_xhat.append(beams[0][1])
    return np.array(out_codes), np.array(out_xhat)
