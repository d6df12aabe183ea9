"""A training workdir survives a SIGKILL at any instant: real runs killed at many points, then
continued with the same command or with --resume, give the same codec as an uninterrupted run.

Kill points are counted in file-system operations (open for writing, rename, replace, unlink,
mkdir, rmtree): a driver process wraps those functions and kills itself with SIGKILL at the N-th
call, so the instants are reproducible, and include the inside of the first checkpoint write.
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import qinco_jax as qj

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 2
TINY_RUN = ["--K", "16", "--M", "2", "--L", "1", "--h", "8", "--nt", "1024", "--nval", "256", "--nb", "256",
            "--batch-size", "512", "--no-progress", "--lr", "3e-3", "--epochs", str(EPOCHS)]

pytestmark = pytest.mark.slow
PLOTS = importlib.util.find_spec("matplotlib") is not None  # the optional `plots` extra draws training.png

DRIVER = r"""
import builtins, os, shutil, signal, sys
kill_at, argv = int(sys.argv[1]), sys.argv[2:]
count = 0

def hit():
    global count
    count += 1
    if count == kill_at:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

def wrap(mod, name):
    orig = getattr(mod, name)
    def f(*a, **k):
        hit()
        return orig(*a, **k)
    setattr(mod, name, f)

for name in ("rename", "replace", "unlink", "mkdir"):
    wrap(os, name)
wrap(shutil, "rmtree")
real_open = builtins.open
def open_(file, mode="r", *a, **k):
    if any(c in mode for c in "wax+"):
        hit()
    return real_open(file, mode, *a, **k)
builtins.open = open_

from qinco_jax import checkpoint
real_save = checkpoint.TrainCheckpoints.save
def save(self, epoch, *a, **k):
    print(f"CKPT {epoch} BEGIN {count}", flush=True)
    real_save(self, epoch, *a, **k)
    print(f"CKPT {epoch} END {count}", flush=True)
checkpoint.TrainCheckpoints.save = save

from train import main
main.main(argv)
print(f"CALLS {count}", flush=True)
"""


def _env() -> dict:
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT)}


def _drive(workdir, kill_at: int, *extra):
    cmd = [sys.executable, "-c", DRIVER, str(kill_at), *TINY_RUN, "--workdir", str(workdir), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)


def _marks(out: str) -> dict:
    return {" ".join(ln.split()[:-1]): int(ln.split()[-1]) for ln in out.splitlines()
            if ln.startswith(("CKPT", "CALLS"))}


def _result(workdir: Path):
    rows = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["epoch"] for r in rows], [r["val_mse"] for r in rows], json.loads((workdir / "summary.json").read_text())


def test_killed_at_many_instants_then_continued(tmp_path):
    straight = _drive(tmp_path / "straight", 0)
    assert straight.returncode == 0, straight.stderr[-3000:]
    marks = _marks(straight.stdout)
    total, begin, end = marks["CALLS"], marks["CKPT 0 BEGIN"], marks["CKPT 0 END"]
    epochs, vals, summary = _result(tmp_path / "straight")
    assert epochs == list(range(EPOCHS + 1))  # epoch 0: the initial model
    second = marks["CKPT 1 BEGIN"]
    # before the first checkpoint (while the first best codec is saved), inside the first checkpoint
    # write, at its last step, inside the second epoch's save of the best codec, and in the summary
    # the summary's writes come after the last checkpoint, whose own count varies by a few operations from
    # run to run (orbax removes the oldest checkpoint beside the new one): a point counted from that
    # checkpoint's end, not from the total, is reached by every run
    summary_point = marks[f"CKPT {EPOCHS} END"] + 3
    assert summary_point < total, marks
    points = sorted({begin - 2, (begin + end) // 2 + 1, end, min(end + 12, second - 1), summary_point})
    assert begin + 1 < (begin + end) // 2 + 1 < end, "the first checkpoint write is several operations"
    for i, n in enumerate(points):
        run = tmp_path / f"k{n}"
        killed = _drive(run, n)
        assert killed.returncode == -signal.SIGKILL, (n, killed.stderr[-2000:])
        if i == len(points) // 2 and run.exists():  # a moved workdir continues where it now is
            shutil.move(run, tmp_path / f"moved{n}")
            run = tmp_path / f"moved{n}"
        if run.exists() and (run / "metrics.jsonl").exists() and i % 2:
            with open(run / "metrics.jsonl", "a") as f:  # a torn last line, as a kill inside a write leaves it
                f.write('{"epoch": 7, "lr"')
        extra = ("--resume",) if i % 2 and (run / "config.json").exists() else ()
        again = _drive(run, 0, *extra)
        assert again.returncode == 0, (n, again.stdout[-2000:], again.stderr[-3000:])
        assert str(run) in again.stdout
        got_epochs, got_vals, got_summary = _result(run)
        assert got_epochs == epochs, n
        assert got_vals == pytest.approx(vals, rel=1e-6), n
        assert got_summary["qinco_val_mse"] == pytest.approx(summary["qinco_val_mse"], rel=1e-6), n
        leftovers = [p.name for p in run.rglob("*") if ".tmp" in p.name or "orbax-checkpoint-tmp" in p.name]
        assert not leftovers, (n, leftovers)
        assert qj.load(run).config.M == 2


def test_leftovers_of_a_killed_start_are_cleaned(tmp_path):
    """A workdir whose run died before its first checkpoint, with stray temporary files from
    interrupted writes, restarts cleanly with the same command."""
    run = tmp_path / "run"
    killed = _drive(run, 0, "--epochs", "1")
    assert killed.returncode == 0, killed.stderr[-3000:]
    shutil.rmtree(run / "checkpoints")  # as if killed before the first checkpoint completed
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "0.orbax-checkpoint-tmp-123").mkdir()
    (run / ".tmp-best-abc").mkdir()
    (run / "summary.json.x1y2.tmp").write_text("{")
    (run / "metrics.jsonl").write_text('{"epoch": 0, "lr": 0.003, "train_loss": 0.1, "val_mse": 5.0}\n{"epo')
    again = _drive(run, 0, "--epochs", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "starting the run from the beginning" in again.stdout
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["best", "checkpoints", "config.json", "metrics.jsonl", "summary.json"] + ["training.png"] * PLOTS)
    assert sorted(os.listdir(run / "checkpoints")) == ["0", "1"]  # the initial model and epoch 1
