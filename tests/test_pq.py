"""PQ-QINCo: the composite codec, its .pt files (torch-written fixture), save / load, and training."""

from pathlib import Path

import jax
import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax import pq
from qinco_jax.checks import CheckpointError
from qinco_jax.ptload import load_pt_codec
from qinco_jax.unpickler import read_objects

from conftest import random_codec, near_codes

DATA = Path(__file__).parent / "data"


def test_official_pq_file_gives_torch_codes():
    ref = np.load(DATA / "pq_qinco_tiny_ref.npz")
    codec = qj.load(DATA / "pq_qinco_tiny.pt")
    assert isinstance(codec, qj.PQCodec) and len(codec.codecs) == 2
    assert [c.config.M for c in codec.codecs] == [3, 2] and codec.M == 5 and codec.d == 16
    assert [c.scale for c in codec.codecs] == pytest.approx([3.0, 5.5])  # each sub-quantizer's own db_scale
    np.testing.assert_allclose(codec.rotation, ref["opq_matrix"])
    codes, err = qj.encode_with_error(codec, ref["x"])
    np.testing.assert_array_equal(codes, ref["codes"])
    np.testing.assert_allclose(qj.decode(codec, ref["codes"]), ref["recon"], atol=1e-5)
    np.testing.assert_allclose(err, ((ref["encode_xhat"] - ref["x"]) ** 2).sum(1), rtol=1e-4, atol=1e-4)
    # the sub-quantizer's codes are those of its own block of the rotated vectors
    y = ref["x"] @ codec.rotation.T
    np.testing.assert_array_equal(qj.encode(codec.codecs[1], y[:, 8:]), ref["codes"][:, 3:])


def test_pq_file_is_read_by_the_restricted_unpickler():
    obj = read_objects(DATA / "pq_qinco_tiny.pt")  # inert records only
    assert type(obj).__name__ == "PQ_QINCo" and type(obj).__module__ == "qinco_jax.unpickler.records"


def test_pq_file_errors(tmp_path):
    import zipfile

    src = DATA / "pq_qinco_tiny.pt"
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("data.pkl"):
                data = data.replace(b"sub_quantizer_1", b"sub_quantizer_9")
            zout.writestr(item, data)
    with pytest.raises(CheckpointError, match="sub_quantizer"):
        load_pt_codec(bad)


def _pq_codec(rotation=True):
    a = random_codec(qj.QincoConfig(d=8, K=16, M=3, L=1, h=8), seed=1, scale=2.0)
    b = random_codec(qj.QincoConfig(d=8, K=16, M=2, L=2, h=8), seed=2, scale=3.0)
    rot = np.linalg.qr(np.random.default_rng(0).normal(size=(16, 16)))[0] if rotation else None
    return qj.PQCodec(rot, (a, b))


@pytest.mark.parametrize("rotation", [True, False])
def test_pq_is_the_concatenation_of_its_sub_codecs(rotation):
    codec = _pq_codec(rotation)
    xa, xb = near_codes(codec.codecs[0], 300, seed=3), near_codes(codec.codecs[1], 300, seed=4)
    y = np.concatenate([xa, xb], 1)
    x = y @ codec.rotation if rotation else y  # so that x @ rotation.T == y
    codes, err = qj.encode_with_error(codec, x)
    np.testing.assert_array_equal(codes[:, :3], qj.encode(codec.codecs[0], xa if not rotation else (x @ codec.rotation.T)[:, :8]))
    np.testing.assert_array_equal(codes[:, 3:], qj.encode(codec.codecs[1], (x @ codec.rotation.T)[:, 8:] if rotation else xb))
    yhat = np.concatenate([qj.decode(codec.codecs[0], codes[:, :3]), qj.decode(codec.codecs[1], codes[:, 3:])], 1)
    xhat = qj.decode(codec, codes)
    np.testing.assert_allclose(xhat, yhat @ codec.rotation if rotation else yhat, atol=1e-4)
    np.testing.assert_allclose(err, ((xhat - x) ** 2).sum(1), rtol=1e-4, atol=1e-4)
    one = jax.local_devices()[:1]
    np.testing.assert_array_equal(qj.encode(codec, x, devices=one), codes)  # 8 devices == 1 device
    with pytest.raises(qj.QincoInputError, match=r"shape \(n, 5\)"):
        qj.decode(codec, codes[:, :4])
    with pytest.raises(qj.QincoInputError, match="dimension 8"):
        qj.encode(codec, x[:, :8])


@pytest.mark.parametrize("rotation", [True, False])
def test_pq_save_and_load(tmp_path, rotation):
    codec = _pq_codec(rotation)
    x = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32) * 3
    qj.save(codec, tmp_path / "pq")
    back = qj.load(tmp_path / "pq")
    assert isinstance(back, qj.PQCodec) and repr(back) == repr(codec)
    np.testing.assert_array_equal(qj.encode(back, x), qj.encode(codec, x))
    assert (back.rotation is None) == (not rotation)


def test_pq_codec_validation():
    a = random_codec(qj.QincoConfig(d=8, K=16, M=3, L=1, h=8))
    with pytest.raises(ValueError, match="d_out=16"):
        qj.PQCodec(np.eye(8, dtype=np.float32), (a, a))
    with pytest.raises(TypeError, match="Codec"):
        qj.PQCodec(None, ())
    with pytest.raises(qj.QincoInputError, match="divide d=10"):
        pq.split_dims(10, 3)
    assert len(repr(_pq_codec())) < 100


def test_train_pq_with_opq_then_evaluate(tmp_path):
    import json

    from eval import main as eval_main
    from qinco_jax import data
    from train import main as train_main

    wd = tmp_path / "pq"
    train_main.main(["--nt", "2000", "--nval", "200", "--pq", "2", "--opq", "--M", "2", "--K", "16", "--L", "1",
                     "--h", "16", "--epochs", "1", "--batch-size", "256", "--workdir", str(wd), "--no-progress"])
    codec = qj.load(wd)
    assert isinstance(codec, qj.PQCodec) and codec.M == 4 and codec.d == 32
    np.testing.assert_array_equal(codec.rotation, np.load(wd / "rotation.npy"))
    ds = data.synthetic(nt=2000, nval=200, nb=500)
    # each block was trained on its rotated dimensions, by the ordinary loop
    block = np.load(wd / "blocks" / "learn_1.npy")
    np.testing.assert_allclose(block[:2000], (ds.xt @ codec.rotation.T)[:, 16:], rtol=1e-5, atol=1e-4)
    sub = qj.load(wd / "sub_1")
    y = ds.xval @ codec.rotation.T
    np.testing.assert_array_equal(qj.encode(codec, ds.xval)[:, 2:], qj.encode(sub, y[:, 16:]))
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["pq_val_mse"] == pytest.approx(float(qj.encode_with_error(codec, ds.xval)[1].mean()), rel=1e-5)
    out = tmp_path / "eval.json"
    eval_main.main(["--model", str(wd), "--dataset", "synthetic", "--nb", "500", "--baselines", "RQ",
                    "--nt-baselines", "1000", "--out", str(out), "--no-progress"])
    res = json.loads(out.read_text())
    row = res["table"][0]
    assert row["method"] == "PQ-QINCo" and row["bytes"] == 2 and res["rotation"] == [32, 32]
    xhat = qj.decode(codec, qj.encode(codec, ds.xb))
    assert row["mse"] == pytest.approx(float(((xhat - ds.xb) ** 2).sum(1).mean()), rel=1e-4)
    assert res["table"][1]["method"] == "RQ" and res["table"][1]["bytes"] == 2
