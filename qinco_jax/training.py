"""Pure training pieces: the loss, the pmap data-parallel train step, the plateau schedule.

The global batch is split over every device of every process; each device computes the weighted
squared error of its share, and `lax.pmean` of the (rescaled) local losses and gradients gives
exactly the full-batch mean loss of the original (sum over the M prefixes, divided by B * d).
Padded rows (weight 0) let the last, partial batch keep the same shapes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import jax_utils

from qinco_jax import recipe, runtime
from qinco_jax.config import QincoConfig
from qinco_jax.model import Qinco

AXIS = runtime.AXIS
MIN_LR = 2e-6  # the original stops once the learning rate falls below this
PLATEAU_PATIENCE = 10  # validations without a new best before the learning rate is divided by 10


class TrainState(NamedTuple):
    params: dict
    opt_state: optax.OptState


def optimizer(cfg: QincoConfig | None = None) -> optax.GradientTransformation:
    """The update direction; the step size is applied in the train step (the lr changes during training).

    QINCo v1: Adam's moment estimates. QINCo2 (spec 3.2): each gradient entry clipped to +-0.1, then
    AdamW's direction (Adam + weight decay 0.1 on every parameter, codebooks included).
    IVF-QINCo: the centroids (codebook0) are frozen: their update is zero and Adam keeps no state for them.
    """
    adam = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)
    if cfg is not None and cfg.variant == "qinco2":
        adam = optax.chain(optax.clip(recipe.GRAD_CLIP), adam, optax.add_decayed_weights(recipe.WEIGHT_DECAY))
    return frozen_first(adam) if cfg is not None and cfg.nlist else adam


def frozen_first(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` on every parameter but codebook0, whose update is exactly zero (the frozen IVF table)."""

    def rest(tree):
        return None if tree is None else {k: v for k, v in tree.items() if k != "codebook0"}

    def init(params):
        return inner.init(rest(params))

    def update(updates, state, params=None):
        out, state = inner.update(rest(updates), state, rest(params))
        return {**out, "codebook0": jnp.zeros_like(updates["codebook0"])}, state

    return optax.GradientTransformation(init, update)


class PlateauState(NamedTuple):
    """The original scheduler's state: lr multiplier, best validation value, and two epoch counters."""

    scale: np.ndarray  # learning-rate multiplier (1, 0.1, 0.01, ...)
    best: np.ndarray  # lowest validation value so far (float64)
    since_best: np.ndarray  # values seen after the last one equal to the best
    since_update: np.ndarray  # values seen since the last reduction (or the start)


class Plateau:
    """The original's LR-on-plateau rule (spec v1 section 2.5), host-side.

    After each validation value: divide the lr by 10 when more than 10 values were seen since the
    last reduction and none of the last 10 equals the best so far (ties count as reaching it again:
    on [10, 9, 9, 9, ...] the lr never falls). Same interface as an optax transformation
    (init(params), update(updates, state, value=...)), with numpy state that orbax saves.
    """

    def init(self, params=None) -> PlateauState:
        return PlateauState(np.array(1.0, np.float32), np.array(np.inf), np.array(0), np.array(0))

    def update(self, updates, state: PlateauState, params=None, *, value) -> tuple:
        v = float(value)
        best, since_best = float(state.best), int(state.since_best) + 1
        if v <= best:
            best, since_best = v, 0
        scale, since_update = float(state.scale), int(state.since_update) + 1
        if since_update > PLATEAU_PATIENCE and since_best >= PLATEAU_PATIENCE:
            scale, since_update = scale * 0.1, 0
        return updates, PlateauState(np.array(scale, np.float32), np.array(best), np.array(since_best), np.array(since_update))


def plateau() -> Plateau:
    """LR /10 after 10 validations without reaching the best again, exactly as the original's scheduler."""
    return Plateau()


def _slice(cfg: QincoConfig, b: int) -> int:
    """Largest divisor of b not above the codec's inner sub-batch (cache-sized candidate tensors)."""
    sub = runtime._sub_batch(cfg, b)
    while b % sub:
        sub -= 1
    return sub


def search_codes(cfg: QincoConfig, params, x_BD):
    """Codes of the current model from its own beam search (the config's A, B; greedy for A = 0, B = 1),
    without gradient, in cache-sized slices: those of `qinco_jax.encode` at the same A, B.

    IVF: the list ids are assigned on the whole local batch first (the centroids are frozen, so this
    equals the original's precomputed assignment), then the steps run slice by slice.
    """
    model, (b, d) = Qinco(cfg), x_BD.shape
    sub = _slice(cfg, b)
    params = jax.tree.map(lambda a: jax.lax.stop_gradient(jnp.asarray(a)), params)
    xs = x_BD.reshape(b // sub, sub, d)
    if cfg.nlist:
        code0 = model.apply({"params": params}, x_BD, method=Qinco.assign).reshape(b // sub, sub)
        one = lambda a: model.apply({"params": params}, *a, method=Qinco.encode)[0]  # noqa: E731
        return jax.lax.map(one, (xs, code0)).reshape(b, cfg.num_codes)
    one = lambda xb: model.apply({"params": params}, xb, method=Qinco.encode)[0]  # noqa: E731
    return jax.lax.map(one, xs).reshape(b, cfg.M)


def loss_terms(cfg: QincoConfig, params, x_BD, w_B):
    """(weighted sum of the per-vector errors summed over prefixes, sum of weights).

    The original's forward pass: codes of the model's search (search_codes; no gradient flows through
    the argmin), then the differentiable re-decoding, with every prefix's squared error (IVF: the
    prefix-1 error, the IVF error, is in the sum but carries no gradient). QINCo2: the codes come from
    the model's own beam search (A, B of the config), and the pre-selection books add their RQ-style
    term (spec 3.1).
    """
    return loss_and_stats(cfg, params, x_BD, w_B)[:2]


def loss_and_stats(cfg: QincoConfig, params, x_BD, w_B, stats: bool = False):
    """loss_terms and, with stats=True, the batch's code usage and residual-target sums (recipe.usage_stats)."""
    codes = search_codes(cfg, params, x_BD)
    xhats = Qinco(cfg).apply({"params": params}, codes, method=Qinco.decode_prefixes)
    err_B = sum(jnp.sum(jnp.square(xh - x_BD), axis=-1) for xh in xhats)
    if cfg.preselect:
        err_B = err_B + recipe.preselection_error(cfg, params, codes, xhats, x_BD)
    out = recipe.usage_stats(cfg, codes, xhats, x_BD, w_B) if stats else {}
    return jnp.sum(err_B * w_B), jnp.sum(w_B), out


def _device_step(cfg: QincoConfig, stats: bool, state: TrainState, x_BD, w_B, lr):
    tx = optimizer(cfg)

    def local_loss(params):
        err, count, aux = loss_and_stats(cfg, params, x_BD, w_B, stats)
        total = jax.lax.psum(count, AXIS)
        n_dev = jax.lax.psum(1, AXIS)
        # pmean over devices of this equals the global sum / (global count * d)
        return err * n_dev / (jnp.maximum(total, 1.0) * cfg.d), aux

    (loss, aux), grads = jax.value_and_grad(local_loss, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, AXIS)
    loss = jax.lax.pmean(loss, AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, jax.tree.map(lambda u: -lr * u, updates))
    if stats:  # counted over every device of every process (spec 3.6's reset, done globally)
        return TrainState(params, opt_state), loss, jax.lax.psum(aux, AXIS)
    return TrainState(params, opt_state), loss


@functools.lru_cache(maxsize=8)
def train_step(cfg: QincoConfig, devices: tuple | None = None, stats: bool = False):
    """pmap-ed step(state, x (n_local_dev, b, d), w (n_local_dev, b), lr) -> (state, loss per device).

    devices: the local devices to use (default: all of them, and on every process).
    stats: also return the batch's code usage and residual-target sums, summed over all devices
    (QINCo2's dead-codeword reset).
    """
    return jax.pmap(
        functools.partial(_device_step, cfg, stats),
        axis_name=AXIS,
        in_axes=(0, 0, 0, None),
        donate_argnums=(0,),
        devices=list(devices) if devices else None,
    )


def init_state(params, cfg: QincoConfig | None = None) -> TrainState:
    """Fresh Adam state for params (host arrays); pass cfg for an IVF model (frozen centroids)."""
    return TrainState(params, optimizer(cfg).init(params))


def replicate(state: TrainState, devices: tuple | None = None) -> TrainState:
    """Copy a host state onto every local device (leading device axis), laid out as the pmap step's
    own outputs, so the step compiles once rather than once more for its second call."""
    return runtime.stacked_replicate(state, runtime.local_devices(devices or None))


def unreplicate(state: TrainState) -> TrainState:
    """Host copy of the first device's state."""
    return jax.device_get(jax_utils.unreplicate(state))


def shard_batch(x_BD: np.ndarray, w_B: np.ndarray, n_dev: int):
    """Reshape this process's share of the global batch to (n_dev, b, ...)."""
    b = x_BD.shape[0] // n_dev
    return x_BD.reshape(n_dev, b, x_BD.shape[1]), w_B.reshape(n_dev, b)


def check_batch(global_batch: int, n_devices: int) -> None:
    if global_batch % n_devices:
        raise ValueError(
            f"the global batch size {global_batch} does not split evenly over {n_devices} devices; "
            f"use a --batch-size that is a multiple of {n_devices}"
        )
