"""Built-in synthetic demo data: a structured, non-negative distribution with exact ground truth."""

from __future__ import annotations

import numpy as np

from qinco_jax.checks import QincoInputError
from qinco_jax.data.datasets import Dataset



def _synthetic_map(d: int, seed: int) -> dict[str, np.ndarray]:
    """Parameters of the distribution: a cluster mixture in a q-dim latent space and a random MLP lift to d."""
    rng = np.random.default_rng([seed, 0x51C0])
    q, C, h = min(d, 8), 48, 4 * d
    return dict(
        centers=rng.normal(size=(C, q)) * 1.5,
        scales=np.exp(rng.uniform(np.log(0.1), np.log(0.8), size=C)),  # clusters of very different spread
        shapes=rng.normal(size=(C, q, q)) / np.sqrt(q),  # and different anisotropic covariances
        weights=rng.dirichlet(np.full(C, 1.0)),
        w1=rng.normal(size=(q, h)) / np.sqrt(q), b1=rng.normal(size=h) * 0.5,
        w2=rng.normal(size=(h, d)) * (2.0 / np.sqrt(h)), b2=rng.normal(size=d) * 0.5,
    )


def _synthetic_draw(p: dict[str, np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    """n i.i.d. points: latent cluster sample, curved by tanh, lifted to d, made non-negative by softplus."""
    c = rng.choice(len(p["weights"]), size=n, p=p["weights"])
    eps = rng.normal(size=(n, p["centers"].shape[1]))
    z = p["centers"][c] + p["scales"][c, None] * np.einsum("nq,nqr->nr", eps, p["shapes"][c])
    u = np.tanh(z @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    u += 0.05 * rng.normal(size=u.shape)
    return (16.0 * np.logaddexp(0.0, u)).astype(np.float32)


def _knn_ids(xq: np.ndarray, xb: np.ndarray, k: int) -> np.ndarray:
    """Exact L2 k-NN ids (nq, k) int64 of xq in xb."""
    from qinco_jax import faiss_ops

    return faiss_ops.knn(xq, xb, k)[1].astype(np.int64)


def synthetic(
    d: int = 32, nt: int = 20_000, nval: int = 2_000, nb: int = 20_000, nq: int = 1_000, seed: int = 0
) -> Dataset:
    """Deterministic structured demo data (float32, non-negative) with exact ground truth (k = min(100, nb))."""
    if d < 1 or nt < 1 or min(nval, nb, nq, seed) < 0:
        raise QincoInputError(f"synthetic needs d, nt >= 1 and nval, nb, nq, seed >= 0; got {d=}, {nt=}, {nval=}, "
                              f"{nb=}, {nq=}, {seed=}")
    p = _synthetic_map(d, seed)
    sizes = (nt, nval, nb, nq)
    xt, xval, xb, xq = (_synthetic_draw(p, n, np.random.default_rng([seed, i + 1])) for i, n in enumerate(sizes))
    xb, xq = (x if len(x) else None for x in (xb, xq))
    gt = None if xb is None or xq is None else _knn_ids(xq, xb, min(100, nb))
    return Dataset("synthetic", xt, xval, xb, xq, gt)
