"""PQ-QINCo training (spec v1 §4.3): an optional faiss OPQ rotation, then one QINCo per contiguous
sub-vector block, each trained by the ordinary training loop, and the codes concatenated.

    python train/main.py --dataset bigann1M --pq 2 --opq --M 8 --workdir runs/bigann_pq2x8

--M, --K, --L, --h and the recipe flags apply to every sub-quantizer (the original's PQ recipe:
M = total codes / nsub). The workdir holds `blocks/` (each block's training and validation vectors,
rotated when --opq, as the original's `--prepare` step writes them), `rotation.npy`, one ordinary
training workdir per block (`sub_0`, `sub_1`, ...), and `best/`, the PQCodec of the best
sub-codecs, so that `qinco_jax.load(workdir)` and `eval/main.py --model workdir` take it whole.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

import qinco_jax as qj
from qinco_jax import checks, data, pq
from qinco_jax.files import write_json
from train import loop
from train.config import TrainConfig
from train.workdir import prepare_workdir

CHUNK = 65536


def write_blocks(ds: data.Dataset, rotation: np.ndarray | None, dims: list[tuple[int, int]], folder: str) -> list[str]:
    """Each block's training then validation vectors as blocks/learn_{b}.npy, written chunk by chunk
    (float32 when rotated, else the file's dtype); files already complete are kept."""
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"learn_{b}.npy") for b in range(len(dims))]
    if all(os.path.exists(p) for p in paths):
        return paths
    n = ds.xt.shape[0] + ds.xval.shape[0]
    dtype = np.float32 if rotation is not None else ds.xt.dtype
    tmp = [p + ".tmp.npy" for p in paths]
    outs = [np.lib.format.open_memmap(t, "w+", dtype, (n, b - a)) for t, (a, b) in zip(tmp, dims)]
    row = 0
    for part in (ds.xt, ds.xval):
        for i in range(0, part.shape[0], CHUNK):
            x = np.asarray(part[i : i + CHUNK])
            y = x if rotation is None else np.asarray(x, np.float32) @ rotation.T
            for out, (a, b) in zip(outs, dims):
                out[row : row + len(y)] = y[:, a:b]
            row += len(y)
    for out, t, p in zip(outs, tmp, paths):
        out.flush()
        del out
        os.replace(t, p)
    return paths


def sub_config(cfg: TrainConfig, path: str, nt: int, nval: int, workdir: str, resume: bool) -> TrainConfig:
    """The ordinary training run of one block."""
    return dataclasses.replace(cfg, pq=None, opq=False, dataset="synthetic", train=path, db=None, queries=None,
                               gt=None, nt=nt, nval=nval, nb=None, workdir=workdir, resume=resume)


def run(cfg: TrainConfig, log=print) -> dict:
    """Train (or continue) a PQ-QINCo as configured; returns the summary."""
    if cfg.distributed:
        loop.init_distributed(cfg)
    ds = loop.load_data(cfg)
    checks.finite(ds.xt, "training vectors")
    checks.finite(ds.xval, "validation vectors")
    dims = pq.split_dims(ds.d, cfg.pq)
    workdir = prepare_workdir(cfg)
    log(f"PQ-QINCo: {cfg.pq} blocks of {dims[0][1] - dims[0][0]} dimensions, {cfg.M} codes of "
        f"{int(np.log2(cfg.K))} bits each{' after an OPQ rotation' if cfg.opq else ''}; workdir {workdir}")
    rotation = None
    if cfg.opq:
        rot_path = os.path.join(workdir, "rotation.npy")
        if os.path.exists(rot_path):
            rotation = np.load(rot_path)
        else:
            sample = data.sample_rows(ds.xt, cfg.rq_nt, cfg.seed)
            log(f"training the OPQ rotation on {sample.shape[0]:,} vectors")
            rotation = pq.train_opq(sample, cfg.pq)
            np.save(rot_path + ".tmp.npy", rotation)
            os.replace(rot_path + ".tmp.npy", rot_path)
    paths = write_blocks(ds, rotation, dims, os.path.join(workdir, "blocks"))
    nt, nval = ds.xt.shape[0], ds.xval.shape[0]
    subs = []
    for b, path in enumerate(paths):
        sub_dir = os.path.join(workdir, f"sub_{b}")
        subs.append(sub_dir)
        if os.path.exists(os.path.join(sub_dir, "summary.json")):
            log(f"block {b}: already trained ({sub_dir})")
            continue
        log(f"block {b}: dimensions {dims[b][0]}..{dims[b][1] - 1}")
        started = os.path.exists(os.path.join(sub_dir, "config.json"))
        loop.run(sub_config(cfg, path, nt, nval, sub_dir, started), log=lambda m, b=b: log(f"[block {b}] {m}"))
    codec = qj.PQCodec(rotation, tuple(qj.load(s) for s in subs))
    val = float(qj.encode_with_error(codec, ds.xval)[1].mean())
    res = {"pq_val_mse": val, "code_bytes": codec.code_bits / 8, "blocks": subs}
    if jax.process_index() == 0:
        qj.save(codec, os.path.join(workdir, "best"), overwrite=True)
        write_json(os.path.join(workdir, "summary.json"), res)
    log(f"\nPQ-QINCo validation MSE on {nval:,} vectors, {codec.code_bits / 8:g} bytes per vector: {val:.6g}")
    log(f"best codec: {os.path.join(workdir, 'best')}  (qinco_jax.load('{workdir}'))")
    return res
