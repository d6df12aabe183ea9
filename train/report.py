"""The end of a training run: the best codec's validation MSE beside faiss RQ of the same size,
summary.json, the plot of metrics.jsonl, and the lines shown for a finished run."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

import qinco_jax as qj
from qinco_jax import checks, data, faiss_ops
from qinco_jax.files import write_json
from train.config import TrainConfig
from train.epochs import LoopState, val_mse
from train.workdir import BEST, METRICS, PLOT, SUMMARY


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
    trained = [r for r in rows if r.get("train_loss") is not None]  # epoch 0, the initial model, has none
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([r["epoch"] for r in trained], [r["train_loss"] for r in trained], "o-")
    a.set(xlabel="epoch", ylabel="train loss (scaled, summed over steps)", title="training loss", yscale="log")
    b.plot(ep, [r["val_mse"] for r in rows], "o-", color="C1")
    for i, (name, value) in enumerate((baselines or {}).items()):
        b.axhline(value, ls="--", color=f"C{i + 2}", label=name)
    if baselines:
        b.legend()
    b.set(xlabel="epoch (0: before training)", ylabel="validation MSE (raw units)", title="validation MSE",
          yscale="log")
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
    when = ", before training" if res["best_epoch"] == 0 else ""  # epoch 0 is the initial model
    rows = [(f"{name} (best epoch {res['best_epoch']}{when})", res["qinco_val_mse"], "")]
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
    log(f"{workdir} holds a finished run ({state.meta.epoch} epochs); nothing to do. Its results:")
    for line in summary_table(res, ds.xval.shape[0], mcfg):
        log(line)
    log(f"best codec: {os.path.join(workdir, BEST)}  (qinco_jax.load('{workdir}'))")
    more = "" if state.meta.stopped else f"; to train it for longer: --workdir {cfg.workdir} --resume --epochs N"
    log(f"To train again, choose another --workdir (or delete {workdir}){more}.")
    return res
