"""End-to-end runs of eval/search.py (build, then the search sweep) on tiny codecs and vector files."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

import qinco_jax as qj
from eval import search as cli
from qinco_jax import data

from conftest import as_rq, need_matplotlib
from qinco_jax import search as S

D, NB, NQ = 16, 800, 40


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_search")
    ds = data.synthetic(d=D, nt=2000, nval=0, nb=NB, nq=NQ, seed=4)
    qj.save(as_rq(qj.init_codec(qj.QincoConfig(d=D, K=16, M=4, L=1, h=16), ds.xt)), root / "codec")
    qj.save(qj.init_codec(qj.QincoConfig(d=D, K=16, M=4, L=1, h=16), ds.xt, seed=1), root / "other")
    paths = {k: root / f"{k}.{ext}" for k, ext in (("train", "fvecs"), ("db", "fvecs"), ("queries", "fvecs"),
                                                   ("gt", "ivecs"))}
    for k, x in (("train", ds.xt), ("db", ds.xb), ("queries", ds.xq), ("gt", ds.gt)):
        data.write_vectors(paths[k], x)
    data.write_vectors(root / "q15.fvecs", ds.xq[:, :15])
    return {"root": root, "ds": ds, **paths}


@pytest.fixture(scope="module")
def built(files):
    out = files["root"] / "idx"
    cli.main(["build", "--model", str(files["root"] / "codec"), "--db", str(files["db"]), "--train",
              str(files["train"]), "--out", str(out), "--pairwise", "2", "--part-size", "300", "--no-progress"])
    return out


def _search(files, index, *extra):
    out = files["root"] / "res.json"
    cli.main(["search", "--index", str(index), "--queries", str(files["queries"]), "--gt", str(files["gt"]),
              "--out", str(out), *extra])
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def swept(files, built):
    return _search(files, built, "--nshort", f"10,{NB}", "--pairwise-factor", "1,3", "--baselines", "--ceiling",
                   "--db", str(files["db"]), "--train", str(files["train"]))


def check_sweep_values(rows: list[dict]) -> None:
    """Every recall is a share in [0, 1]; the stage times of a setting fit in its total time; at a fixed nprobe a
    longer shortlist finds the true neighbour at least as often (its first k are the shorter one's)."""
    for r in rows:
        assert all(r.get(f"r{k}{s}") is None or 0 <= r[f"r{k}{s}"] <= 1 for k in cli.KS for s in ("", "_short")), r
        if "t_decode_ms" in r:  # a QINCo setting: total time per query = 1000 / qps ms
            stages = r["t_short_ms"] + r["t_pair_ms"] + r["t_decode_ms"] + r["t_rerank_ms"]
            assert 0 < stages <= 1e3 / r["qps"] * (1 + 1e-9), r
            assert (r["t_pair_ms"] > 0) == (r["pf"] > 1), r  # the pairwise stage runs (and is timed) only for pf > 1
        elif "t_short_ms" in r:  # a shortlist alone or a faiss baseline: the one stage is the whole time
            assert r["qps"] * r["t_short_ms"] == pytest.approx(1e3), r
    short = [r for r in rows if r["method"].endswith("shortlist (no re-rank)")]
    assert short
    for nprobe in {r["nprobe"] for r in short}:
        mine = sorted((r for r in short if r["nprobe"] == nprobe), key=lambda r: r["nshort"])
        assert len(mine) > 1
        for a, b in zip(mine, mine[1:]):
            for k in cli.KS:
                assert a[f"r{k}"] is None or b[f"r{k}"] >= a[f"r{k}"], (k, a, b)
            # the share of queries whose neighbour is in the shortlist at all (up to the largest reported k)
            deepest = [next(r[f"r{k}"] for k in reversed(cli.KS) if r[f"r{k}"] is not None) for r in (a, b)]
            assert deepest[1] >= deepest[0], (a, b)
    # the shortlist without the QINCo stage is faster than the same shortlist with it
    for r in rows:
        if r["method"] in ("QINCo", "IVF-QINCo"):
            alone = next(s for s in short if (s["nprobe"], s["nshort"]) == (r["nprobe"], r["nshort"]))
            assert alone["qps"] > r["qps"]


def test_build_and_sweep(built, swept):
    meta = S.read_index_meta(built)
    assert meta["ntotal"] == NB and meta["pairwise"] and meta["nt"] == 2000
    rows = swept["rows"]
    methods = {r["method"] for r in rows}
    assert {"QINCo", "QINCo shortlist (no re-rank)", "QINCo +pairwise", "PQ4x4", "RQ4x4_Nqint8", "PQ4x4fs",
            "QINCo decoded, exact search (ceiling)"} <= methods
    ceiling = next(r for r in rows if "ceiling" in r["method"])
    full = next(r for r in rows if r["method"] == "QINCo" and r["nshort"] == NB)
    # re-ranking the whole database is exact search over the decoded database
    assert (full["r1"], full["r10"], full["r100"]) == (ceiling["r1"], ceiling["r10"], ceiling["r100"])
    short = next(r for r in rows if r["method"] == "QINCo" and r["nshort"] == 10)
    assert short["r100"] is None and short["r10"] is not None  # R@100 needs 100 candidates
    check_sweep_values(rows)


def test_sweep_plot(files, swept):
    need_matplotlib()
    assert swept["plot"] == str(files["root"] / "res.png") and Path(swept["plot"]).stat().st_size > 1000


def test_sweep_without_matplotlib(files, built, without_matplotlib, capsys):
    """Without matplotlib the sweep still writes its results, and says there is no plot."""
    out = files["root"] / "nompl.json"
    cli.main(["search", "--index", str(built), "--queries", str(files["queries"]), "--gt", str(files["gt"]),
              "--nshort", "10", "--out", str(out)])
    res = json.loads(out.read_text())
    assert "plot" not in res and not out.with_suffix(".png").exists() and [r["nshort"] for r in res["rows"]] == [10, 10]
    assert "no plot: plotting needs matplotlib" in capsys.readouterr().err


def test_search_bad_input(files, built, tmp_path):
    with pytest.raises(SystemExit, match="dimension 15, the index holds d=16"):
        cli.main(["search", "--index", str(built), "--queries", str(files["root"] / "q15.fvecs")])
    with pytest.raises(SystemExit, match="built with another model"):
        cli.main(["search", "--index", str(built), "--model", str(files["root"] / "other"), "--queries",
                  str(files["queries"])])
    with pytest.raises(SystemExit, match="not a search index"):
        cli.main(["search", "--index", str(tmp_path), "--queries", str(files["queries"])])
    with pytest.raises(SystemExit, match="dimension"):
        cli.main(["build", "--model", str(files["root"] / "codec"), "--db", str(files["root"] / "q15.fvecs"),
                  "--train", str(files["train"]), "--out", str(tmp_path / "x")])


def test_interrupted_codes_refused_then_resumed(files, tmp_path):
    """A build whose database encoding did not finish is refused by search; the same build command resumes it."""
    out = tmp_path / "idx"
    args = ["build", "--model", str(files["root"] / "codec"), "--db", str(files["db"]), "--train",
            str(files["train"]), "--out", str(out), "--part-size", "300", "--no-progress"]
    cli.main(args)
    progress = out / S.DB_CODES / "done.p0of1.json"
    progress.write_text(json.dumps({"rows_done": 300, "lo": 0, "hi": NB}))  # as if killed after one part
    with pytest.raises(SystemExit, match="unfinished .*300 of 800.*resume"):
        cli.main(["search", "--index", str(out), "--queries", str(files["queries"])])
    cli.main(args)
    codec = qj.load(files["root"] / "codec")
    np.testing.assert_array_equal(S.open_codes(out / S.DB_CODES, codec), qj.encode(codec, files["ds"].xb))
    assert os.path.exists(out / S.INDEX_FAISS)


def test_moved_index_folder_searches_with_its_own_codec(files, built, tmp_path):
    """The build saves the codec inside the folder and records paths relative to it: a moved (or shared)
    folder still searches; recorded paths that lead out are not followed unless given as flags."""
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(built, moved)
    meta = S.read_index_meta(moved)
    assert meta["model"] == "codec" and not os.path.isabs(meta["db"])
    res = _search(files, moved, "--nshort", "10")
    assert res["rows"] and all(r["r10"] > 0.2 for r in res["rows"] if r["method"] == "QINCo")
    shutil.rmtree(moved / "codec")
    with pytest.raises(SystemExit, match="pass --model"):
        _search(files, moved)
    with pytest.raises(SystemExit, match="outside the index folder.*pass --db"):
        cli.main(["search", "--index", str(built), "--queries", str(files["queries"]), "--out", str(tmp_path / "r.json")])


def test_search_refuses_a_vectors_file_as_gt_and_nan_queries_first(files, built, tmp_path):
    with pytest.raises(SystemExit, match="integer ids|vectors file"):
        cli.main(["search", "--index", str(built), "--queries", str(files["queries"]), "--gt", str(files["queries"])])
    u8 = tmp_path / "q.u8bin"
    data.write_vectors(u8, np.clip(files["ds"].xq[:, :], 0, 255).astype(np.uint8))
    with pytest.raises(SystemExit, match="vectors file"):
        cli.main(["search", "--index", str(built), "--queries", str(files["queries"]), "--gt", str(u8)])
    nan_q = tmp_path / "nan.fvecs"
    xq = files["ds"].xq.copy()
    xq[3, 2] = np.nan
    data.write_vectors(nan_q, xq)
    with pytest.raises(SystemExit, match="NaN"):  # before the exact ground-truth pass (no --gt, no --db)
        cli.main(["search", "--index", str(built), "--queries", str(nan_q)])


def test_zero_recall_warns(capsys):
    rows = [{"method": "QINCo", "r10": 0.0}, {"method": "QINCo decoded, exact search (ceiling)", "r10": 0.9}]
    cli.warn_zero_recall(rows)
    assert "R@10 is zero for every setting while the ceiling reaches 0.900" in capsys.readouterr().err
    cli.warn_zero_recall([{"method": "QINCo", "r10": 0.1}] + rows[1:])
    cli.warn_zero_recall([{"method": "QINCo", "r10": 0.0}, {**rows[1], "r10": 0.0}])  # the ceiling is zero too
    assert capsys.readouterr().err == ""


def test_build_into_another_models_folder_and_ctrl_c(files, built, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit, match="codes of another model.*another --out"):
        cli.main(["build", "--model", str(files["root"] / "other"), "--db", str(files["db"]), "--train",
                  str(files["train"]), "--out", str(built), "--no-progress"])
    assert "continuing" not in capsys.readouterr().err

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "lstsq_tables", interrupt)
    with pytest.raises(SystemExit) as info:
        cli.main(["build", "--model", str(files["root"] / "codec"), "--db", str(files["db"]), "--train",
                  str(files["train"]), "--out", str(tmp_path / "i"), "--no-progress"])
    assert info.value.code == 130
    err = capsys.readouterr().err
    assert "stopped while fitting the tables" in err and "run the same command again to resume" in err
    assert "Traceback" not in err
    with pytest.raises(SystemExit, match="interrupted before the index was written.*resume"):
        cli.main(["search", "--index", str(tmp_path / "i"), "--queries", str(files["queries"])])


def test_help_gives_every_default():
    for cmd in ("build", "search"):
        text = cli.parser()._subparsers._group_actions[0].choices[cmd].format_help()
        for action in cli.parser()._subparsers._group_actions[0].choices[cmd]._actions:
            if action.option_strings and action.dest != "help":
                assert "default" in (action.help or "") or "(required)" in (action.help or ""), action.dest
        assert "--nprobe" in text or cmd == "build"
