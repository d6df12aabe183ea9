"""eval/sweep_ab.py (MSE against encode speed over (A, B) search settings) and eval/compare.py (runs side by
side: table and validation curves), on tiny codecs and a tiny QINCo2 training run."""

import importlib.util
import json

import jax
import numpy as np
import pytest

import qinco_jax as qj
from eval import compare, sweep_ab
from eval import main as eval_main
from qinco_jax import data

from conftest import need_matplotlib
from test_train_qinco2 import _train

D, K, M = 16, 16, 3


@pytest.fixture(scope="module")
def v2_codec():
    """A QINCo2 codec with pre-selection and noisy (non-zero) weights, so every part of the step works."""
    ds = data.synthetic(d=D, nt=2000, nval=0, nb=300, nq=10, seed=5)
    cfg = qj.QincoConfig(d=D, K=K, M=M, L=1, h=16, variant="qinco2", de=24, A=4, B=2)
    codec = qj.init_codec(cfg, ds.xt)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: a + rng.normal(scale=0.05, size=a.shape).astype(np.float32), codec.params)
    return qj.Codec(cfg, params, codec.norm), ds


def test_parse_settings():
    assert sweep_ab.parse_settings("K:1, 4:2,4:2,0:1", 16) == [(16, 1), (4, 2), (0, 1)]
    for bad in ("4", "4:2:1", "a:1", "", "4:"):
        with pytest.raises(ValueError, match="--settings"):
            sweep_ab.parse_settings(bad, 16)


def test_sweep_rows(v2_codec):
    codec, ds = v2_codec
    x = ds.xb[:200]
    full = K ** (M - 1)  # every code of every beam: the exact optimum over the K^M tuples
    rows = sweep_ab.sweep(codec, x, [(K, 1), (0, 1), (4, 2), (K, full)], progress=False)
    by = {(r["A"], r["B"]): r for r in rows}
    for r in rows:
        assert r["mse"] == pytest.approx(r["mse_decoded"], rel=1e-4)  # the encoder's error is the decoded one
        assert r["vps"] > 0 and r["us_per_vector"] == pytest.approx(1e6 / r["vps"])
    assert by[(K, 1)]["mse"] == by[(0, 1)]["mse"]  # all K codes pre-selected = no pre-selection
    assert by[(K, 1)]["evals_per_step"] == by[(0, 1)]["evals_per_step"] == K and by[(4, 2)]["evals_per_step"] == 8
    assert by[(K, full)]["mse"] <= min(r["mse"] for r in rows) + 1e-9
    greedy = qj.encode(codec, x, beam=1, candidates=0)
    assert by[(K, 1)]["mse"] == pytest.approx(
        float(((np.asarray(qj.decode(codec, greedy), np.float64) - x) ** 2).sum(1).mean()), rel=1e-4)


def test_sweep_cli(v2_codec, tmp_path, capsys, without_matplotlib):
    """The sweep CLI, on an install without matplotlib: results written, no plot, no crash."""
    codec, ds = v2_codec
    qj.save(codec, tmp_path / "codec")
    data.write_vectors(tmp_path / "db.fvecs", ds.xb)
    base = ["--model", str(tmp_path / "codec"), "--db", str(tmp_path / "db.fvecs"), "--no-progress"]
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    assert sweep_ab.main(base + ["--nb", "100", "--settings", "K:1,4:2", "--out", str(out), "--plot", str(png)]) == 0
    res = json.loads(out.read_text())
    assert res["nb"] == 100 and [(r["A"], r["B"]) for r in res["rows"]] == [(K, 1), (4, 2)]
    assert res["matmul_gflops"] > 0 and not png.exists()
    assert "no plot: plotting needs matplotlib" in capsys.readouterr().err
    for settings, msg in (("17:1", "candidates must be between 0"), ("4:0", "beam must be >= 1"),
                          ("4x2", "not A:B")):
        assert sweep_ab.main(base + ["--settings", settings]) == 2
        assert msg in capsys.readouterr().err
    v1 = qj.init_codec(qj.QincoConfig(d=D, K=K, M=M, L=1, h=16), ds.xb)
    qj.save(v1, tmp_path / "v1")
    assert sweep_ab.main(["--model", str(tmp_path / "v1"), "--db", str(tmp_path / "db.fvecs"), "--settings", "4:1"]) == 2
    assert "trained without it" in capsys.readouterr().err
    data.write_vectors(tmp_path / "d8.fvecs", ds.xb[:, :8])
    assert sweep_ab.main(["--model", str(tmp_path / "codec"), "--db", str(tmp_path / "d8.fvecs")]) == 2
    assert "dimension 8" in capsys.readouterr().err


def test_sweep_and_compare_plots(tmp_path):
    need_matplotlib()
    rows = [{"A": 16, "B": 1, "vps": 5000.0, "mse": 2.0}, {"A": 4, "B": 2, "vps": 800.0, "mse": 1.5}]
    sweep_ab.plot(rows, str(tmp_path / "s.png"), "sweep")
    records = [{"label": "a", "curve": {"epoch": [0, 1, 2], "val_mse": [5.0, 2.0, 1.8]}},
               {"label": "b", "curve": {"epoch": [0, 1], "val_mse": [5.0, 2.5]}}]
    compare.plot(records, str(tmp_path / "c.png"), "runs")
    assert (tmp_path / "s.png").stat().st_size > 1000 and (tmp_path / "c.png").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "s.png"]  # no temporary file left


@pytest.mark.slow
def test_compare_runs(tmp_path, capsys):
    run = tmp_path / "run"
    _train(run, "--epochs", "2")
    eval_main.main(["--model", str(run), "--dataset", "synthetic", "--nb", "500", "--name", "tiny", "--no-progress"])
    ev = json.loads((run / "eval_tiny.json").read_text())
    assert ev["table"][0]["method"] == "QINCo2" and set(ev["rate_distortion"]) == {"QINCo2"}
    capsys.readouterr()
    out, png = tmp_path / "c.json", tmp_path / "c.png"
    assert compare.main(["--run", "QINCo2 = tiny=" + str(run), "--name", "tiny", "--out", str(out),
                         "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "| QINCo2 = tiny | 2 |" in text
    res = json.loads(out.read_text())
    row, rec = res["table"][0], res["runs"][0]
    assert row["mse"] == ev["table"][0]["mse"] and row["r10"] == ev["table"][0]["r10"] and row["epochs"] == 2
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["initial"] and rows[0]["epoch"] == 0  # epoch 0 is the initial model
    metrics = rows[1:]
    assert row["train_s_per_epoch"] == pytest.approx(np.mean([m["seconds"] for m in metrics]))
    summary = json.loads((run / "summary.json").read_text())
    assert rec["curve"] == {"epoch": [0, 1, 2], "val_mse": [summary["val_mse_init"]] + [m["val_mse"] for m in metrics]}
    assert png.exists() == (importlib.util.find_spec("matplotlib") is not None)  # no plot, and no crash, without it
    assert compare.main(["--run", "no label", "--name", "tiny"]) == 2
    assert "LABEL=WORKDIR" in capsys.readouterr().err
    assert compare.main(["--run", f"x={run}", "--name", "other"]) == 2
    assert "eval_other.json does not exist" in capsys.readouterr().err
