"""End-to-end runs of eval/main.py on a tiny codec and tiny vector files (in-process and one subprocess)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qinco_jax as qj
from eval import baselines
from eval import main as eval_main
from qinco_jax import data

from conftest import as_rq, need_matplotlib

ROOT = Path(__file__).resolve().parents[1]
D, NB, NQ = 16, 1000, 50


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny RQ-initialised codecs (M=4 x 4 bits = 2 bytes, equal to RQ; M=3) and db / queries / gt / train files."""
    root = tmp_path_factory.mktemp("eval_main")
    ds = data.synthetic(d=D, nt=2000, nval=0, nb=NB, nq=NQ, seed=3)
    qj.save(as_rq(qj.init_codec(qj.QincoConfig(d=D, K=16, M=4, L=1, h=16), ds.xt)), root / "codec")
    qj.save(qj.init_codec(qj.QincoConfig(d=D, K=16, M=3, L=1, h=16), ds.xt), root / "codec_m3")
    paths = {k: root / f"{k}.{ext}" for k, ext in (("train", "fvecs"), ("db", "fvecs"), ("queries", "fvecs"),
                                                   ("gt", "ivecs"))}
    for k, x in (("train", ds.xt), ("db", ds.xb), ("queries", ds.xq), ("gt", ds.gt)):
        data.write_vectors(paths[k], x)
    return {"root": root, "ds": ds, **paths}


def _args(files, model="codec", *extra):
    return ["--model", str(files["root"] / model), "--db", str(files["db"]), "--queries", str(files["queries"]),
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def result(files):
    """One full run with every baseline (LSQ included) and the default JSON / plot paths."""
    out = files["root"] / "res.json"
    eval_main.main(_args(files, "codec", "--gt", str(files["gt"]), "--train", str(files["train"]), "--baselines",
                         "--out", str(out)))
    return json.loads(out.read_text())


def _row(res, method):
    return next(r for r in res["table"] if r["method"] == method)


def test_qinco_mse_and_recalls(files, result):
    codec = qj.load(files["root"] / "codec")
    xb = files["ds"].xb
    xhat = qj.decode(codec, qj.encode(codec, xb))
    row = _row(result, "QINCo")
    assert row["mse"] == pytest.approx(float(((xb.astype(np.float64) - xhat) ** 2).sum(1).mean()), rel=1e-6)
    assert 0 <= row["r1"] <= row["r10"] <= row["r100"] <= 1
    assert row["bytes"] == 2 and row["encode_us"] > 0 and row["decode_us"] > 0
    assert result["data"] == {"name": "db", "d": D, "nb": NB, "nq": NQ, "groundtruth": "from the dataset"}


def test_rate_distortion(files, result):
    rd = result["rate_distortion"]
    q = rd["QINCo"]
    assert q["bytes"] == [0.5, 1.0, 1.5, 2.0]
    assert all(a > b for a, b in zip(q["mse"], q["mse"][1:]))
    assert q["mse"][-1] == _row(result, "QINCo")["mse"]
    assert set(rd) == {"QINCo", "PQ", "OPQ", "RQ", "RQ-beam5"}  # LSQ only with --rd-lsq
    for name, c in rd.items():
        assert c["bytes"] == q["bytes"] and c["mse"][0] > c["mse"][-1] == _row(result, name)["mse"]


def test_rate_distortion_plot(files, result):
    need_matplotlib()
    assert Path(result["plot"]) == files["root"] / "res.png" and Path(result["plot"]).stat().st_size > 1000


def test_baselines_at_the_same_code_size(result):
    assert [r["method"] for r in result["table"]] == ["QINCo", *baselines.BASELINES]
    for r in result["table"][1:]:
        assert r["bytes"] == 2 and r["mse"] > 0 and 0 <= r["r1"] <= r["r10"] <= r["r100"] <= 1
    assert result["nt_baselines"] == 2000
    # this QINCo is RQ with faiss's beam-1 codebooks: the same MSE through both pipelines
    assert _row(result, "QINCo")["mse"] == pytest.approx(_row(result, "RQ")["mse"], rel=1e-4)
    assert _row(result, "OPQ")["mse"] < _row(result, "PQ")["mse"]


def test_exact_groundtruth_memmap_and_unavailable_pq(files, capsys):
    out = files["root"] / "m3.json"
    eval_main.main(_args(files, "codec_m3", "--train", str(files["train"]), "--baselines", "PQ,RQ", "--nb", "600",
                         "--keep-decoded", str(files["root"] / "tmp" / "xb_decoded.npy"), "--out", str(out)))
    res = json.loads(out.read_text())
    assert res["data"]["nb"] == 600 and res["data"]["groundtruth"] == "exact search on the raw database"
    pq, rq = _row(res, "PQ"), _row(res, "RQ")
    assert pq["bytes"] == rq["bytes"] == 1.5 and pq.get("mse") is None and "divide" in pq["note"]
    assert [m is None for m in res["rate_distortion"]["PQ"]["mse"]] == [False, False, True]  # 3 does not divide 16
    kept = np.load(files["root"] / "tmp" / "xb_decoded.npy")  # asked to keep the decoded database
    codec = qj.load(files["root"] / "codec_m3")
    np.testing.assert_allclose(kept, qj.decode(codec, qj.encode(codec, files["ds"].xb[:600])), rtol=1e-6)
    assert ((kept - files["ds"].xb[:600]) ** 2).sum(1).mean() == pytest.approx(_row(res, "QINCo")["mse"], rel=1e-5)
    table = capsys.readouterr().out
    assert "QINCo" in table and "n/a" in table


def _fails(argv, *words):
    with pytest.raises(SystemExit) as e:
        eval_main.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("error:") and all(w in msg for w in words), msg


def test_dimension_mismatch(files):
    _fails(["--model", str(files["root"] / "codec"), "--dataset", "synthetic", "--nb", "200", "--no-progress"],
           "d=16", "d=32")


def test_groundtruth_out_of_range(files):
    bad = files["ds"].gt.copy()
    bad[3, 0] = 5000
    data.write_vectors(files["root"] / "bad_gt.ivecs", bad)
    _fails(_args(files, "codec", "--gt", str(files["root"] / "bad_gt.ivecs")), "5,000", "1,000")


def test_fewer_db_vectors_than_groundtruth(files):
    _fails(_args(files, "codec", "--gt", str(files["gt"]), "--nb", "10"), "only 10", "ground truth")


def test_non_finite_database_row(files):
    xb = files["ds"].xb.copy()
    xb[7, 2] = np.nan
    data.write_vectors(files["root"] / "nan_db.fvecs", xb)
    argv = _args(files, "codec")
    argv[argv.index("--db") + 1] = str(files["root"] / "nan_db.fvecs")
    _fails(argv, "database vectors", "row is 7")


def test_script_reports_errors_without_traceback(files):
    cmd = [sys.executable, str(ROOT / "eval" / "main.py"), "--model", str(files["root"] / "missing"),
           "--dataset", "synthetic"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=files["root"], timeout=120)
    assert p.returncode == 1 and p.stderr.startswith("error:") and "missing" in p.stderr
    assert "Traceback" not in p.stderr


def test_split_file(tmp_path):
    from eval import split_file

    x = np.arange(100 * 4, dtype=np.float32).reshape(100, 4)
    data.write_vectors(tmp_path / "x.fvecs", x)
    split_file.main([str(tmp_path / "x.fvecs"), "--out", str(tmp_path / "parts"), "--nt", "60", "--nb", "30"])
    parts = {p: data.read_vectors(tmp_path / "parts" / f"{p}.fvecs", mmap=False) for p in split_file.PARTS}
    assert [len(parts[p]) for p in split_file.PARTS] == [60, 30, 10]
    rows = np.concatenate([parts[p][:, 0] for p in split_file.PARTS])
    assert sorted(rows) == sorted(x[:, 0]) and not np.array_equal(rows, x[:, 0])  # disjoint, shuffled
    again = split_file.split(x, 60, 30, seed=0)
    assert all(np.array_equal(again[p], parts[p]) for p in split_file.PARTS)
    with pytest.raises(SystemExit, match="cannot split 100 rows"):
        split_file.main([str(tmp_path / "x.fvecs"), "--out", str(tmp_path / "p2"), "--nt", "90", "--nb", "20"])


def test_named_dataset_without_training_file(files, tmp_path):
    """`--dataset NAME` without --baselines reads only the database, the queries and the ground truth."""
    root = tmp_path / "data"
    (root / "sift").mkdir(parents=True)
    for rel, key in (("sift/sift_base.fvecs", "db"), ("sift/sift_query.fvecs", "queries"),
                     ("sift/sift_groundtruth.ivecs", "gt")):
        (root / rel).write_bytes(files[key].read_bytes())
    out = tmp_path / "res.json"
    eval_main.main(["--model", str(files["root"] / "codec"), "--dataset", "sift1M", "--data-dir", str(root),
                    "--out", str(out), "--no-progress"])
    res = json.loads(out.read_text())
    assert res["data"]["nb"] == NB and res["data"]["groundtruth"] == "from the dataset"
    with pytest.raises(SystemExit, match="no train file found"):  # the baselines do need it
        eval_main.main(["--model", str(files["root"] / "codec"), "--dataset", "sift1M", "--data-dir", str(root),
                        "--baselines", "RQ", "--out", str(out), "--no-progress"])


def test_rate_distortion_of_an_ivf_codec_counts_the_steps_after_the_list_id(files):
    ds = files["ds"]
    codec = as_rq(qj.init_codec(qj.QincoConfig(d=D, K=16, M=3, L=1, h=16, nlist=8), ds.xt))
    xb = np.asarray(ds.xb[:300], np.float64)
    codes = qj.encode(codec, xb)
    assert codes.shape == (300, 4)
    full = float(((qj.decode(codec, codes) - xb) ** 2).sum(1).mean())
    rd = eval_main.qinco_rd(codec, codes, xb, full)
    want = [float(((qj.decode(codec, codes[:, : 1 + m]) - xb) ** 2).sum(1).mean()) for m in (1, 2)]
    np.testing.assert_allclose(rd[:2], want, rtol=1e-6)
    assert rd[0] > rd[1] > rd[2] == full
