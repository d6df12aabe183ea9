"""IVF-QINCo2: the official model's layout and search rules (the IVF step, then M networked steps, one
beam after the IVF step, max(A, B) candidates at the first networked step), in training and in the
search pipeline, on the codec read from the torch fixture tests/data/qinco2_ivf_tiny.pt."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax import search as S
from qinco_jax import training
from conftest import near_codes

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def codec():
    return qj.load(DATA / "qinco2_ivf_tiny.pt")


def test_training_searches_as_the_encoder(codec):
    """The codes a training step decodes are those of the model's own search (the original's rules)."""
    x = near_codes(codec, 64, 0, 0.1)
    xn = (x - codec.shift) / np.float32(codec.scale)
    got = np.asarray(training.search_codes(codec.config, codec.params, jnp.asarray(xn)))
    np.testing.assert_array_equal(got, qj.encode(codec, x))
    ref = np.load(DATA / "qinco2_ivf_tiny_ref.npz")
    xn = (ref["x"] - codec.shift) / np.float32(codec.scale)
    np.testing.assert_array_equal(np.asarray(training.search_codes(codec.config, codec.params, jnp.asarray(xn))),
                                  ref["codes"])


def test_search_pipeline_takes_an_ivf_qinco2_codec(codec, tmp_path):
    cfg = codec.config
    xt, xb, xq = near_codes(codec, 1200, 1, 0.1), near_codes(codec, 400, 2, 0.1), near_codes(codec, 12, 3, 0.1)
    ct = qj.encode(codec, xt)
    assert ct.shape[1] == 1 + cfg.M
    cent = S.ivf_centroids(codec)  # raw units: the normalised table times data_std plus data_mean
    np.testing.assert_allclose(cent, codec.params["codebook0"] * codec.scale + codec.shift, rtol=1e-6, atol=1e-5)
    tables = S.lstsq_tables(ct, xt, cfg.K, centroids=cent)
    db = S.open_codes(S.encode_database(codec, xb, tmp_path / S.DB_CODES, part_size=128), codec)
    index = S.new_index(tables, cent, norm="float")
    S.add_codes(index, tables, db)
    S.save_index(tmp_path, codec, index, tables)
    p = S.load_pipeline(tmp_path, codec)
    r = S.search(p, xq, k=10, nshort=len(xb), nprobe=cfg.nlist)
    xhat = qj.decode(codec, p.db_codes)
    dist = ((xq[:, None, :] - xhat[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(r.I, np.argsort(dist, axis=1, kind="stable")[:, :10])


@pytest.mark.slow
def test_train_main_ivf_qinco2(tmp_path):
    """`train/main.py --model qinco2-S --ivf N`: IVF step, then M networked steps, frozen centroids."""
    cmd = [sys.executable, str(ROOT / "train" / "main.py"), "--model", "qinco2-S", "--ivf", "8", "--K", "16",
           "--M", "2", "--L", "1", "--de", "16", "--dh", "16", "--A", "4", "--B", "6", "--nt", "2000", "--nval",
           "300", "--nb", "300", "--batch-size", "500", "--epochs", "2", "--no-progress", "--workdir", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                       env={"PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                            "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stdout + p.stderr
    c = qj.load(tmp_path)
    assert (c.config.variant, c.config.nlist, c.config.num_codes, c.config.A, c.config.B) == ("qinco2", 8, 3, 4, 6)
    assert sorted(c.params) == ["codebook0", "step_1", "step_2"] and "presel_codebook" in c.params["step_1"]
    np.testing.assert_allclose(c.ivf_centroids, np.load(tmp_path / "ivf_centroids.npy"), rtol=1e-5, atol=1e-4)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["baseline"] == "faiss IVF8-RQ"
