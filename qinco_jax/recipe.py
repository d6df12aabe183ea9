"""QINCo2's training recipe (spec 3): the pre-selection loss term, the learning-rate schedule fitted
to the number of epochs, code-usage statistics and the dead-codeword reset.

The optimizer (AdamW with per-element gradient clipping) is `training.optimizer(cfg)`; this module
holds what is QINCo2-specific and pure (jnp in the train step, numpy at epoch ends).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qinco_jax.config import QincoConfig

LR = 8e-4  # AdamW learning rate
WEIGHT_DECAY = 0.1
GRAD_CLIP = 0.1  # every gradient entry is clipped to [-0.1, 0.1] (clip by value, not by norm)
WARMUP_EPOCHS, COSINE_EPOCHS = 3, 60  # the original's schedule, scaled to the run's epochs
LR_FLOOR = 1e-3  # the floor factor the original means (lr_min_fact; it passes 8e-7 as a factor by mistake)
RESET_NOISE = 0.1 / 4  # pre-selection copy of a reset codeword: + N(0, 1) * std * 0.1 / 4


def lr_factor(t: float, epochs: int) -> float:
    """LR factor at fractional epoch t of a run of `epochs` epochs (spec 3.2, scaled).

    The original warms up linearly over 3 epochs, then decays by a quarter cosine over 60 (63 in
    all). Here both phases keep their share of the run: warm-up over 3/63 of `epochs`, then
    cos(pi/2 * progress) over the remaining 60/63, floored at LR_FLOOR.
    """
    warm = epochs * WARMUP_EPOCHS / (WARMUP_EPOCHS + COSINE_EPOCHS)
    if t < warm:
        f = t / warm
    else:
        f = math.cos(math.pi / 2 * min((t - warm) / (epochs - warm), 1.0))
    return max(f, LR_FLOOR)


def preselection_error(cfg: QincoConfig, params, codes_BM, xhats, x_BD):
    """Per vector, sum over networked steps of ||sg(xhat_{m-1}) + C~_m[i_m] - x||^2 (spec 3.1).

    The pre-selection books learn as plain RQ codebooks on the codes of the full encoder; the
    stop-gradient keeps this term from reaching the main model.
    """
    err = 0.0
    for m in range(1, cfg.num_codes):
        book = params[f"step_{m}"]["presel_codebook"]
        pred = jax.lax.stop_gradient(xhats[m - 1]) + book[codes_BM[:, m]]
        err = err + jnp.sum(jnp.square(pred - x_BD), axis=-1)
    return err


def usage_stats(cfg: QincoConfig, codes_BM, xhats, x_BD, w_B) -> dict:
    """Per step m: weighted code counts (M, K; IVF: of the M steps after the list id) and sums of the residual target
    x - xhat_{m-1} and of its square (num_codes, d) (xhat_{-1} = 0), and the weight total."""
    xhats = [jax.lax.stop_gradient(xh) for xh in xhats]
    prev = [jnp.zeros_like(x_BD)] + xhats[:-1]
    r = jnp.stack([x_BD - p for p in prev])  # (M, B, d)
    used = codes_BM[:, 1:] if cfg.nlist else codes_BM  # IVF list ids are not codewords
    onehot = jax.nn.one_hot(used.T, cfg.K, dtype=jnp.float32)  # (M, B, K)
    return {
        "counts": jnp.einsum("mbk,b->mk", onehot, w_B),
        "rsum": jnp.einsum("mbd,b->md", r, w_B),
        "rsq": jnp.einsum("mbd,b->md", r * r, w_B),
        "n": jnp.sum(w_B),
    }


def add_stats(a: dict | None, b: dict) -> dict:
    return b if a is None else jax.tree.map(jnp.add, a, b)


def reset_dead_codes(cfg: QincoConfig, params: dict, stats: dict, seed: int, epoch: int) -> tuple[dict, int]:
    """Replace the codewords no training vector used during the epoch (spec 3.6).

    stats: usage_stats summed over the epoch and over all devices (numpy). A dead codeword of step m
    becomes a standardised uniform draw scaled by the per-dimension std and shifted by the mean of
    that step's residual targets over the epoch; its pre-selection copy gets the same vector plus
    N(0, 1) * std * 0.1 / 4. IVF centroids are never reset. Seeded by (seed, epoch), so a resumed
    run resets exactly as an uninterrupted one. Returns (new params, number of codewords reset).
    """
    params = jax.tree.map(np.array, params)
    rng = np.random.default_rng([seed, epoch, 36])
    n = max(float(stats["n"]), 1.0)
    mean = np.asarray(stats["rsum"], np.float64) / n
    std = np.sqrt(np.maximum(np.asarray(stats["rsq"], np.float64) / n - mean**2, 0.0))
    counts = np.asarray(stats["counts"])
    total = 0
    first = 1 if cfg.nlist else 0
    for m in range(first, cfg.num_codes):
        dead = counts[m - first] == 0
        if not dead.any():
            continue
        u = rng.random((cfg.K, cfg.d))
        u = (u - u.mean()) / u.std()
        new = (u * std[m] + mean[m]).astype(np.float32)
        if m == 0:
            params["codebook0"][dead] = new[dead]
            total += int(dead.sum())
            continue
        step = params[f"step_{m}"]
        step["codebook"][dead] = new[dead]
        if "presel_codebook" in step:
            noise = rng.standard_normal((cfg.K, cfg.d)) * std[m] * RESET_NOISE
            step["presel_codebook"][dead] = (new + noise)[dead].astype(np.float32)
        total += int(dead.sum())
    return params, total
