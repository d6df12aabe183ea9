"""`python train/main.py --model qinco2-S ...` end to end: outputs, exact resume after SIGKILL, and the
rq-exact initialisation against faiss's RQ."""

import json
import signal
import subprocess
import sys

import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax import data, faiss_ops

from test_train_main import ROOT, _env, _leaves

V2_RUN = ["--model", "qinco2-S", "--K", "16", "--M", "3", "--L", "1", "--de", "24", "--dh", "16", "--A", "4",
          "--B", "3", "--nt", "3000", "--nval", "500", "--nb", "500", "--batch-size", "512", "--no-progress"]

pytestmark = pytest.mark.slow


def _train(workdir, *extra, check=True):
    cmd = [sys.executable, str(ROOT / "train" / "main.py"), *V2_RUN, "--workdir", str(workdir), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(2), timeout=900)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def test_qinco2_run_outputs(tmp_path):
    _train(tmp_path / "run", "--epochs", "3")
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["preset"] == "qinco2-S" and cfg["variant"] == "qinco2" and cfg["lr"] == 8e-4
    assert (cfg["de"], cfg["h"], cfg["A"], cfg["B"]) == (24, 16, 4, 3)  # flags override the preset
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]  # epoch 0: the initial model
    assert rows[1]["lr"] > rows[-1]["lr"]  # the cosine decays within the run
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_mse_init"] > min(r["val_mse"] for r in rows)
    codec = qj.load(tmp_path / "run")
    assert codec.config.variant == "qinco2" and (codec.config.A, codec.config.B) == (4, 3)
    assert codec.shift is not None


def test_qinco2_resume_after_sigkill_gives_the_same_result(tmp_path):
    _train(tmp_path / "straight", "--epochs", "3")
    cmd = [sys.executable, str(ROOT / "train" / "main.py"), *V2_RUN, "--workdir", str(tmp_path / "killed"),
           "--epochs", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(2))
    for line in proc.stdout:
        if line.startswith("epoch   1"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    p = _train(tmp_path / "killed", "--epochs", "3", "--resume")
    assert "resuming" in p.stdout
    for x, y in zip(_leaves(qj.load(tmp_path / "straight")), _leaves(qj.load(tmp_path / "killed"))):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    ra = [json.loads(ln)["val_mse"] for ln in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(ln)["val_mse"] for ln in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(ra, rb, rtol=1e-5)


def test_rq_exact_starts_at_the_rq(tmp_path):
    B = 2
    _train(tmp_path / "exact", "--epochs", "1", "--init", "rq-exact", "--A", "16", "--B", str(B), "--rq-beam-size", "1")
    summary = json.loads((tmp_path / "exact" / "summary.json").read_text())
    ds = data.synthetic(seed=0, nt=3000, nval=500, nb=500)
    rq = faiss_ops.train_rq(np.asarray(ds.xt, np.float32), 3, 16)  # the initialisation's RQ
    rq.max_beam_size = B  # and the same search: beam B over all K codes
    xv = np.ascontiguousarray(ds.xval, np.float32)
    rq_mse = float(((rq.decode(rq.compute_codes(xv)) - xv) ** 2).sum(1).mean())
    assert summary["val_mse_init"] == pytest.approx(rq_mse, rel=1e-5)


def test_rq_exact_keeps_the_better_of_greedy_and_beam_trained_rq(tmp_path):
    """With --init rq-exact and B > 1 (no --rq-beam-size) the run tries the RQ trained greedily and the
    one trained with beam B, and starts from the one with the lower validation MSE under the model's
    own search."""
    p = _train(tmp_path / "best", "--epochs", "1", "--init", "rq-exact")
    summary = json.loads((tmp_path / "best" / "summary.json").read_text())
    cfg = json.loads((tmp_path / "best" / "config.json").read_text())
    ds = data.synthetic(seed=0, nt=3000, nval=500, nb=500)
    mcfg = qj.QincoConfig(d=ds.d, K=16, M=3, L=1, h=16, variant="qinco2", de=24, A=4, B=3)
    mse = {}
    for beam in (1, 3):
        codec = qj.init_codec(mcfg, np.asarray(ds.xt, np.float32), seed=cfg["seed"], rq_beam_size=beam,
                              init="rq-exact", rq_nt=cfg["rq_nt"])
        mse[beam] = float(qj.encode_with_error(codec, np.asarray(ds.xval, np.float32))[1].mean())
    assert mse[1] != pytest.approx(mse[3], rel=1e-4)  # the two starts differ, so the choice is tested
    assert summary["val_mse_init"] == pytest.approx(min(mse.values()), rel=1e-5)
    chosen = min(mse, key=mse.get)
    assert f"start: the RQ trained with beam {chosen}" in p.stdout + p.stderr


def test_a_cheaper_training_search(tmp_path):
    """--train-A / --train-B: the training step searches with them, while the saved codec (its encoding and the
    validation) keeps the model's A, B."""
    full = _train(tmp_path / "full", "--epochs", "1")
    cheap = _train(tmp_path / "cheap", "--epochs", "1", "--train-A", "2", "--train-B", "1")
    assert "the training step searches with A 2, B 1; the codec keeps A 4, B 3" in cheap.stdout + cheap.stderr
    assert "the training step searches" not in full.stdout + full.stderr
    cfg = json.loads((tmp_path / "cheap" / "config.json").read_text())
    assert (cfg["A"], cfg["B"], cfg["train_A"], cfg["train_B"]) == (4, 3, 2, 1)
    codec = qj.load(tmp_path / "cheap")
    assert (codec.config.A, codec.config.B) == (4, 3)
    rows = {n: [json.loads(ln) for ln in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("full", "cheap")}
    assert rows["full"][0]["val_mse"] == rows["cheap"][0]["val_mse"]  # the same start, validated alike
    assert rows["full"][1]["train_loss"] != pytest.approx(rows["cheap"][1]["train_loss"], rel=1e-6)  # other codes
