"""The training job: the only stateful code (files, clock, logging). `run(cfg)` is importable for tests."""

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
from qinco_jax.files import write_json
from qinco_jax.progress import Progress
from train.config import TrainConfig

METRICS = "metrics.jsonl"
CENTROIDS = "ivf_centroids.npy"  # an IVF run's centroids (raw units), as used to initialise it


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


def prepare_workdir(cfg: TrainConfig) -> str:
    """Create the workdir; an existing run is an error unless resuming."""
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
        if not has_run:
            write_json(os.path.join(workdir, "config.json"), cfg.to_dict())
    return workdir


def val_mse(codec: qj.Codec, xval) -> float:
    """Mean per-vector squared error of greedy encoding, raw units (the original's compute_MSE)."""
    return float(qj.encode_with_error(codec, xval)[1].mean())


RQ_BASELINE_NT = 200_000  # bounds the end-of-run baseline's training time on large sets


def rq_val_mse(xt, xval, M: int, K: int, beam: int, ivf: qj.Codec | None = None) -> float:
    """MSE on xval of a faiss ResidualQuantizer of the same size trained on (at most 200k of) xt.

    With an IVF codec, the baseline is IVF-RQ: the same centroids and assignment, and the RQ trained
    on and applied to the residuals x - c[assign] (the same code size as IVF-QINCo).
    """
    xt = np.asarray(xt[:RQ_BASELINE_NT], np.float32)
    xv = np.array(xval, np.float32)
    if ivf is not None:
        c = ivf.ivf_centroids
        xt = xt - c[qj.codec.ivf_assign(ivf, xt)]
        xv -= c[qj.codec.ivf_assign(ivf, xv)]
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


def fresh_start(cfg: TrainConfig, ds: data.Dataset, log, centroids=None, workdir: str | None = None) -> tuple[dict, dict]:
    """RQ-initialised codec (IVF: after the centroids) and the loop state before the first epoch."""
    mcfg = cfg.model(ds.d)
    if mcfg.nlist and centroids is None:
        t0 = time.time()
        centroids = faiss_ops.kmeans(np.asarray(ds.xt, np.float32), mcfg.nlist, cfg.seed)
        log(f"IVF: k-means of {mcfg.nlist} centroids done in {time.time() - t0:.1f}s")
    if mcfg.nlist and workdir is not None and jax.process_index() == 0:
        np.save(os.path.join(workdir, CENTROIDS), np.asarray(centroids, np.float32))
    t0 = time.time()
    codec = qj.init_codec(mcfg, ds.xt, seed=cfg.seed, rq_beam_size=cfg.rq_beam_size, centroids=centroids)
    what = f"IVF{mcfg.nlist} + RQ on the residuals" if mcfg.nlist else "RQ"
    log(f"{what} {mcfg.M}x{int(np.log2(mcfg.K))} (beam {cfg.rq_beam_size}) initialisation done in {time.time() - t0:.1f}s; "
        f"data scale {codec.scale:.6g}; {mcfg.num_params():,} trainable parameters")
    val0 = val_mse(codec, ds.xval)
    log(f"before optimisation: val MSE {val0:.6g}")
    state = {"train": training.init_state(codec.params, mcfg), "plateau": training.plateau().init(codec.params)}
    meta = {"epoch": -1, "scale": codec.scale, "best_val": None, "best_epoch": None, "val0": val0, "stopped": False}
    return state, meta


def resume(cfg: TrainConfig, ds: data.Dataset, ckpts: TrainCheckpoints, workdir: str, log) -> tuple[dict, dict]:
    """The state of the last completed epoch; metrics past it are dropped (they will be redone)."""
    mcfg = cfg.model(ds.d)
    params = jax.device_get(qj.codec.init_params(mcfg, jax.random.key(0)))
    template = {"train": training.init_state(params, mcfg), "plateau": training.plateau().init(params)}
    state, meta = ckpts.restore(template)
    state = {"train": training.TrainState(*state["train"]), "plateau": state["plateau"]}
    log(f"resuming {workdir} after epoch {meta['epoch']}")
    if jax.process_index() == 0:
        path = os.path.join(workdir, METRICS)
        if os.path.exists(path):
            with open(path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln)["epoch"] <= meta["epoch"]]
            with open(path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(path + ".tmp", path)
    return state, meta


def _global_batch(xt, idx: np.ndarray, batch: int, inv_scale: np.float32):
    """This process's share of the (padded) global batch: scaled vectors and 0/1 weights."""
    n, P, p = len(idx), jax.process_count(), jax.process_index()
    full = np.zeros(batch, np.int64)
    full[:n] = idx
    w = (np.arange(batch) < n).astype(np.float32)
    share = slice(p * batch // P, (p + 1) * batch // P)
    rows = full[share]
    order = np.argsort(rows)  # sorted reads are kinder to memory-mapped files
    x = np.empty((len(rows), xt.shape[1]), np.float32)
    x[order] = np.asarray(xt[rows[order]], np.float32)
    return x * inv_scale, w[share]


def train_epoch(cfg: TrainConfig, mcfg: qj.QincoConfig, state, xt, epoch: int, lr: float, scale: float):
    """One pass over xt in (seed, epoch)-shuffled global batches; returns (mean batch loss, host state)."""
    step, n_local = training.train_step(mcfg), jax.local_device_count()
    dev_state = training.replicate(state)
    inv, nt = np.float32(1.0 / scale), xt.shape[0]
    nbatch = -(-nt // cfg.batch_size)
    losses, pending = [], None
    show = cfg.progress and jax.process_index() == 0
    with Progress(nbatch, desc=f"epoch {epoch}", enabled=show) as bar:
        for idx in data.batches(nt, cfg.batch_size, cfg.seed, epoch):
            x, w = _global_batch(xt, idx, cfg.batch_size, inv)
            dev_state, loss = step(dev_state, *training.shard_batch(x, w, n_local), lr)
            if pending is not None:
                losses.append(float(pending[0]))
                bar.update(1, loss=float(np.mean(losses)))
            pending = loss
        losses.append(float(pending[0]))
        bar.update(1, loss=float(np.mean(losses)))
    return float(np.mean(losses)), training.unreplicate(dev_state)


def end_of_epoch(cfg, ds, state, meta, epoch, train_loss, lr, t0, workdir, ckpts, log) -> tuple[dict, dict]:
    """Validate, step the plateau schedule, keep the best codec, log and checkpoint."""
    mcfg = cfg.model(ds.d)
    codec = qj.Codec(mcfg, state["train"].params, meta["scale"])
    val = val_mse(codec, ds.xval)
    _, pl = training.plateau().update({}, state["plateau"], value=np.float32(val))
    state = {"train": state["train"], "plateau": jax.device_get(pl)}
    best = meta["best_val"] is None or val <= meta["best_val"]
    meta = dict(meta, epoch=epoch)
    if best:
        meta.update(best_val=val, best_epoch=epoch)
    row = {"epoch": epoch, "lr": lr, "train_loss": train_loss, "val_mse": val, "seconds": time.time() - t0, "best": best}
    if jax.process_index() == 0:
        if best:
            qj.save(codec, os.path.join(workdir, "best"), overwrite=True)
        with open(os.path.join(workdir, METRICS), "a") as f:
            f.write(json.dumps(row) + "\n")
    next_lr = cfg.lr * float(state["plateau"].scale)
    meta["stopped"] = next_lr < training.MIN_LR
    ckpts.save(epoch, state, meta)
    log(f"epoch {epoch:3d}  lr {lr:.1e}  train loss {train_loss:.6g}  val MSE {val:.6g}"
        f"{'  (best)' if best else ''}  {row['seconds']:.1f}s")
    if next_lr < lr and not meta["stopped"]:
        log(f"val MSE did not improve for {training.PLATEAU_PATIENCE} epochs: lr -> {next_lr:.1e}")
    return state, meta


def fit(cfg: TrainConfig, ds: data.Dataset, state, meta, workdir, ckpts, log) -> dict:
    """Epochs until --epochs or until the learning rate falls below the minimum."""
    mcfg = cfg.model(ds.d)
    for epoch in range(meta["epoch"] + 1, cfg.epochs):
        if meta["stopped"]:
            break
        lr = cfg.lr * float(state["plateau"].scale)
        t0 = time.time()
        train_state = state["train"]
        if not cfg.persistent_adam:  # the original re-creates Adam at every epoch
            train_state = training.init_state(train_state.params, mcfg)
        loss, train_state = train_epoch(cfg, mcfg, train_state, ds.xt, epoch, lr, meta["scale"])
        state = {"train": train_state, "plateau": state["plateau"]}
        state, meta = end_of_epoch(cfg, ds, state, meta, epoch, loss, lr, t0, workdir, ckpts, log)
    if meta["stopped"]:
        log(f"learning rate below {training.MIN_LR:g}: stopping")
    return meta


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, METRICS)) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


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
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def summarize(cfg: TrainConfig, ds: data.Dataset, meta: dict, workdir: str, log) -> dict:
    """Best model's validation MSE beside faiss RQ of the same size; summary.json and the plot."""
    mcfg = cfg.model(ds.d)
    best = qj.load(workdir)
    res = {"qinco_val_mse": val_mse(best, ds.xval), "best_epoch": meta["best_epoch"], "before_training": meta["val0"]}
    ivf = best if mcfg.nlist else None
    base = f"faiss IVF{mcfg.nlist}-RQ" if ivf else "faiss RQ"  # IVF: same centroids, RQ of the residuals
    res["baseline"] = base
    for beam in (1, 5):
        res[f"rq_beam{beam}_val_mse"] = rq_val_mse(ds.xt, ds.xval, mcfg.M, mcfg.K, beam, ivf)
    if jax.process_index() == 0:
        write_json(os.path.join(workdir, "summary.json"), res)
        rq = {f"{base}, beam {b}": res[f"rq_beam{b}_val_mse"] for b in (1, 5)}
        if plot_metrics(read_metrics(workdir), os.path.join(workdir, "training.png"), rq):
            log(f"plot: {os.path.join(workdir, 'training.png')}")
    nbytes = mcfg.M * np.log2(mcfg.K) / 8
    extra = f", plus a list id of {mcfg.nlist}" if mcfg.nlist else ""
    name = "IVF-QINCo" if mcfg.nlist else "QINCo"
    log(f"\nvalidation MSE on {ds.xval.shape[0]} vectors, {nbytes:g} bytes per vector (M={mcfg.M}, K={mcfg.K}{extra}):")
    log(f"  {name} (best epoch {meta['best_epoch']})  {res['qinco_val_mse']:.6g}")
    for beam in (1, 5):
        r = res[f"rq_beam{beam}_val_mse"]
        gain = 100 * (1 - res["qinco_val_mse"] / r)
        log(f"  {base}, beam {beam}{' ' * max(1, 20 - len(base))}{r:.6g}   "
            f"({name} is {abs(gain):.1f}% {'lower' if gain >= 0 else 'higher'})")
    log(f"best codec: {os.path.join(workdir, 'best')}  (qinco_jax.load('{workdir}'))")
    return res


def run(cfg: TrainConfig, log=print) -> dict:
    """Train (or resume) a codec as configured; returns the final summary."""
    if cfg.distributed:
        init_distributed(cfg)
    training.check_batch(cfg.batch_size, jax.device_count())
    ds = load_data(cfg)
    checks.finite(ds.xt, "training vectors")
    checks.finite(ds.xval, "validation vectors")
    centroids = None
    if not cfg.resume:  # a resumed run's centroids are in its checkpoint (and its config holds nlist)
        cfg, centroids = ivf_setup(cfg, ds)
    workdir = prepare_workdir(cfg)
    log(f"{jax.device_count()} device(s) over {jax.process_count()} process(es); "
        f"train {ds.xt.shape}, validation {ds.xval.shape}; workdir {workdir}")
    ckpts = TrainCheckpoints(os.path.join(workdir, "checkpoints"))
    try:
        if cfg.resume:
            state, meta = resume(cfg, ds, ckpts, workdir, log)
        else:
            state, meta = fresh_start(cfg, ds, log, centroids, workdir)
        meta = fit(cfg, ds, state, meta, workdir, ckpts, log)
    finally:
        ckpts.close()
    return summarize(cfg, ds, meta, workdir, log)
