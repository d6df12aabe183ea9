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
    assert "--M 3 there, 8 here" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        train_main.config_from_args(["--workdir", str(tmp_path / "none"), "--resume"])
    assert "holds no run to resume" in str(e.value.code)
    assert not (tmp_path / "none").exists()
    # a moved run resumes where it now is
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "config.json").write_text((tmp_path / "config.json").read_text())
    cfg = train_main.config_from_args(["--workdir", str(moved), "--resume"])
    assert cfg.workdir == str(moved)


BAD_FLAGS = [
    (["--M", "0"], "--M 0"), (["--K", "1000"], "power of two"), (["--K", "1"], "--K 1"), (["--L", "-1"], "--L -1"),
    (["--h", "0"], "--h 0"), (["--batch-size", "0"], "--batch-size 0"), (["--epochs", "0"], "--epochs 0"),
    (["--lr", "-1"], "--lr -1.0"), (["--lr", "nan"], "--lr nan"), (["--lr", "inf"], "--lr inf"),
    (["--lr", "0"], "--lr 0.0"), (["--nt", "0"], "--nt 0"), (["--nval", "-5"], "--nval -5"), (["--nb", "0"], "--nb 0"),
    (["--seed", "-1"], "--seed -1"), (["--rq-beam-size", "0"], "--rq-beam-size 0"),
    (["--num-processes", "2", "--process-id", "2"], "--process-id 2"), (["--db", "x.fvecs"], "only used with --train"),
    (["--dataset", "sift1M", "--train", "x.fvecs"], "either --dataset or --train"),
    (["--init", "rq_exact"], "--init 'rq_exact': must be one of ('original', 'rq-exact')"),
    (["--train-A", "4"], "--train-A 4: is a QINCo2 option (--model qinco2-*)"),
    (["--model", "qinco2-S", "--A", "0", "--train-A", "4"], "--train-A 4: needs a model with pre-selection (--A > 0)"),
]


@pytest.mark.parametrize("flags,named", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_fail_at_once_and_leave_nothing(tmp_path, flags, named):
    with pytest.raises(SystemExit) as e:
        train_main.config_from_args([*flags, "--workdir", str(tmp_path / "run")])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and named in msg and "\n" not in msg
    assert not (tmp_path / "run").exists()


def test_bad_flag_in_a_real_process_imports_nothing_heavy(tmp_path):
    """The checks run before jax is imported (so they answer in about a second) and write nothing."""
    import subprocess
    import sys

    code = ("import sys; from train import main\n"
            "try:\n    main.main(sys.argv[1:])\nexcept SystemExit as e:\n    print(e.code)\n"
            "print('jax' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code, "--batch-size", "0", "--workdir", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=120)
    out = p.stdout.splitlines()
    assert out[0].startswith("error: --batch-size 0") and out[1] == "False", p.stdout + p.stderr
    assert not (tmp_path / "run").exists()


def test_help_documents_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        train_main.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    ap = train_main.parser()
    for action in ap._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and "default" in action.help, action.option_strings
    assert "(default: 8 on real data, 4 on the synthetic demo)" in out  # --M
    assert "(default: 1000 on real data, 100 on the synthetic demo)" in out  # --epochs


def test_same_command_on_a_different_run_is_refused(tmp_path):
    saved = train_main.config_from_args(["--M", "3", "--workdir", str(tmp_path)])
    (tmp_path / "config.json").write_text(__import__("json").dumps(saved.to_dict()))
    again = train_main.config_from_args(["--M", "3", "--workdir", str(tmp_path), "--no-progress"])
    assert again.resume and again.M == 3  # the same command continues the run
    with pytest.raises(SystemExit) as e:
        train_main.config_from_args(["--M", "4", "--workdir", str(tmp_path)])
    assert "already holds a different run" in str(e.value.code) and "--M 3 there, 4 here" in str(e.value.code)


def test_same_ivf_command_again_continues(tmp_path):
    """A run started with --ivf-centroids saved nlist from the file; the same command is still the same run."""
    import dataclasses
    import json

    first = train_main.config_from_args(["--ivf-centroids", "c.npy", "--workdir", str(tmp_path)])
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.replace(first, ivf=4).to_dict()))
    again = train_main.config_from_args(["--ivf-centroids", "c.npy", "--workdir", str(tmp_path)])
    assert again.resume and again.ivf == 4 and again.ivf_centroids == "c.npy"
    with pytest.raises(SystemExit) as e:
        train_main.config_from_args(["--ivf-centroids", "other.npy", "--workdir", str(tmp_path)])
    assert "--ivf-centroids 'c.npy' there, 'other.npy' here" in str(e.value.code)


def test_rq_exact_learning_rate_rule(tmp_path):
    """QINCo v1 from the exact RQ start gets its own default learning rate; an explicit --lr and the QINCo2
    presets' own rate win."""
    from train.config import RQ_EXACT_V1_LR

    base = ["--train", "x.fvecs", "--workdir", str(tmp_path / "w")]
    assert train_main.config_from_args(base + ["--init", "original"]).lr == 1e-3
    assert train_main.config_from_args(base + ["--init", "rq-exact"]).lr == RQ_EXACT_V1_LR
    assert train_main.config_from_args(base + ["--init", "rq-exact", "--lr", "2e-3"]).lr == 2e-3
    assert train_main.config_from_args(base + ["--init", "rq-exact", "--model", "qinco2-S"]).lr == 8e-4


def test_init_defaults_and_old_name(tmp_path):
    """On real data the command line starts from the exact RQ (lr 3e-4 for QINCo v1); the built-in demo keeps
    the originals' init; "default", the original init's old name, still reads as "original", also in a run
    saved under it (which then continues)."""
    import json

    import qinco_jax as qj
    from train.config import INIT_ALIASES, INITS, RQ_EXACT_V1_LR

    assert (INITS, INIT_ALIASES) == (qj.initialise.INITS, qj.initialise.INIT_ALIASES)  # the two copies agree
    real = train_main.config_from_args(["--train", "x.fvecs", "--workdir", str(tmp_path / "a")])
    assert (real.init, real.lr) == ("rq-exact", RQ_EXACT_V1_LR)
    assert train_main.config_from_args(["--workdir", str(tmp_path / "b")]).init == "original"
    old = train_main.config_from_args(["--train", "x.fvecs", "--init", "default", "--workdir", str(tmp_path / "c")])
    assert (old.init, old.lr) == ("original", 1e-3)
    (tmp_path / "d").mkdir()
    saved = {**old.to_dict(), "init": "default", "workdir": str(tmp_path / "d")}
    (tmp_path / "d" / "config.json").write_text(json.dumps(saved))
    again = train_main.config_from_args(["--train", "x.fvecs", "--init", "original", "--workdir", str(tmp_path / "d")])
    assert again.init == "original" and again.resume


def test_training_search_default_on_real_data(tmp_path):
    """QINCo2 on real data trains with at most A 8, B 8 unless --train-A or --train-B is given (the codec keeps its
    own search); the demo, QINCo v1, searches already that cheap, and runs saved before the rule keep theirs."""
    import json

    def cfg(*flags, real=True, name="w"):
        data = ["--train", "x.fvecs"] if real else []
        return train_main.config_from_args([*data, *flags, "--workdir", str(tmp_path / name)])

    q2 = cfg("--model", "qinco2-S")
    assert (q2.A, q2.B, q2.train_A, q2.train_B) == (16, 32, 8, 8)
    assert (cfg("--model", "qinco2-S", real=False).train_A, cfg("--model", "qinco2-S", real=False).train_B) == (None, None)
    assert (cfg("--model", "qinco2-S", "--train-A", "16", "--train-B", "32").train_A,) == (16,)
    only_b = cfg("--model", "qinco2-S", "--train-B", "16")
    assert (only_b.train_A, only_b.train_B) == (None, 16)  # one flag given: the other is the model's
    small = cfg("--model", "qinco2-S", "--A", "4", "--B", "8")
    assert (small.train_A, small.train_B) == (None, None)
    no_pre = cfg("--model", "qinco2-S", "--A", "0", "--B", "16")
    assert (no_pre.train_A, no_pre.train_B) == (None, 8)
    assert (cfg().train_A, cfg().train_B) == (None, None)  # QINCo v1
    (tmp_path / "old").mkdir()
    saved = {**q2.to_dict(), "train_A": None, "train_B": None, "workdir": str(tmp_path / "old")}
    (tmp_path / "old" / "config.json").write_text(json.dumps(saved))
    again = cfg("--model", "qinco2-S", name="old")
    assert again.resume and (again.train_A, again.train_B) == (None, None)
