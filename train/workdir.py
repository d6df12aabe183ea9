"""A training run's workdir: its files, preparing it (or tidying a killed run's), and what a run
knows besides its arrays (RunMeta, saved beside every training checkpoint)."""

from __future__ import annotations

import os
import shutil
from typing import NamedTuple

import jax
import numpy as np

import qinco_jax as qj
from qinco_jax import checkpoint
from qinco_jax.files import write_json
from train.config import TrainConfig

METRICS = "metrics.jsonl"
CENTROIDS = "ivf_centroids.npy"  # an IVF run's centroids (raw units), as used to initialise it
SUMMARY = "summary.json"
PLOT = "training.png"
BEST = checkpoint.BEST


class RunMeta(NamedTuple):
    """What a run knows besides its arrays (saved as JSON beside every training checkpoint)."""

    epoch: int  # last completed epoch: 0 once the initial model is evaluated, then 1 .. --epochs (-1 before)
    scale: float
    best_val: float | None
    best_epoch: int | None
    val0: float  # validation MSE before optimisation
    stopped: bool  # the learning rate fell below training.MIN_LR
    shift: list | None = None  # QINCo2's per-dimension mean (normalisation); None for QINCo v1
    initial_epoch: bool = False  # epoch 0 is the initial model (False: a run numbered from 0 by trained epochs)

    def norm(self) -> qj.Norm:
        """The run's normalisation (QINCo v1: the data scale; QINCo2: mean and std)."""
        return qj.Norm(None if self.shift is None else np.asarray(self.shift, np.float32), self.scale)


def _clean_leftovers(workdir: str) -> None:
    """Temporary files and directories of writes that a kill interrupted (orbax cleans its own)."""
    for entry in os.listdir(workdir):
        if entry.endswith(".tmp"):
            os.unlink(os.path.join(workdir, entry))
    checkpoint.recover_save(os.path.join(workdir, BEST))


def prepare_workdir(cfg: TrainConfig) -> str:
    """Create the workdir, or tidy an existing run's; an existing run is an error unless resuming."""
    workdir = os.path.abspath(cfg.workdir)
    has_run = os.path.exists(os.path.join(workdir, "config.json"))
    if has_run and not cfg.resume:
        raise FileExistsError(f"{workdir} already holds a run: pass --resume to continue it or choose another --workdir")
    if cfg.resume and not has_run:
        raise FileNotFoundError(f"--resume: {workdir} holds no run to resume")
    if jax.process_count() > 1:  # every process has looked before process 0 writes
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("qinco_jax workdir checked")
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        _clean_leftovers(workdir)
        if not has_run:
            write_json(os.path.join(workdir, "config.json"), cfg.to_dict())
    return workdir


def clear_attempt(workdir: str) -> None:
    """Outputs of an attempt that never completed an epoch's checkpoint (they are redone)."""
    if jax.process_index() == 0:
        for name in (METRICS, SUMMARY, PLOT):
            if os.path.exists(os.path.join(workdir, name)):
                os.unlink(os.path.join(workdir, name))
        shutil.rmtree(os.path.join(workdir, BEST), ignore_errors=True)


def finished(cfg: TrainConfig, meta: RunMeta) -> bool:
    """The run trained its --epochs, or stopped when the learning rate fell below the minimum."""
    return meta.stopped or meta.epoch >= cfg.epochs
