"""End-to-end runs of eval/search.py (build, then the search sweep) on tiny codecs and vector files."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

import qinco_jax as qj
from eval import search as cli
from qinco_jax import data

from conftest import as_rq
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


def test_build_and_sweep(files, built):
    meta = S.read_index_meta(built)
    assert meta["ntotal"] == NB and meta["pairwise"] and meta["nt"] == 2000
    res = _search(files, built, "--nshort", f"10,{NB}", "--pairwise-factor", "1,3", "--baselines", "--ceiling")
    rows = res["rows"]
    methods = {r["method"] for r in rows}
    assert {"QINCo", "QINCo shortlist (no re-rank)", "QINCo +pairwise", "PQ4x4", "RQ4x4_Nqint8", "PQ4x4fs",
            "QINCo decoded, exact search (ceiling)"} <= methods
    ceiling = next(r for r in rows if "ceiling" in r["method"])
    full = next(r for r in rows if r["method"] == "QINCo" and r["nshort"] == NB)
    # re-ranking the whole database is exact search over the decoded database
    assert (full["r1"], full["r10"], full["r100"]) == (ceiling["r1"], ceiling["r10"], ceiling["r100"])
    short = next(r for r in rows if r["method"] == "QINCo" and r["nshort"] == 10)
    assert short["r100"] is None and short["r10"] is not None  # R@100 needs 100 candidates
    for r in rows:
        assert r.get("qps", 1) > 0 and all(r.get(f"r{k}") is None or 0 <= r[f"r{k}"] <= 1 for k in (1, 10, 100))
    assert Path(res["plot"]).stat().st_size > 0


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
    marker = out / S.DB_CODES / "part.r0of1.json"
    (out / S.DB_CODES / S.MANIFEST).unlink()  # as if killed after one part: no manifest, the marker at 300
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "rows_done": 300}))
    with pytest.raises(SystemExit, match="unfinished .*300 of 800.*resume"):
        cli.main(["search", "--index", str(out), "--queries", str(files["queries"])])
    cli.main(args)
    codec = qj.load(files["root"] / "codec")
    np.testing.assert_array_equal(S.open_codes(out / S.DB_CODES, codec), qj.encode(codec, files["ds"].xb))
    assert os.path.exists(out / S.INDEX_FAISS)
