"""No silent wrong results: inputs that would give meaningless codes, models or files are refused."""

import json

import jax
import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax import checks, data
from train import epochs, loop
from train.config import TrainConfig

from conftest import near_codes, random_codec


@pytest.mark.parametrize("value,dtype", [(1e30, np.float32), (2.0**62, np.int64), (1e19, np.float64)])
def test_encode_refuses_rows_whose_squared_norm_overflows(tiny_codec, value, dtype):
    x = near_codes(tiny_codec, 50).astype(dtype)
    x[37, 3] = value
    with pytest.raises(qj.QincoInputError, match="row 37 has squared norm"):
        qj.encode(tiny_codec, x)
    x[37, 3] = 0
    qj.encode(tiny_codec, x)  # the same rows without it encode


def test_encode_takes_the_scale_into_account():
    codec = random_codec(scale=1e-20)  # scaled vectors are x / 1e-20
    x = np.full((4, codec.config.d), 1e3, np.float32)
    with pytest.raises(qj.QincoInputError, match="row 0"):
        qj.encode(codec, x)


def test_non_codec_is_a_type_error(tiny_codec):
    x = near_codes(tiny_codec, 8)
    for bad in ("runs/demo", x, {"config": tiny_codec.config}):
        for fn, arg in ((qj.encode, x), (qj.encode_with_error, x), (qj.decode, np.zeros((2, 3), np.uint8))):
            with pytest.raises(TypeError, match="must be a qinco_jax.Codec"):
                fn(bad, arg)
    with pytest.raises(TypeError, match="expects a qinco_jax.Codec"):
        qj.save("not a codec", "/nonexistent/never-written")


def test_every_row_header_is_checked(tmp_path, monkeypatch):
    x = np.random.default_rng(0).normal(size=(5000, 4)).astype(np.float32)
    path = tmp_path / "x.fvecs"
    data.write_vectors(path, x)
    raw = bytearray(path.read_bytes())
    row = 4 + 4 * 4
    raw[3333 * row : 3333 * row + 4] = np.array([5], "<i4").tobytes()  # one bad header among 5000
    path.write_bytes(bytes(raw))
    monkeypatch.setattr(data.formats, "_HEADER_CHUNK", 1000)  # several chunks
    with pytest.raises(qj.QincoInputError, match="row 3333 declares dimension 5"):
        data.read_vectors(path)


@pytest.mark.parametrize("make,match", [
    (lambda: np.full((500, 8), 3.0, np.float32), "all 500 vectors are equal"),
    (lambda: np.zeros((500, 8), np.float32), "all 500 vectors are equal"),
    (lambda: np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32), "10 vectors cannot train"),
])
def test_degenerate_training_data(make, match):
    with pytest.raises(qj.QincoInputError, match=match):
        qj.init_codec(qj.QincoConfig(d=8, K=16, M=2, L=1, h=8), make())


def test_constant_data_file_in_the_cli(tmp_path):
    from train import main as train_main

    data.write_vectors(tmp_path / "c.fvecs", np.ones((600, 8), np.float32))
    with pytest.raises(SystemExit) as e:
        train_main.main(["--train", str(tmp_path / "c.fvecs"), "--nval", "100", "--K", "16",
                         "--workdir", str(tmp_path / "run"), "--no-progress"])
    assert "equal (constant data)" in str(e.value.code)
    assert not (tmp_path / "run").exists()


def test_training_stops_on_nan_and_saves_nothing_of_it(tmp_path, monkeypatch):
    cfg = TrainConfig(dataset="synthetic", nt=1024, nval=256, nb=256, K=16, M=2, L=1, h=8, lr=1e-3,
                      batch_size=512, epochs=4, workdir=str(tmp_path / "run"), progress=False)
    real = epochs.train_epoch

    def poisoned(cfg, mcfg, state, xt, epoch, lr, scale):
        loss, state = real(cfg, mcfg, state, xt, epoch, lr, scale)
        if epoch == 1:
            params = jax.tree.map(lambda a: np.array(a), state.params)
            params["step_1"]["block_0"]["up"]["kernel"][0, 0] = np.nan
            state = state._replace(params=params)
        return loss, state

    monkeypatch.setattr(epochs, "train_epoch", poisoned)
    with pytest.raises(epochs.TrainingError, match=r"epoch 1: parameter step_1/block_0/up/kernel holds NaN"):
        loop.run(cfg, log=lambda *a: None)
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0]
    best = qj.load(tmp_path / "run")
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(best.params))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["0"]
    with pytest.raises(epochs.TrainingError, match="training loss is nan"):
        epochs.check_finite(3, float("nan"), best.params)


def test_short_never_builds_a_full_repr():
    big = ["x" * 10_000] * 1_000_000
    text = checks.short(big)
    assert len(text) < 300 and "1,000,000 items" in text
    assert "bits" in checks.short(1 << 100_000)
    assert checks.short({"a": [1] * 10**6}) == "dict['a': <list>]"
