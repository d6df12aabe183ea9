"""The training job: the only stateful code (files, clock, logging). `run(cfg)` is importable for tests."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from typing import Any, NamedTuple

import jax
import numpy as np

import qinco_jax as qj
from qinco_jax import checkpoint, checks, data, faiss_ops, recipe, training
from qinco_jax.checkpoint import TrainCheckpoints
from qinco_jax.files import write_json
from qinco_jax.progress import Progress
from train.config import TrainConfig

METRICS = "metrics.jsonl"
CENTROIDS = "ivf_centroids.npy"  # an IVF run's centroids (raw units), as used to initialise it
SUMMARY = "summary.json"
PLOT = "training.png"
BEST = checkpoint.BEST


class TrainingError(RuntimeError):
    """Training cannot go on (the loss or a parameter became NaN or inf)."""


class RunMeta(NamedTuple):
    """What a run knows besides its arrays (saved as JSON beside every training checkpoint)."""

    epoch: int  # last completed epoch (-1 before the first)
    scale: float
    best_val: float | None
    best_epoch: int | None
    val0: float  # validation MSE before optimisation
    stopped: bool  # the learning rate fell below training.MIN_LR
    shift: list | None = None  # QINCo2's per-dimension mean (normalisation); None for QINCo v1

    def norm(self) -> qj.Norm:
        """The run's normalisation (QINCo v1: the data scale; QINCo2: mean and std)."""
        return qj.Norm(None if self.shift is None else np.asarray(self.shift, np.float32), self.scale)


class LoopState(NamedTuple):
    """The whole state of the training loop: model and Adam state, plateau schedule, run metadata."""

    train: training.TrainState
    plateau: Any  # training.PlateauState
    meta: RunMeta

    def arrays(self) -> dict:
        """The part saved by orbax."""
        return {"train": self.train, "plateau": self.plateau}


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


def _clear_attempt(workdir: str) -> None:
    """Outputs of an attempt that never completed an epoch's checkpoint (they are redone)."""
    if jax.process_index() == 0:
        for name in (METRICS, SUMMARY, PLOT):
            if os.path.exists(os.path.join(workdir, name)):
                os.unlink(os.path.join(workdir, name))
        shutil.rmtree(os.path.join(workdir, BEST), ignore_errors=True)


def val_mse(codec: qj.Codec, xval) -> float:
    """Mean per-vector squared error of greedy encoding, raw units (the original's compute_MSE)."""
    return float(qj.encode_with_error(codec, xval)[1].mean())


def rq_val_mse(xt, xval, M: int, K: int, beam: int, ivf: qj.Codec | None = None, nt: int = 100_000) -> float:
    """MSE on xval of a faiss ResidualQuantizer of the same size trained on (a sample of at most 100k of) xt.

    With an IVF codec, the baseline is IVF-RQ: the same centroids and assignment, and the RQ trained
    on and applied to the residuals x - c[assign] (the same code size as IVF-QINCo).
    """
    xt = data.sample_rows(xt, nt)
    xv = np.array(xval, np.float32)
    if ivf is not None:
        c = ivf.ivf_centroids
        xt -= c[qj.runtime.ivf_assign(ivf, xt)]
        xv -= c[qj.runtime.ivf_assign(ivf, xv)]
    rq = faiss_ops.train_rq(xt, M, K, beam)
    return float(((rq.decode(rq.compute_codes(xv)) - xv) ** 2).sum(1).mean())


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


def fresh_start(cfg: TrainConfig, ds: data.Dataset, log, centroids=None, workdir: str | None = None) -> LoopState:
    """RQ-initialised codec (IVF: after the centroids) and the loop state before the first epoch."""
    mcfg = cfg.model(ds.d)
    if mcfg.nlist and centroids is None:
        t0 = time.time()
        centroids = faiss_ops.kmeans(data.sample_rows(ds.xt, cfg.rq_nt, cfg.seed), mcfg.nlist, cfg.seed)
        log(f"IVF: k-means of {mcfg.nlist} centroids done in {time.time() - t0:.1f}s")
    if mcfg.nlist and workdir is not None and jax.process_index() == 0:
        np.save(os.path.join(workdir, CENTROIDS), np.asarray(centroids, np.float32))
    t0 = time.time()
    codec = qj.init_codec(mcfg, ds.xt, seed=cfg.seed, rq_beam_size=cfg.rq_beam_size, centroids=centroids,
                          rq_nt=cfg.rq_nt, init=cfg.init)
    what = f"IVF{mcfg.nlist} + RQ on the residuals" if mcfg.nlist else "RQ"
    log(f"{what} {mcfg.M}x{int(np.log2(mcfg.K))} (beam {cfg.rq_beam_size}) initialisation done in {time.time() - t0:.1f}s; "
        f"data scale {codec.scale:.6g}; {mcfg.num_params():,} trainable parameters")
    val0 = val_mse(codec, ds.xval)
    log(f"before optimisation: val MSE {val0:.6g}")
    shift = None if codec.shift is None else [float(v) for v in codec.shift]
    meta = RunMeta(epoch=-1, scale=codec.scale, best_val=None, best_epoch=None, val0=val0, stopped=False, shift=shift)
    return LoopState(training.init_state(codec.params, mcfg), training.plateau().init(codec.params), meta)


def restore(cfg: TrainConfig, ds: data.Dataset, ckpts: TrainCheckpoints, workdir: str, log) -> LoopState | None:
    """The state of the last completed epoch that can be read (None when there is none); metrics
    past it are dropped (they will be redone)."""
    mcfg = cfg.model(ds.d)
    params = jax.device_get(qj.model.init_params(mcfg, jax.random.key(0)))
    template = {"train": training.init_state(params, mcfg), "plateau": training.plateau().init(params)}
    for epoch in sorted(ckpts.steps(), reverse=True):
        try:
            arrays, meta = ckpts.restore(template, epoch)
            meta = RunMeta(**{k: meta[k] for k in RunMeta._fields if k in meta or k not in RunMeta._field_defaults})
        except Exception as e:  # a damaged checkpoint: fall back to the one before
            log(f"checkpoint of epoch {epoch} in {workdir} cannot be read ({type(e).__name__}: {str(e)[:200]}); "
                "trying an earlier one")
            continue
        if jax.process_index() == 0:
            rows = read_metrics(workdir, log)
            keep = [r for r in rows if r["epoch"] <= meta.epoch]
            with open(os.path.join(workdir, METRICS + ".tmp"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
            os.replace(os.path.join(workdir, METRICS + ".tmp"), os.path.join(workdir, METRICS))
        return LoopState(training.TrainState(*arrays["train"]), arrays["plateau"], meta)
    return None


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
    """The step size of batch i: QINCo v1's epoch lr, or QINCo2's warm-up + cosine at epoch + (i+1)/nbatch."""
    if mcfg.variant != "qinco2":
        return lr
    return cfg.lr * recipe.lr_factor(epoch + (i + 1) / nbatch, cfg.epochs)


def train_epoch(cfg: TrainConfig, mcfg: qj.QincoConfig, state, xt, epoch: int, lr: float, norm: qj.Norm):
    """One pass over xt in (seed, epoch)-shuffled global batches; returns (mean batch loss, host state).

    QINCo2: the step size follows the schedule batch by batch, and codewords unused during the epoch
    (counted over all devices) are reset at its end (spec 3.6).
    """
    v2 = mcfg.variant == "qinco2"
    step, n_local = training.train_step(mcfg, stats=v2), jax.local_device_count()
    dev_state = training.replicate(state)
    nt = xt.shape[0]
    nbatch = -(-nt // cfg.batch_size)
    losses, pending, stats = [], None, None
    show = cfg.progress and jax.process_index() == 0
    with Progress(nbatch, desc=f"epoch {epoch}", enabled=show) as bar:
        for i, idx in enumerate(data.batches(nt, cfg.batch_size, cfg.seed, epoch)):
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
        params, _ = recipe.reset_dead_codes(mcfg, state.params, jax.device_get(stats), cfg.seed, epoch)
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


def end_of_epoch(cfg, ds, state: LoopState, epoch, train_loss, lr, t0, workdir, ckpts, log) -> LoopState:
    """Validate, step the plateau schedule, keep the best codec, log and checkpoint."""
    mcfg = cfg.model(ds.d)
    meta = state.meta
    codec = qj.Codec(mcfg, state.train.params, meta.norm())
    val = val_mse(codec, ds.xval)
    if not math.isfinite(val):
        raise TrainingError(f"epoch {epoch}: the validation MSE is {val}. Training diverged; try a lower --lr.")
    v1 = mcfg.variant != "qinco2"  # QINCo2 follows its schedule, not the plateau
    pl = jax.device_get(training.plateau().update({}, state.plateau, value=val)[1]) if v1 else state.plateau
    best = meta.best_val is None or val <= meta.best_val
    meta = meta._replace(epoch=epoch)
    if best:
        meta = meta._replace(best_val=val, best_epoch=epoch)
    row = {"epoch": epoch, "lr": lr, "train_loss": train_loss, "val_mse": val, "seconds": time.time() - t0, "best": best}
    if jax.process_index() == 0:
        if best:
            qj.save(codec, os.path.join(workdir, BEST), overwrite=True)
        with open(os.path.join(workdir, METRICS), "a") as f:
            f.write(json.dumps(row) + "\n")
    next_lr = cfg.lr * float(pl.scale) if v1 else lr
    meta = meta._replace(stopped=v1 and next_lr < training.MIN_LR)
    state = LoopState(state.train, pl, meta)
    ckpts.save(epoch, state.arrays(), meta._asdict())
    log(f"epoch {epoch:3d}  lr {lr:.1e}  train loss {train_loss:.6g}  val MSE {val:.6g}"
        f"{'  (best)' if best else ''}  {row['seconds']:.1f}s")
    if next_lr < lr and not meta.stopped:
        log(f"val MSE did not improve for {training.PLATEAU_PATIENCE} epochs: lr -> {next_lr:.1e}")
    return state


def finished(cfg: TrainConfig, meta: RunMeta) -> bool:
    return meta.stopped or meta.epoch >= cfg.epochs - 1


def fit(cfg: TrainConfig, ds: data.Dataset, state: LoopState, workdir, ckpts, log) -> LoopState:
    """Epochs until --epochs or until the learning rate falls below the minimum."""
    mcfg = cfg.model(ds.d)
    for epoch in range(state.meta.epoch + 1, cfg.epochs):
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


def read_metrics(workdir: str, log=print) -> list[dict]:
    """The rows of metrics.jsonl. A torn last line (a write cut by a kill) is dropped with a note;
    any other unreadable line is an error naming the file and line."""
    path = os.path.join(workdir, METRICS)
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    rows = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
            if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
                raise ValueError("not a metrics row")
        except ValueError as e:
            if all(not rest.strip() for rest in lines[i + 1 :]):
                log(f"note: dropped a torn last line of {path} (a write interrupted by a kill)")
                break
            raise checks.QincoInputError(f"{path}, line {i + 1}: not a metrics row ({str(e)[:100]}); "
                                         "fix or delete that line") from None
        rows.append(row)
    return rows


def plot_metrics(rows: list[dict], path: str, baselines: dict | None = None) -> bool:
    """PNG of train loss and validation MSE per epoch (baselines as dashed lines); False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r["train_loss"] for r in rows], "o-")
    a.set(xlabel="epoch", ylabel="train loss (scaled, summed over steps)", title="training loss", yscale="log")
    b.plot(ep, [r["val_mse"] for r in rows], "o-", color="C1")
    for i, (name, value) in enumerate((baselines or {}).items()):
        b.axhline(value, ls="--", color=f"C{i + 2}", label=name)
    if baselines:
        b.legend()
    b.set(xlabel="epoch", ylabel="validation MSE (raw units)", title="validation MSE", yscale="log")
    for ax in (a, b):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path + ".tmp", dpi=100, format="png")  # whole or not at all
    plt.close(fig)
    os.replace(path + ".tmp", path)
    return True


def summary_table(res: dict, n_val: int, mcfg: qj.QincoConfig) -> list[str]:
    """The end-of-run lines: validation MSE of (IVF-)QINCo and the faiss baselines, in aligned columns."""
    name = "IVF-QINCo" if mcfg.nlist else "QINCo"
    base = res.get("baseline", "faiss RQ")
    rows = [(f"{name} (best epoch {res['best_epoch']})", res["qinco_val_mse"], "")]
    for beam in (1, 5):
        if f"rq_beam{beam}_val_mse" not in res:  # --baseline-nt 0
            continue
        r = res[f"rq_beam{beam}_val_mse"]
        if r > 0:
            gain = 100 * (1 - res["qinco_val_mse"] / r)
            note = f"{name} is {abs(gain):.1f}% {'lower' if gain >= 0 else 'higher'}"
        else:
            note = "the baseline reconstructs the validation set exactly"
        rows.append((f"{base}, beam {beam}", r, note))
    w = max(len(n) for n, _, _ in rows)
    nbytes = mcfg.M * np.log2(mcfg.K) / 8
    extra = f", plus a list id of {mcfg.nlist}" if mcfg.nlist else ""
    lines = [f"validation MSE on {n_val} vectors, {nbytes:g} bytes per vector (M={mcfg.M}, K={mcfg.K}{extra}):"]
    lines += [f"  {n:<{w}}  {value:>12.6g}" + (f"   ({note})" if note else "") for n, value, note in rows]
    return lines


def summarize(cfg: TrainConfig, ds: data.Dataset, state: LoopState, workdir: str, log) -> dict:
    """Best model's validation MSE beside faiss RQ of the same size; summary.json and the plot."""
    mcfg = cfg.model(ds.d)
    best = qj.load(workdir)
    res = {"qinco_val_mse": val_mse(best, ds.xval), "best_epoch": state.meta.best_epoch,
           "before_training": state.meta.val0, "val_mse_init": state.meta.val0}
    ivf = best if mcfg.nlist else None
    base = f"faiss IVF{mcfg.nlist}-RQ" if ivf else "faiss RQ"  # IVF: same centroids, RQ of the residuals
    res["baseline"] = base
    beams = (1, 5) if cfg.baseline_nt > 0 else ()  # --baseline-nt 0: no baselines
    for beam in beams:
        res[f"rq_beam{beam}_val_mse"] = rq_val_mse(ds.xt, ds.xval, mcfg.M, mcfg.K, beam, ivf, cfg.baseline_nt)
    if jax.process_index() == 0:
        rq = {f"{base}, beam {b}": res[f"rq_beam{b}_val_mse"] for b in beams}
        if plot_metrics(read_metrics(workdir, log), os.path.join(workdir, PLOT), rq):
            log(f"plot: {os.path.join(workdir, PLOT)}")
        write_json(os.path.join(workdir, SUMMARY), res)  # last: its presence marks a finished run
    log("")
    for line in summary_table(res, ds.xval.shape[0], mcfg):
        log(line)
    log(f"best codec: {os.path.join(workdir, BEST)}  (qinco_jax.load('{workdir}'))")
    return res


def show_finished(cfg: TrainConfig, ds: data.Dataset, state: LoopState, workdir: str, log) -> dict:
    """A finished run asked to run again: its results, and how to train again."""
    with open(os.path.join(workdir, SUMMARY)) as f:
        res = json.load(f)
    mcfg = cfg.model(ds.d)
    log(f"{workdir} holds a finished run ({state.meta.epoch + 1} epochs); nothing to do. Its results:")
    for line in summary_table(res, ds.xval.shape[0], mcfg):
        log(line)
    log(f"best codec: {os.path.join(workdir, BEST)}  (qinco_jax.load('{workdir}'))")
    more = "" if state.meta.stopped else f"; to train it for longer: --workdir {cfg.workdir} --resume --epochs N"
    log(f"To train again, choose another --workdir (or delete {workdir}){more}.")
    return res


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
            _clear_attempt(workdir)
            if cfg.resume:  # a restart: the centroids as a new run would get them
                cfg, centroids = ivf_setup(cfg, ds)
            state = fresh_start(cfg, ds, log, centroids, workdir)
        elif finished(cfg, state.meta) and os.path.exists(os.path.join(workdir, SUMMARY)):
            return show_finished(cfg, ds, state, workdir, log)
        else:
            log(f"resuming {workdir} after epoch {state.meta.epoch}")
        state = fit(cfg, ds, state, workdir, ckpts, log)
    finally:
        ckpts.close()
    return summarize(cfg, ds, state, workdir, log)
