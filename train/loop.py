"""The training job: the only stateful code (files, clock, logging). `run(cfg)` is importable for tests.

Here the run starts (data, IVF centroids, a fresh RQ-initialised state or the last checkpoint);
train.workdir keeps its files, train.epochs trains it and train.report sums it up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np

import qinco_jax as qj
from qinco_jax import checks, data, faiss_ops, training
from qinco_jax.checkpoint import TrainCheckpoints
from train.config import TrainConfig
from train.epochs import LoopState, end_of_epoch, fit, val_mse
from train.report import read_metrics, show_finished, summarize
from train.workdir import CENTROIDS, METRICS, SUMMARY, RunMeta, clear_attempt, finished, prepare_workdir


def init_distributed(cfg: TrainConfig) -> None:
    """jax.distributed.initialize(): auto-detected on SLURM / TPU pods, explicit flags otherwise."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    kwargs = {
        k: v
        for k, v in (
            ("coordinator_address", cfg.coordinator_address),
            ("num_processes", cfg.num_processes),
            ("process_id", cfg.process_id),
        )
        if v is not None
    }
    jax.distributed.initialize(**kwargs)


def load_data(cfg: TrainConfig) -> data.Dataset:
    """The training / validation (and optional database) vectors the config names."""
    if cfg.train:
        return data.load_files(cfg.train, cfg.db, cfg.queries, cfg.gt, nt=cfg.nt, nval=cfg.nval or 10_000, nb=cfg.nb)
    if cfg.dataset == "synthetic":
        kw = {k: v for k, v in (("nt", cfg.nt), ("nval", cfg.nval), ("nb", cfg.nb)) if v is not None}
        return data.synthetic(seed=0, **kw)
    return data.load_dataset(cfg.dataset, cfg.data_dir, nt=cfg.nt, nval=cfg.nval, nb=cfg.nb)


def ivf_setup(cfg: TrainConfig, ds: data.Dataset) -> tuple[TrainConfig, np.ndarray | None]:
    """Check the IVF flags of a new run; with --ivf-centroids, read the file and set cfg.ivf to its size.

    Returns (cfg, centroids in raw units or None when k-means is still to run or the model is plain).
    """
    if cfg.ivf < 0:
        raise qj.QincoInputError(f"--ivf must be a positive number of centroids, got {cfg.ivf}")
    if cfg.ivf_centroids:
        path = cfg.ivf_centroids
        c = checks.centroids(data.read_vectors(path, mmap=False), ds.d, what=f"--ivf-centroids {path}")
        if cfg.ivf and cfg.ivf != c.shape[0]:
            raise qj.QincoInputError(f"--ivf {cfg.ivf} disagrees with --ivf-centroids {path}, which holds {c.shape[0]} centroids")
        return dataclasses.replace(cfg, ivf=c.shape[0]), c
    if cfg.ivf > ds.xt.shape[0]:
        raise qj.QincoInputError(
            f"--ivf {cfg.ivf}: k-means needs at least as many training vectors as centroids, got nt={ds.xt.shape[0]}"
        )
    cfg.model(ds.d)  # a bad nlist is reported before anything runs
    return cfg, None


def fresh_start(cfg: TrainConfig, ds: data.Dataset, log, centroids, workdir: str,
                ckpts: TrainCheckpoints) -> LoopState:
    """RQ-initialised codec (IVF: after the centroids) and the loop state before the first trained epoch.

    The initial model is recorded as epoch 0: a metrics row, the best codec
    so far and a checkpoint (a run killed during epoch 1 resumes from it, without a new initialisation).
    """
    mcfg = cfg.model(ds.d)
    if mcfg.nlist and centroids is None:
        t0 = time.time()
        centroids = faiss_ops.kmeans(data.sample_rows(ds.xt, cfg.rq_nt, cfg.seed), mcfg.nlist, cfg.seed)
        log(f"IVF: k-means of {mcfg.nlist} centroids done in {time.time() - t0:.1f}s")
    if mcfg.nlist and jax.process_index() == 0:
        np.save(os.path.join(workdir, CENTROIDS), np.asarray(centroids, np.float32))
    t_init = t0 = time.time()
    what = f"IVF{mcfg.nlist} + RQ on the residuals" if mcfg.nlist else "RQ"
    starts = {}  # RQ training beam -> (codec, validation MSE)
    for beam in start_beams(cfg, mcfg):
        t1 = time.time()
        codec = qj.init_codec(mcfg, ds.xt, seed=cfg.seed, rq_beam_size=beam, centroids=centroids,
                              rq_nt=cfg.rq_nt, init=cfg.init)
        starts[beam] = codec, val_mse(codec, ds.xval)
        log(f"{what} {mcfg.M}x{int(np.log2(mcfg.K))} (RQ trained with beam {beam}) initialisation done in "
            f"{time.time() - t1:.1f}s; validation MSE {starts[beam][1]:.6g} under the model's search (A {mcfg.A}, B {mcfg.B})")
    beam = min(starts, key=lambda b: (starts[b][1], b))  # ties: the smaller beam
    codec, val0 = starts[beam]
    if len(starts) > 1:
        log(f"start: the RQ trained with beam {beam} (the lower validation MSE under the model's own search)")
    log(f"data scale {codec.scale:.6g}; {mcfg.num_params():,} trainable parameters")
    tcfg = cfg.training_model(mcfg.d)
    if (tcfg.A, tcfg.B) != (mcfg.A, mcfg.B):
        log(f"the training step searches with A {tcfg.A}, B {tcfg.B}; the codec keeps A {mcfg.A}, B {mcfg.B} for "
            "encoding and validation (--train-A / --train-B)")
    shift = None if codec.shift is None else [float(v) for v in codec.shift]
    meta = RunMeta(epoch=-1, scale=codec.scale, best_val=None, best_epoch=None, val0=val0, stopped=False, shift=shift,
                   initial_epoch=True)
    state = LoopState(training.init_state(codec.params, mcfg), training.plateau().init(codec.params), meta)
    return end_of_epoch(cfg, ds, state, 0, None, None, t_init, workdir, ckpts, log, val=val0)


def start_beams(cfg, mcfg) -> tuple[int, ...]:
    """The beams of the RQ trainings the initialisation tries: --rq-beam-size when given; else for
    `--init rq-exact` with a beam search (B > 1) both the greedy-trained RQ and the one trained with
    beam min(B, START_BEAM_MAX), of which the run keeps the lower validation MSE under the model's own
    search (neither wins everywhere: README, "A start as good as the search"); else greedy, as the
    originals."""
    if cfg.rq_beam_size is not None:
        return (cfg.rq_beam_size,)
    if cfg.init == "rq-exact" and mcfg.B > 1:
        return (1, min(mcfg.B, START_BEAM_MAX))
    return (1,)


START_BEAM_MAX = 8  # faiss's beam training grows with the beam (beam 8 on 50k vectors: about a minute here)


def renumbered(meta: RunMeta) -> RunMeta:
    """The metadata of a checkpoint written before epoch 0 was the initial model (its epochs counted
    trained epochs from 0) in today's numbering; anything else as it is."""
    if meta.initial_epoch:
        return meta
    best = None if meta.best_epoch is None else meta.best_epoch + 1
    return meta._replace(epoch=meta.epoch + 1, best_epoch=best, initial_epoch=True)


def restore(cfg: TrainConfig, ds: data.Dataset, ckpts: TrainCheckpoints, workdir: str, log) -> LoopState | None:
    """The state of the last completed epoch that can be read (None when there is none); metrics
    past it are dropped (they will be redone)."""
    mcfg = cfg.model(ds.d)
    params = jax.device_get(qj.model.init_params(mcfg, jax.random.key(0)))
    template = {"train": training.init_state(params, mcfg), "plateau": training.plateau().init(params)}
    for epoch in sorted(ckpts.steps(), reverse=True):
        try:
            arrays, meta = ckpts.restore(template, epoch)
            meta = renumbered(RunMeta(**{k: meta[k] for k in RunMeta._fields
                                         if k in meta or k not in RunMeta._field_defaults}))
        except Exception as e:  # a damaged checkpoint: fall back to the one before
            log(f"checkpoint of epoch {epoch} in {workdir} cannot be read ({type(e).__name__}: {str(e)[:200]}); "
                "trying an earlier one")
            continue
        if jax.process_index() == 0:
            rows = read_metrics(workdir, log)
            if rows and not rows[0].get("initial"):  # a run numbered by trained epochs from 0: renumber it
                rows = [{"epoch": 0, "lr": None, "train_loss": None, "val_mse": meta.val0, "seconds": 0.0,
                         "best": False, "initial": True}] + [{**r, "epoch": r["epoch"] + 1} for r in rows]
            keep = [r for r in rows if r["epoch"] <= meta.epoch]
            with open(os.path.join(workdir, METRICS + ".tmp"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
            os.replace(os.path.join(workdir, METRICS + ".tmp"), os.path.join(workdir, METRICS))
        return LoopState(training.TrainState(*arrays["train"]), arrays["plateau"], meta)
    return None


def run(cfg: TrainConfig, log=print) -> dict:
    """Train (or resume) a codec as configured; returns the final summary."""
    if cfg.distributed:
        init_distributed(cfg)
    training.check_batch(cfg.batch_size, jax.device_count())
    ds = load_data(cfg)
    checks.finite(ds.xt, "training vectors")
    checks.finite(ds.xval, "validation vectors")
    checks.trainable(ds.xt, cfg.K, "training vectors")
    centroids = None
    if not os.path.exists(os.path.join(cfg.workdir, "config.json")):  # a run's centroids are in its checkpoint
        cfg, centroids = ivf_setup(cfg, ds)
    workdir = prepare_workdir(cfg)
    log(f"{jax.device_count()} device(s) over {jax.process_count()} process(es); "
        f"train {ds.xt.shape}, validation {ds.xval.shape}; workdir {workdir}")
    ckpts = TrainCheckpoints(os.path.join(workdir, "checkpoints"))
    try:
        state = restore(cfg, ds, ckpts, workdir, log) if cfg.resume else None
        if state is None:
            if cfg.resume:
                log(f"{workdir} holds no completed epoch yet: starting the run from the beginning")
            clear_attempt(workdir)
            if cfg.resume:  # a restart: the centroids as a new run would get them
                cfg, centroids = ivf_setup(cfg, ds)
            state = fresh_start(cfg, ds, log, centroids, workdir, ckpts)
        elif finished(cfg, state.meta) and os.path.exists(os.path.join(workdir, SUMMARY)):
            return show_finished(cfg, ds, state, workdir, log)
        else:
            log(f"resuming {workdir} after epoch {state.meta.epoch}")
        state = fit(cfg, ds, state, workdir, ckpts, log)
    finally:
        ckpts.close()
    return summarize(cfg, ds, state, workdir, log)
