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


def _mirror_hidden(up: np.ndarray, down: np.ndarray) -> None:
    """Hidden units in pairs: equal up-projection columns and opposite down-projection rows, so that
    down(relu(up z)) = 0 (to rounding) while every entry of both gets a gradient (in place)."""
    half = up.shape[1] // 2
    up[:, half:] = up[:, :half]
    down[half:] = -down[:half]


def _annihilator(up: np.ndarray, down: np.ndarray, rng: np.random.Generator) -> None:
    """A residual block z + down(relu(up z)) = z minus its antisymmetric part (z_i - z_{i+e/2}) / 2
    pairs, i.e. 0 on the antisymmetric vectors [a, -a] (in place; needs h >= e, both even).

    Hidden units come in pairs (u, -u): relu(u) V - relu(-u) V = u V, so the block is linear here,
    and up = [B R, -B R], down = [-R^T B^T; R^T B^T] with B the orthonormal basis of the antisymmetric
    vectors and R random with orthonormal rows give z + z U V = z - B B^T z."""
    e, h = up.shape
    half_e, half_h = e // 2, h // 2
    basis = np.zeros((e, half_e), np.float64)
    basis[np.arange(half_e), np.arange(half_e)] = 2**-0.5
    basis[np.arange(half_e) + half_e, np.arange(half_e)] = -(2**-0.5)
    r = np.linalg.qr(rng.standard_normal((half_h, half_e)))[0].T  # (e/2, h/2), orthonormal rows
    u = basis @ r
    up[:, :half_h], up[:, half_h:] = u, -u
    down[:half_h], down[half_h:] = -u.T, u.T


def mirror_possible(cfg: QincoConfig) -> bool:
    """Whether identity_steps can give every parameter a gradient: even hidden widths, and for QINCo2
    an even embedding width, with h >= de when there are no projections (de == d)."""
    if cfg.h % 2 and (cfg.L or cfg.lowrank):
        return False
    if cfg.variant != "qinco2":
        return True
    if cfg.emb % 2:
        return False
    return cfg.emb != cfg.d or (cfg.L > 0 and cfg.h >= cfg.emb)


def identity_steps(cfg: QincoConfig, params: dict, seed: int = 0) -> dict:
    """Parameters whose every step returns its codeword, f(c, xhat) = c (to float rounding), so that
    decoding is the plain RQ of the codebooks (`--init rq-exact`), while every parameter of every step
    gets a non-zero gradient at the first training step (where `mirror_possible`; otherwise the
    inner paths are zeroed and the layers before them start with no gradient).

    QINCo v1: the concat block is zero (it still gets a gradient, from its inputs) and each residual
    block's hidden units come in mirrored pairs (`_mirror_hidden`) that cancel. QINCo-LR: the concat
    block's rank-h product is mirrored the same way. QINCo2 with projections (de != d): P_in = [Q, -Q]
    makes the embedding antisymmetric between its halves, the concat block starts at zero (its own
    init), the residual blocks are mirrored pairs, and P_out = [P; P] maps every antisymmetric vector
    to 0. QINCo2 without projections: the concat block's codeword half is [W, -W] - I, so the
    embedding is the antisymmetric c [W, -W]; the blocks before the last are mirrored pairs and the
    last removes the antisymmetric part exactly (`_annihilator`).
    """
    params = jax.tree.map(np.array, jax.device_get(params))  # writable host copies
    mirror = mirror_possible(cfg)
    rng = np.random.default_rng(seed)
    for m in range(1, cfg.num_codes):
        step = params[f"step_{m}"]
        blocks = [step[f"block_{l}"] for l in range(cfg.L)]
        for l, block in enumerate(blocks):
            up, down = block["up"]["kernel"], block["down"]["kernel"]
            if not mirror:
                down[:] = 0
                continue
            if cfg.variant == "qinco2" and not down.any():  # QINCo2 inits it to zero: torch's uniform
                down[:] = rng.uniform(-1, 1, down.shape) / np.sqrt(down.shape[0])
            if cfg.variant == "qinco2" and cfg.emb == cfg.d and l == cfg.L - 1:
                _annihilator(up, down, rng)
            else:
                _mirror_hidden(up, down)
        if cfg.variant == "qinco2":
            e = cfg.emb
            kernel = step["concat"]["kernel"]
            kernel[:], step["concat"]["bias"][:] = 0, 0
            if not mirror:
                kernel[:e] = -np.eye(e, dtype=np.float32)
            elif e == cfg.d:
                w = rng.uniform(-1, 1, (e, e // 2)) * np.sqrt(6.0 / e)
                kernel[:e] = np.concatenate([w, -w], axis=1) - np.eye(e)
            else:
                p_in, p_out = step["in_proj"]["kernel"], step["out_proj"]["kernel"]
                p_in[:, e // 2 :] = -p_in[:, : e // 2]
                p_out[e // 2 :] = p_out[: e // 2]
        elif cfg.lowrank:
            if mirror:
                _mirror_hidden(step["concat_in"]["kernel"], step["concat_out"]["kernel"])
            else:
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


INITS = ("original", "rq-exact")
INIT_ALIASES = {"default": "original"}  # the original init's name before rq-exact became the training default


def init_name(init: str) -> str:
    """The init's name, with the old alias "default" read as "original"."""
    return INIT_ALIASES.get(init, init) if isinstance(init, str) else init


CODEBOOK_NOISE = 0.1  # QINCo2's codebook_noise_init


def init_codec(cfg: QincoConfig, xt, *, seed: int = 0, rq_beam_size: int = 1, scale: float | None = None,
               init: str = "original", centroids=None, rq_nt: int = RQ_NT) -> Codec:
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
      init: "original" (the originals'; "default" is an old name for it) or "rq-exact".
      centroids: IVF centroids in raw units (IVF only).
      rq_nt: the RQ (and the IVF k-means) train on all of xt when it holds at most rq_nt vectors
        (the original's case, 500k by default), else on a fixed random sample of rq_nt of them.
    """
    from qinco_jax import data, faiss_ops

    init = init_name(init)
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
    if cfg.variant == "qinco2" and init == "original":
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal(codebooks.shape).astype(np.float32)
        codebooks = codebooks + noise * codebooks.std(axis=(1, 2), keepdims=True) * np.float32(CODEBOOK_NOISE)
    params = with_codebooks(init_params(cfg, jax.random.key(seed)), codebooks, c_scaled)
    if init == "rq-exact":
        params = identity_steps(cfg, params, seed)
    return Codec(cfg, jax.device_get(params), norm)
