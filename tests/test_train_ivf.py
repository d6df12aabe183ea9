"""`train/main.py --ivf` / `--ivf-centroids`: end-to-end runs that resume, and one-line errors."""

import json
import re

import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax import data
from train import main as train_main

from test_train_main import _leaves, _train


def _metrics(workdir):
    return [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ivf_run_resumes_and_keeps_its_centroids(tmp_path):
    p = _train(tmp_path / "straight", "--ivf", "16", "--epochs", "3")
    assert "IVF-QINCo (best epoch" in p.stdout and "faiss IVF16-RQ, beam 1" in p.stdout
    _train(tmp_path / "cut", "--ivf", "16", "--epochs", "2")
    p = _train(tmp_path / "cut", "--epochs", "3", "--resume")
    assert "resuming" in p.stdout and "k-means" not in p.stdout  # the centroids come from the checkpoint
    a, b = qj.load(tmp_path / "straight"), qj.load(tmp_path / "cut")
    assert a.config.nlist == 16 and a.config.num_codes == 4
    for x, y in zip(_leaves(a), _leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose([r["val_mse"] for r in _metrics(tmp_path / "straight")],
                               [r["val_mse"] for r in _metrics(tmp_path / "cut")], rtol=1e-6)
    # the centroids were frozen: the best codec still holds the k-means centroids the run started from
    saved = np.load(tmp_path / "straight" / "ivf_centroids.npy")
    np.testing.assert_allclose(a.ivf_centroids, saved, rtol=1e-6, atol=1e-6)
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["baseline"] == "faiss IVF16-RQ"
    assert json.loads((tmp_path / "straight" / "config.json").read_text())["ivf"] == 16

    # --ivf-centroids: the given table (raw units) is step 0, and the config records its size
    _train(tmp_path / "given", "--ivf-centroids", str(tmp_path / "straight" / "ivf_centroids.npy"), "--epochs", "1")
    c = qj.load(tmp_path / "given")
    np.testing.assert_allclose(c.ivf_centroids, saved, rtol=1e-6, atol=1e-6)
    assert json.loads((tmp_path / "given" / "config.json").read_text())["ivf"] == 16


def _run(tmp_path, *args):
    with pytest.raises(SystemExit) as e:
        train_main.main([*args, "--workdir", str(tmp_path / "run"), "--no-progress", "--epochs", "1"])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg
    assert not (tmp_path / "run" / "config.json").exists()  # refused before the run started
    return msg


@pytest.fixture
def train_file(tmp_path):
    x = np.random.default_rng(0).normal(size=(600, 8)).astype(np.float32)
    data.write_vectors(tmp_path / "t.fvecs", x)
    return ["--train", str(tmp_path / "t.fvecs"), "--nval", "100", "--M", "2", "--K", "16"]


@pytest.mark.parametrize(
    "table, match",
    [
        (np.zeros((4, 9), np.float32), "dimension 9.*d=8"),
        (np.where(np.arange(32).reshape(4, 8) == 13, np.nan, 0).astype(np.float32), "NaN or inf.*row is 1"),
        (np.zeros((0, 8), np.float32), "no vectors"),
        (np.zeros((8,), np.float32), "2-D"),
    ],
    ids=["wrong-d", "nan", "empty", "1-d"],
)
def test_bad_centroid_files(tmp_path, train_file, table, match):
    np.save(tmp_path / "c.npy", table)
    msg = _run(tmp_path, *train_file, "--ivf-centroids", str(tmp_path / "c.npy"))
    assert "c.npy" in msg
    assert re.search(match, msg), msg


def test_bad_ivf_sizes(tmp_path, train_file):
    msg = _run(tmp_path, *train_file, "--ivf", "501")
    assert "501" in msg and "nt=500" in msg
    msg = _run(tmp_path, *train_file, "--ivf", "-3")
    assert "-3" in msg
    np.save(tmp_path / "c.npy", np.zeros((4, 8), np.float32))
    msg = _run(tmp_path, *train_file, "--ivf", "5", "--ivf-centroids", str(tmp_path / "c.npy"))
    assert "5" in msg and "4 centroids" in msg
    msg = _run(tmp_path, *train_file, "--ivf-centroids", str(tmp_path / "missing.npy"))
    assert "missing.npy" in msg
