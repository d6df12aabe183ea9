"""Codec initialisation as the originals: RQ codebooks trained on the data, the normalisation (QINCo v1's
data scale, QINCo2's mean and std), random layers, and the `rq-exact` identity steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qinco_jax import checks
from qinco_jax.codec import Codec, Norm
from qinco_jax.config import QincoConfig
from qinco_jax.model import init_params
from qinco_jax.runtime import assign_scaled


def with_codebooks(params: dict, codebooks: np.ndarray, centroids: np.ndarray | None = None) -> dict:
    """Replace the codebooks of a parameter tree (normalised domain); pre-selection codebooks, where
    the steps have them, get the same values (QINCo2 spec 1.2).

    Plain QINCo: codebooks (M, K, d) go to codebook0, step_1 .. step_{M-1}. IVF-QINCo: centroids
    (nlist, d) go to codebook0 and codebooks (M, K, d) to step_1 .. step_M.
    """
    params = dict(params)  # new containers: the caller's tree is left as it was
    if centroids is None:
        params["codebook0"], rest = jnp.asarray(codebooks[0], jnp.float32), codebooks[1:]
    else:
        params["codebook0"], rest = jnp.asarray(centroids, jnp.float32), codebooks
    for m, cb in enumerate(rest, start=1):
        step = dict(params[f"step_{m}"])
        step["codebook"] = jnp.asarray(cb, jnp.float32)
        if "presel_codebook" in step:
            step["presel_codebook"] = step["codebook"]
        params[f"step_{m}"] = step
    return params


def identity_steps(cfg: QincoConfig, params: dict) -> dict:
    """Parameters whose every step returns its codeword, f(c, xhat) = c exactly, so that decoding
    is the plain RQ of the codebooks (`--init rq-exact`).

    QINCo v1: the concat block and every block's down-projection are zero. QINCo2: the
    codeword half of the concat block is -I, cancelling z0 = P_in c exactly (its xhat half, its
    bias and the down-projections are zero), so the outer skip alone remains.
    """
    params = jax.tree.map(np.array, jax.device_get(params))  # writable host copies
    for m in range(1, cfg.num_codes):
        step = params[f"step_{m}"]
        for l in range(cfg.L):
            step[f"block_{l}"]["down"]["kernel"][:] = 0
        if cfg.variant == "qinco2":
            step["concat"]["kernel"][:] = 0
            step["concat"]["kernel"][: cfg.emb] = -np.eye(cfg.emb, dtype=np.float32)
            step["concat"]["bias"][:] = 0
        elif cfg.lowrank:
            step["concat_out"]["kernel"][:] = 0
        else:
            step["concat"]["kernel"][:] = 0
            step["concat"]["bias"][:] = 0
    return params


def data_scale(xt) -> float:
    """The original's db_scale: the maximum entry of the training set (signed, not max-abs), streamed."""
    from qinco_jax import data

    s = data.streamed_max(xt)
    if not np.isfinite(s) or s <= 0:
        raise checks.QincoInputError(
            f"the training data's maximum is {s}; the data scale must be positive: pass scale= explicitly"
        )
    return s


RQ_NT = 1_000_000  # the RQ initialisation trains on at most this many vectors (as QINCo2)
NORM_NT = 100_000  # QINCo2 normalisation statistics come from the first 100k training vectors


def mean_std(xt) -> Norm:
    """QINCo2's normalisation (spec 3.4): per-dimension mean, and one scalar std that is the original's
    numpy `x.std()`: the spread of all entries around their global mean (not around each dimension's
    mean, which is smaller when the dimensions' means differ)."""
    x = np.asarray(xt[:NORM_NT], np.float64)
    mean = x.mean(axis=0)
    std = float(x.std())
    if not np.isfinite(std) or std <= 0:
        raise checks.QincoInputError(f"the training data's standard deviation is {std}; it must be positive")
    return Norm(mean.astype(np.float32), std)


INITS = ("default", "rq-exact")
CODEBOOK_NOISE = 0.1  # QINCo2's codebook_noise_init


def init_codec(cfg: QincoConfig, xt, *, seed: int = 0, rq_beam_size: int = 1, scale: float | None = None,
               init: str = "default", centroids=None, rq_nt: int = RQ_NT) -> Codec:
    """A codec initialised as the originals: RQ codebooks trained on xt (raw units) and random layers.

    QINCo v1: codebooks divided by the data scale, torch-default linear layers. QINCo2: inputs
    normalised by mean and std, codebooks (RQ - mean) / std for step 0 and RQ / std after it, plus
    Gaussian noise of 0.1 x each table's std, copied into the pre-selection books (spec 1.2, 3.5).
    init="rq-exact": no noise, and every step returns its codeword, so the untrained codec is the RQ.
    IVF-QINCo (cfg.nlist > 0): codebook0 holds the centroids (raw units, (nlist, d); default: faiss
    k-means on xt with this seed), and the M-level RQ is trained on the residuals x - c[assign], where
    assign is the codec's own (exact) IVF assignment.

    Args:
      cfg: architecture.
      xt: (n, d) training vectors in raw units (a memmap is read in chunks, never converted whole).
      seed: seed of the random layers, of the codebook noise, of the RQ training sample (and of the IVF k-means).
      rq_beam_size: beam size of the faiss ResidualQuantizer that initialises the codebooks.
      scale: QINCo v1 data scale; default xt.max() as in the original (over all of xt).
      init: "default" (the originals') or "rq-exact".
      centroids: IVF centroids in raw units (IVF only).
      rq_nt: the RQ (and the IVF k-means) train on all of xt when it holds at most rq_nt vectors
        (the original's case, 500k by default), else on a fixed random sample of rq_nt of them.
    """
    from qinco_jax import data, faiss_ops

    if init not in INITS:
        raise checks.QincoInputError(f"init must be one of {INITS}, got {init!r}")
    xt = checks.vectors(xt, cfg.d, "training vectors")
    checks.finite(xt, "training vectors")
    checks.trainable(xt, cfg.K, "training vectors")
    if centroids is not None and not cfg.nlist:
        raise checks.QincoInputError("centroids are given but the config is not IVF (nlist = 0)")
    if cfg.variant == "qinco2":
        norm = mean_std(xt)
    else:
        norm = Norm(None, data_scale(xt) if scale is None else float(scale))
    inv = np.float32(1.0 / norm.scale)
    x = data.sample_rows(xt, rq_nt, seed)
    c_scaled = None
    if cfg.nlist:
        if centroids is None:
            if cfg.nlist > x.shape[0]:
                raise checks.QincoInputError(
                    f"k-means of nlist={cfg.nlist} centroids needs at least as many training vectors, got {x.shape[0]}"
                )
            centroids = faiss_ops.kmeans(x, cfg.nlist, seed)
        centroids = checks.centroids(centroids, cfg.d, cfg.nlist)
        c_scaled = (centroids if norm.shift is None else centroids - norm.shift) * inv
        assign = assign_scaled(c_scaled, x, inv, None, False, "training vectors", norm.shift)
        x -= centroids[assign]
    if rq_beam_size == 1:  # the original's default, level by level in bounded memory
        codebooks = faiss_ops.greedy_rq_codebooks(x, cfg.M, cfg.K, inplace=True)
    else:
        codebooks = faiss_ops.rq_codebooks(faiss_ops.train_rq(x, cfg.M, cfg.K, rq_beam_size))
    del x
    if norm.shift is not None and not cfg.nlist:  # steps after IVF work on residuals: no mean there
        codebooks[0] -= norm.shift
    codebooks = codebooks / np.float32(norm.scale)
    if cfg.variant == "qinco2" and init == "default":
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal(codebooks.shape).astype(np.float32)
        codebooks = codebooks + noise * codebooks.std(axis=(1, 2), keepdims=True) * np.float32(CODEBOOK_NOISE)
    params = with_codebooks(init_params(cfg, jax.random.key(seed)), codebooks, c_scaled)
    if init == "rq-exact":
        params = identity_steps(cfg, params)
    return Codec(cfg, jax.device_get(params), norm)
