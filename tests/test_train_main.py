"""End-to-end runs of `python train/main.py` as a user starts it (real subprocesses)."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qinco_jax as qj

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["--K", "16", "--M", "3", "--L", "1", "--h", "16", "--nt", "3000", "--nval", "500", "--nb", "500",
            "--batch-size", "512", "--no-progress", "--lr", "3e-3"]

pytestmark = pytest.mark.slow
PLOTS = importlib.util.find_spec("matplotlib") is not None  # the optional `plots` extra draws training.png


def _env(devices: int = 1) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _train(workdir, *extra, devices=1, check=True):
    cmd = [sys.executable, str(ROOT / "train" / "main.py"), *TINY_RUN, "--workdir", str(workdir), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(devices), timeout=600)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def _leaves(codec):
    import jax

    return [np.asarray(a) for a in jax.tree.leaves(codec.params)]


def test_main_job_writes_its_outputs(tmp_path):
    p = _train(tmp_path / "run", "--epochs", "3")
    out = p.stdout
    assert "faiss RQ, beam 1" in out and "QINCo (best epoch" in out
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]  # epoch 0: the initial model
    assert rows[0]["initial"] and rows[0]["train_loss"] is None
    for r in rows:
        assert {"epoch", "lr", "train_loss", "val_mse", "seconds"} <= set(r)
    assert rows[-1]["val_mse"] < rows[0]["val_mse"]
    png = tmp_path / "run" / "training.png"
    assert png.stat().st_size > 1000 if PLOTS else not png.exists()  # no plot, and no error, without matplotlib
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["M"] == 3 and cfg["K"] == 16
    codec = qj.load(tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    best = min(r["val_mse"] for r in rows)
    assert summary["qinco_val_mse"] == pytest.approx(best, rel=1e-5)
    assert summary["val_mse_init"] > best  # every run records the validation MSE before its first step
    assert codec.config.M == 3
    # the same command again shows the finished run's results and says how to train again
    p2 = _train(tmp_path / "run", "--epochs", "3")
    assert "holds a finished run (3 epochs)" in p2.stdout and "choose another --workdir" in p2.stdout
    assert f"{best:.6g}" in p2.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    # a different command there is refused, and changes nothing
    p3 = _train(tmp_path / "run", "--epochs", "3", "--M", "4", check=False)
    assert p3.returncode != 0 and "already holds a different run" in p3.stderr


def test_resume_after_sigkill_gives_the_same_result(tmp_path):
    _train(tmp_path / "straight", "--epochs", "4")
    cmd = [sys.executable, str(ROOT / "train" / "main.py"), *TINY_RUN, "--workdir", str(tmp_path / "killed"),
           "--epochs", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("epoch   1"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    rows = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) < 5  # it really was cut short
    p = _train(tmp_path / "killed", "--epochs", "4", "--resume")
    assert "resuming" in p.stdout
    a = json.loads((tmp_path / "straight" / "summary.json").read_text())
    b = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert a["qinco_val_mse"] == pytest.approx(b["qinco_val_mse"], rel=1e-6)
    for x, y in zip(_leaves(qj.load(tmp_path / "straight")), _leaves(qj.load(tmp_path / "killed"))):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    ra = [json.loads(ln)["val_mse"] for ln in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(ln)["val_mse"] for ln in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(ra, rb, rtol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
    _train(tmp_path / "single", "--epochs", "2", devices=8)
    port = _free_port()
    procs = []
    for pid in range(2):
        cmd = [sys.executable, str(ROOT / "train" / "main.py"), *TINY_RUN, "--workdir", str(tmp_path / "multi"),
               "--epochs", "2", "--distributed", "--coordinator-address", f"127.0.0.1:{port}",
               "--num-processes", "2", "--process-id", str(pid)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(4)))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(outs)
    assert "8 device(s) over 2 process(es)" in outs[0]
    for x, y in zip(_leaves(qj.load(tmp_path / "single")), _leaves(qj.load(tmp_path / "multi"))):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_ctrl_c_says_where_it_stopped(tmp_path, monkeypatch, capsys):
    from train import loop
    from train import main as train_main

    def interrupt(cfg):
        os.makedirs(os.path.join(cfg.workdir, "checkpoints", "4"), exist_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "run", interrupt)
    with pytest.raises(SystemExit) as info:
        train_main.main(["--workdir", str(tmp_path / "run"), "--epochs", "10"])
    assert info.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted: " in err and "checkpoint of epoch 4;" in err and "run the same command again" in err
    assert "Traceback" not in err


def test_ctrl_c_before_the_first_trained_epoch(tmp_path, monkeypatch, capsys):
    """Only the initial model's checkpoint (epoch 0) exists: the message says so."""
    from train import loop
    from train import main as train_main

    def interrupt(cfg):
        os.makedirs(os.path.join(cfg.workdir, "checkpoints", "0"), exist_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "run", interrupt)
    with pytest.raises(SystemExit):
        train_main.main(["--workdir", str(tmp_path / "run"), "--epochs", "10"])
    assert "checkpoint of the initial model (epoch 0)" in capsys.readouterr().err
