"""The training CLI refuses bad input with a message that names the problem (no traceback)."""

import numpy as np
import pytest

from qinco_jax import data
from train import main as train_main


def _run(tmp_path, *args):
    with pytest.raises(SystemExit) as e:
        train_main.main([*args, "--workdir", str(tmp_path / "run"), "--no-progress", "--epochs", "1"])
    return str(e.value.code)


def test_nan_rows_are_named(tmp_path):
    x = np.random.default_rng(0).normal(size=(600, 8)).astype(np.float32)
    x[123, 4] = np.nan
    data.write_vectors(tmp_path / "x.fvecs", x)
    msg = _run(tmp_path, "--train", str(tmp_path / "x.fvecs"), "--nval", "100")
    assert "NaN or inf" in msg and "123" in msg


def test_dimension_mismatch_between_files(tmp_path):
    data.write_vectors(tmp_path / "t.fvecs", np.zeros((600, 8), np.float32))
    data.write_vectors(tmp_path / "b.fvecs", np.zeros((50, 9), np.float32))
    msg = _run(tmp_path, "--train", str(tmp_path / "t.fvecs"), "--db", str(tmp_path / "b.fvecs"), "--nval", "100")
    assert "t.fvecs" in msg and "b.fvecs" in msg and "8" in msg and "9" in msg


def test_nt_plus_nval_larger_than_the_file(tmp_path):
    data.write_vectors(tmp_path / "t.fvecs", np.zeros((600, 8), np.float32))
    msg = _run(tmp_path, "--train", str(tmp_path / "t.fvecs"), "--nt", "550", "--nval", "100")
    assert "600" in msg and "550" in msg and "100" in msg


def test_unknown_dataset(tmp_path):
    msg = _run(tmp_path, "--dataset", "imagenet42")
    assert "imagenet42" in msg and "bigann1M" in msg


def test_unreadable_file(tmp_path):
    (tmp_path / "t.fvecs").write_bytes(b"\x08\x00\x00\x00abc")  # truncated row
    msg = _run(tmp_path, "--train", str(tmp_path / "t.fvecs"))
    assert "t.fvecs" in msg
    msg = _run(tmp_path, "--train", str(tmp_path / "missing.fvecs"))
    assert "missing.fvecs" in msg


def test_batch_not_divisible_by_devices(tmp_path):
    msg = _run(tmp_path, "--batch-size", "1020")
    assert "multiple of 8" in msg


def test_demo_defaults_and_flag_names():
    cfg = train_main.config_from_args([])
    assert cfg.dataset == "synthetic" and cfg.M == 4 and not cfg.persistent_adam
    cfg = train_main.config_from_args(["--dataset", "bigann1M", "--M", "16", "--rq-beam-size", "5", "--persistent-adam"])
    assert (cfg.M, cfg.K, cfg.rq_beam_size, cfg.persistent_adam, cfg.batch_size) == (16, 256, 5, True, 1024)


def test_resume_reads_the_saved_config(tmp_path):
    saved = train_main.config_from_args(["--train", "x.fvecs", "--M", "3", "--K", "16", "--workdir", str(tmp_path)])
    (tmp_path / "config.json").write_text(__import__("json").dumps(saved.to_dict()))
    cfg = train_main.config_from_args(["--workdir", str(tmp_path), "--resume", "--epochs", "7", "--no-progress"])
    assert (cfg.train, cfg.M, cfg.K, cfg.epochs, cfg.resume, cfg.progress) == ("x.fvecs", 3, 16, 7, True, False)
    with pytest.raises(SystemExit) as e:
        train_main.config_from_args(["--workdir", str(tmp_path), "--resume", "--M", "8"])
    assert "--M (8 vs saved 3)" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        train_main.config_from_args(["--workdir", str(tmp_path / "none"), "--resume"])
    assert "cannot read" in str(e.value.code)
