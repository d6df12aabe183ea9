"""The epochs of a training run: one pass over the training vectors (train_epoch), its checks, and
what follows it (end_of_epoch: validation, the plateau schedule, the best codec, metrics and the
checkpoint), repeated by `fit` until --epochs or until the learning rate falls below the minimum.

Epoch 0 is the initial model, before any step: it is validated, written to metrics.jsonl and
exported as the best codec so far, so that the exported codec is never worse on validation than the
quantizer the run started from. Trained epochs are numbered 1 .. --epochs."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, NamedTuple

import jax
import numpy as np

import qinco_jax as qj
from qinco_jax import checkpoint, data, recipe, training
from qinco_jax.progress import Progress
from train.config import TrainConfig
from train.workdir import BEST, METRICS, RunMeta


class TrainingError(RuntimeError):
    """Training cannot go on (the loss or a parameter became NaN or inf)."""


class LoopState(NamedTuple):
    """The whole state of the training loop: model and Adam state, plateau schedule, run metadata."""

    train: training.TrainState
    plateau: Any  # training.PlateauState
    meta: RunMeta

    def arrays(self) -> dict:
        """The part saved by orbax."""
        return {"train": self.train, "plateau": self.plateau}


def val_mse(codec: qj.Codec, xval) -> float:
    """Mean per-vector squared error of greedy encoding, raw units (the original's compute_MSE)."""
    return float(qj.encode_with_error(codec, xval)[1].mean())


def _global_batch(xt, idx: np.ndarray, batch: int, norm: qj.Norm):
    """This process's share of the (padded) global batch: normalised vectors and 0/1 weights."""
    n, P, p = len(idx), jax.process_count(), jax.process_index()
    full = np.zeros(batch, np.int64)
    full[:n] = idx
    w = (np.arange(batch) < n).astype(np.float32)
    share = slice(p * batch // P, (p + 1) * batch // P)
    rows = full[share]
    order = np.argsort(rows)  # sorted reads are kinder to memory-mapped files
    x = np.empty((len(rows), xt.shape[1]), np.float32)
    x[order] = np.asarray(xt[rows[order]], np.float32)
    if norm.shift is not None:
        x -= norm.shift
    return x * np.float32(1.0 / norm.scale), w[share]


def batch_lr(cfg: TrainConfig, mcfg: qj.QincoConfig, lr: float, epoch: int, i: int, nbatch: int) -> float:
    """The step size of batch i of trained epoch `epoch` (1, 2, ...): QINCo v1's epoch lr, or QINCo2's
    warm-up + cosine at the fractional epoch (epoch - 1) + (i+1)/nbatch (the original counts from 0)."""
    if mcfg.variant != "qinco2":
        return lr
    return cfg.lr * recipe.lr_factor(epoch - 1 + (i + 1) / nbatch, cfg.epochs)


def train_epoch(cfg: TrainConfig, mcfg: qj.QincoConfig, state, xt, epoch: int, lr: float, norm: qj.Norm):
    """Trained epoch `epoch` (1, 2, ...): one pass over xt in (seed, epoch - 1)-shuffled global batches
    (the original's epoch index counts from 0); returns (mean batch loss, host state).

    QINCo2: the step size follows the schedule batch by batch, and codewords unused during the epoch
    (counted over all devices) are reset at its end (spec 3.6).
    """
    v2 = mcfg.variant == "qinco2"
    # the step searches codes with --train-A / --train-B where given (the model keeps its own search)
    step, n_local = training.train_step(cfg.training_model(mcfg.d), stats=v2), jax.local_device_count()
    dev_state = training.replicate(state)
    nt = xt.shape[0]
    nbatch = -(-nt // cfg.batch_size)
    losses, pending, stats = [], None, None
    show = cfg.progress and jax.process_index() == 0
    with Progress(nbatch, desc=f"epoch {epoch}", enabled=show) as bar:
        for i, idx in enumerate(data.batches(nt, cfg.batch_size, cfg.seed, epoch - 1)):
            x, w = _global_batch(xt, idx, cfg.batch_size, norm)
            out = step(dev_state, *training.shard_batch(x, w, n_local), batch_lr(cfg, mcfg, lr, epoch, i, nbatch))
            dev_state, loss = out[:2]
            if v2:
                stats = recipe.add_stats(stats, jax.tree.map(lambda a: a[0], out[2]))
            if pending is not None:
                losses.append(float(pending[0]))
                bar.update(1, loss=float(np.mean(losses)))
            pending = loss
        losses.append(float(pending[0]))
        bar.update(1, loss=float(np.mean(losses)))
    state = training.unreplicate(dev_state)
    if v2:
        params, _ = recipe.reset_dead_codes(mcfg, state.params, jax.device_get(stats), cfg.seed, epoch - 1)
        state = state._replace(params=params)
    return float(np.mean(losses)), state


def check_finite(epoch: int, loss: float, params) -> None:
    """TrainingError when the epoch's loss or a parameter is NaN or inf (nothing of it is saved)."""
    bad = None if math.isfinite(loss) else f"the training loss is {loss}"
    if bad is None:
        name = checkpoint.nonfinite_param(params)
        bad = None if name is None else f"parameter {name} holds NaN or inf values"
    if bad:
        raise TrainingError(
            f"epoch {epoch}: {bad}. Training diverged; nothing of this epoch was saved (the best codec and the "
            "checkpoints are those of earlier epochs). Try a lower --lr."
        )


def end_of_epoch(cfg, ds, state: LoopState, epoch, train_loss, lr, t0, workdir, ckpts, log, val=None) -> LoopState:
    """Validate, step the plateau schedule, keep the best codec, log and checkpoint.

    Epoch 0 is the initial model (train_loss and lr None; val may be given, already computed): it is
    the first candidate for the best codec, but it does not enter the plateau schedule, which starts
    from the first trained epoch as the original v1's does.
    """
    mcfg = cfg.model(ds.d)
    meta = state.meta
    codec = qj.Codec(mcfg, state.train.params, meta.norm())
    val = val_mse(codec, ds.xval) if val is None else val
    if not math.isfinite(val):
        raise TrainingError(f"epoch {epoch}: the validation MSE is {val}. Training diverged; try a lower --lr.")
    v1 = mcfg.variant != "qinco2"  # QINCo2 follows its schedule, not the plateau
    trained = epoch > 0
    pl = state.plateau
    if v1 and trained:
        pl = jax.device_get(training.plateau().update({}, state.plateau, value=val)[1])
    best = meta.best_val is None or val <= meta.best_val
    meta = meta._replace(epoch=epoch)
    if best:
        meta = meta._replace(best_val=val, best_epoch=epoch)
    row = {"epoch": epoch, "lr": lr, "train_loss": train_loss, "val_mse": val, "seconds": time.time() - t0, "best": best}
    if not trained:
        row["initial"] = True  # the model before any step
    if jax.process_index() == 0:
        if best:
            qj.save(codec, os.path.join(workdir, BEST), overwrite=True)
        with open(os.path.join(workdir, METRICS), "a") as f:
            f.write(json.dumps(row) + "\n")
    next_lr = cfg.lr * float(pl.scale) if v1 else lr
    meta = meta._replace(stopped=v1 and trained and next_lr < training.MIN_LR)
    state = LoopState(state.train, pl, meta)
    ckpts.save(epoch, state.arrays(), meta._asdict())
    what = f"lr {lr:.1e}  train loss {train_loss:.6g}" if trained else "initial model, before any step"
    log(f"epoch {epoch:3d}  {what}  val MSE {val:.6g}{'  (best)' if best else ''}  {row['seconds']:.1f}s")
    if trained and next_lr < lr and not meta.stopped:
        log(f"val MSE did not improve for {training.PLATEAU_PATIENCE} epochs: lr -> {next_lr:.1e}")
    return state


def fit(cfg: TrainConfig, ds: data.Dataset, state: LoopState, workdir, ckpts, log) -> LoopState:
    """Trained epochs 1 .. --epochs (after the initial model's epoch 0), or until the learning rate
    falls below the minimum."""
    mcfg = cfg.model(ds.d)
    for epoch in range(state.meta.epoch + 1, cfg.epochs + 1):
        if state.meta.stopped:
            break
        lr = cfg.lr * float(state.plateau.scale)
        t0 = time.time()
        train_state = state.train
        if not cfg.persistent_adam and mcfg.variant != "qinco2":  # the original v1 re-creates Adam every epoch
            train_state = training.init_state(train_state.params, mcfg)
        loss, train_state = train_epoch(cfg, mcfg, train_state, ds.xt, epoch, lr, state.meta.norm())
        check_finite(epoch, loss, train_state.params)
        nbatch = -(-ds.xt.shape[0] // cfg.batch_size)
        lr = batch_lr(cfg, mcfg, lr, epoch, nbatch - 1, nbatch)  # QINCo2: the lr of the epoch's last batch
        state = end_of_epoch(cfg, ds, state._replace(train=train_state), epoch, loss, lr, t0, workdir, ckpts, log)
    if state.meta.stopped:
        log(f"learning rate below {training.MIN_LR:g}: stopping")
    return state
