"""The exported codec is never worse on validation than the model the run started from: epoch 0 of
metrics.jsonl is the initial model, evaluated before any step and the first candidate for the best
codec, for every family and both initialisations."""

import json

import jax
import numpy as np
import pytest

import qinco_jax as qj
from train import loop
from train.config import TrainConfig

pytestmark = pytest.mark.slow

TINY = dict(dataset="synthetic", nt=1024, nval=256, nb=256, K=16, M=2, L=1, h=8, batch_size=512, epochs=2,
            progress=False, baseline_nt=0, rq_beam_size=1)  # one start (the choice between two: test_train_qinco2)
V2 = dict(variant="qinco2", de=8, A=4, B=2)
# (extra TrainConfig fields, a learning rate at which training can only make the model worse: the
# parameters jump by about lr per step; QINCo2's clipped AdamW, and v1 from the mirrored rq-exact start,
# diverge to inf above about 10-100)
CASES = {
    "v1-default": ({}, 1e3),
    "ivf-v1-rq-exact": ({"ivf": 8, "init": "rq-exact"}, 30.0),
    "qinco2-rq-exact": ({**V2, "init": "rq-exact"}, 10.0),
    "ivf-qinco2-default": ({**V2, "ivf": 8}, 10.0),
}


def _rows(workdir):
    return [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_run_that_only_gets_worse_exports_the_initial_model(tmp_path, case):
    extra, lr = CASES[case]
    cfg = TrainConfig(**{**TINY, **extra, "lr": lr, "workdir": str(tmp_path / "run")})
    summary = loop.run(cfg, log=lambda *a: None)
    rows = _rows(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    first = rows[0]
    assert first["initial"] and first["best"] and first["train_loss"] is None
    assert all(r["val_mse"] > first["val_mse"] and not r["best"] for r in rows[1:])  # training only hurt
    assert summary["best_epoch"] == 0 and summary["val_mse_init"] == first["val_mse"]
    assert summary["qinco_val_mse"] == pytest.approx(first["val_mse"], rel=1e-6)
    # the exported codec is the initial model itself, parameter for parameter
    mcfg = cfg.model(32)
    ds = loop.load_data(cfg)
    centroids = np.load(tmp_path / "run" / "ivf_centroids.npy") if cfg.ivf else None
    init = qj.init_codec(mcfg, ds.xt, seed=cfg.seed, centroids=centroids, init=cfg.init)
    best = qj.load(tmp_path / "run")
    for a, b in zip(jax.tree.leaves(best.params), jax.tree.leaves(init.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_epoch_0_is_a_checkpoint_that_resumes(tmp_path):
    """A run stopped after epoch 0 resumes from the initial model's checkpoint (no new initialisation)
    and ends where an uninterrupted run ends; the best epoch is a trained one when training helps."""
    base = {**TINY, "lr": 3e-3}
    straight = loop.run(TrainConfig(**{**base, "workdir": str(tmp_path / "straight")}), log=lambda *a: None)
    cut = TrainConfig(**{**base, "epochs": 1, "workdir": str(tmp_path / "cut")})
    loop.run(cut, log=lambda *a: None)
    (tmp_path / "cut" / "summary.json").unlink()
    logs = []
    resumed = loop.run(TrainConfig(**{**base, "workdir": str(tmp_path / "cut"), "resume": True}), log=logs.append)
    assert any("resuming" in line and "after epoch 1" in line for line in logs)
    assert not any("initialisation done" in line for line in logs)
    assert [r["epoch"] for r in _rows(tmp_path / "cut")] == [0, 1, 2]
    assert resumed["best_epoch"] == straight["best_epoch"] == 2
    assert resumed["qinco_val_mse"] == pytest.approx(straight["qinco_val_mse"], rel=1e-6)


def test_a_run_numbered_before_epoch_0_existed_resumes_renumbered(tmp_path):
    """Checkpoints and metrics written when epochs were numbered from 0 by trained epochs: --resume
    renumbers them (the initial model becomes epoch 0) and continues."""
    import shutil

    from qinco_jax import model, training
    from qinco_jax.checkpoint import TrainCheckpoints

    base = {**TINY, "lr": 3e-3, "epochs": 1}
    run = tmp_path / "old"
    cfg = TrainConfig(**{**base, "workdir": str(run)})
    loop.run(cfg, log=lambda *a: None)
    # rewrite the run as the earlier numbering left it: trained epoch 1 saved as 0, no initial row
    params = jax.device_get(model.init_params(cfg.model(32), jax.random.key(0)))
    template = {"train": training.init_state(params, cfg.model(32)), "plateau": training.plateau().init(params)}
    ckpts = TrainCheckpoints(str(run / "checkpoints"))
    arrays, meta = ckpts.restore(template, 1)
    ckpts.close()
    old_meta = {**{k: v for k, v in meta.items() if k != "initial_epoch"}, "epoch": 0, "best_epoch": 0}
    shutil.rmtree(run / "checkpoints")
    ckpts = TrainCheckpoints(str(run / "checkpoints"))
    ckpts.save(0, {"train": training.TrainState(*arrays["train"]), "plateau": arrays["plateau"]}, old_meta)
    ckpts.close()
    rows = _rows(run)[1:]
    (run / "metrics.jsonl").write_text("".join(json.dumps({**r, "epoch": r["epoch"] - 1}) + "\n" for r in rows))
    (run / "summary.json").unlink()
    res = loop.run(TrainConfig(**{**base, "epochs": 2, "workdir": str(run), "resume": True}), log=lambda *a: None)
    got = _rows(run)
    assert [r["epoch"] for r in got] == [0, 1, 2] and got[0]["initial"]
    assert got[1]["val_mse"] == rows[0]["val_mse"]
    assert res["best_epoch"] in (1, 2)
