"""The search pipeline over an IVF-QINCo codec: faiss IVF index over its codes, re-rank, IVF / flat errors."""

import json

import jax
import numpy as np
import pytest

import qinco_jax as qj
from eval import search as cli
from qinco_jax import data, model
from qinco_jax import search as S
from qinco_jax.checks import QincoInputError
from qinco_jax.search.pipeline import _shortlist
from conftest import near_codes
from test_eval_search import check_sweep_values

CFG = qj.QincoConfig(d=16, K=16, M=3, L=1, h=16, nlist=8)
FLAT = qj.QincoConfig(d=16, K=16, M=3, L=1, h=16)


def ivf_codec(seed=0, scale=4.0):
    """Random IVF-QINCo weights with spread-out centroids (scaled domain)."""
    params = jax.device_get(model.init_params(CFG, jax.random.key(seed)))
    params = dict(params)
    params["codebook0"] = np.asarray(params["codebook0"]) * 4
    return qj.Codec(CFG, params, scale)


@pytest.fixture(scope="module")
def ivf_setup(tmp_path_factory):
    codec = ivf_codec()
    xt, xb, xq = near_codes(codec, 1500, 1, 0.3), near_codes(codec, 500, 2, 0.3), near_codes(codec, 15, 3, 0.3)
    d = tmp_path_factory.mktemp("ivf")
    ct = qj.encode(codec, xt)
    assert ct.shape[1] == 1 + CFG.M
    cent = S.ivf_centroids(codec)
    tables = S.lstsq_tables(ct, xt, CFG.K, centroids=cent)
    db = S.open_codes(S.encode_database(codec, xb, d / S.DB_CODES, part_size=128), codec)
    index = S.new_index(tables, cent, norm="float")
    S.add_codes(index, tables, db)
    pw = S.train_pairwise(ct, xt, CFG.K, 2, centroids=cent, n_sub=1)
    S.save_index(d, codec, index, tables, pairwise=pw)
    return codec, d, xt, xb, xq


def test_ivf_lstsq_fits_residuals_to_the_codec_centroids(ivf_setup):
    codec, _, xt, _, _ = ivf_setup
    ct = qj.encode(codec, xt)
    cent = S.ivf_centroids(codec)
    tables = S.lstsq_tables(ct, xt, CFG.K, centroids=cent)
    B = np.zeros((len(xt), CFG.M * CFG.K))
    for m in range(CFG.M):
        B[np.arange(len(xt)), m * CFG.K + ct[:, 1 + m]] = 1
    ref = np.linalg.lstsq(B, xt - cent[ct[:, 0]].astype(np.float64), rcond=None)[0]
    np.testing.assert_allclose(tables.reshape(-1, CFG.d), ref, atol=1e-3 * np.abs(ref).max())


def test_ivf_shortlist_codes_and_distances(ivf_setup):
    """search_and_return_codes gives back our codes (list id from the coarse bytes) and the additive distance."""
    codec, d, _, _, xq = ivf_setup
    p = S.load_pipeline(d, codec)
    p.index.nprobe = CFG.nlist
    D, I, raw = p.index.search_and_return_codes(xq, 40, include_listnos=True)
    _, I2, codes = _shortlist(p, xq, 40)
    np.testing.assert_array_equal(I, I2)
    np.testing.assert_array_equal(codes, np.asarray(p.db_codes)[I])
    ref = S.additive_distances(p.tables, xq, codes, S.ivf_centroids(codec))
    np.testing.assert_allclose(D, ref, rtol=1e-4, atol=1e-4 * ref.max())


def test_ivf_rerank_equals_exact_search_of_decoded(ivf_setup):
    codec, d, _, _, xq = ivf_setup
    p = S.load_pipeline(d, codec)
    r = S.search(p, xq, k=10, nshort=500, nprobe=CFG.nlist, batch_size=4)
    xhat = qj.decode(codec, p.db_codes)
    diff = xq[:, None, :] - xhat[None]
    dist = np.einsum("qnd,qnd->qn", diff, diff)
    np.testing.assert_array_equal(r.I, np.argsort(dist, axis=1, kind="stable")[:, :10])
    few = S.search(p, xq, k=10, nshort=20, nprobe=2, pairwise_factor=3)
    assert few.I.shape == (len(xq), 10) and (few.I >= 0).all()
    lists = np.asarray(p.db_codes)[:, 0]
    cent = S.ivf_centroids(codec)
    near = np.argsort(((xq[:, None] - cent[None]) ** 2).sum(-1), axis=1)[:, :2]
    assert all(np.isin(lists[few.I[i]], near[i]).all() for i in range(len(xq)))  # only the 2 probed lists


def test_ivf_bad_input(ivf_setup, tmp_path):
    codec, d, _, _, xq = ivf_setup
    p = S.load_pipeline(d, codec)
    with pytest.raises(QincoInputError, match="nprobe=9 is larger than .*nlist=8"):
        S.search(p, xq, nprobe=9)
    flat = qj.Codec(FLAT, jax.device_get(model.init_params(FLAT, jax.random.key(0))), 4.0)
    with pytest.raises(QincoInputError, match="needs an IVF-QINCo codec"):
        S.load_pipeline(d, flat)
    with pytest.raises(QincoInputError, match="needs an IVF-QINCo codec"):
        S.Pipeline(flat, p.index, p.tables[:, :, :], p.db_codes)
    flat_index = S.new_index(p.tables, norm="float")
    with pytest.raises(QincoInputError, match="needs a plain QINCo codec"):
        S.Pipeline(codec, flat_index, p.tables, p.db_codes)
    flat_dir = tmp_path / "flat"
    S.save_index(flat_dir, flat, flat_index, p.tables)
    with pytest.raises(QincoInputError, match="needs a plain QINCo codec"):
        S.load_pipeline(flat_dir, codec)
    with pytest.raises(QincoInputError, match="dimension 12"):
        S.search(p, xq[:, :12])


def test_ivf_cli_build_and_sweep(ivf_setup, tmp_path):
    codec, _, xt, xb, xq = ivf_setup
    qj.save(codec, tmp_path / "codec")
    files = {}
    for name, x in (("train", xt), ("db", xb), ("q", xq)):
        files[name] = tmp_path / f"{name}.fvecs"
        data.write_vectors(files[name], x)
    cli.main(["build", "--model", str(tmp_path / "codec"), "--db", str(files["db"]), "--train", str(files["train"]),
              "--out", str(tmp_path / "idx"), "--hnsw", "4", "--no-progress"])
    out = tmp_path / "res.json"
    cli.main(["search", "--index", str(tmp_path / "idx"), "--queries", str(files["q"]), "--nprobe", "1,8",
              "--nshort", "5,50", "--baselines", "--ceiling", "--out", str(out), "--db", str(files["db"]),
              "--train", str(files["train"])])
    rows = json.loads(out.read_text())["rows"]
    methods = {r["method"] for r in rows}
    assert {"IVF-QINCo", "IVF-QINCo shortlist (no re-rank)", "IVF8,RQ3x4_Nqint8"} <= methods
    assert "divide d=16" in next(r for r in rows if r["method"] == "IVF8,PQ3x4")["note"]  # 3 does not divide 16
    assert {r["nprobe"] for r in rows if r["method"] == "IVF-QINCo"} == {1, 8}
    check_sweep_values(rows)  # recalls in [0, 1]; at each nprobe, the shortlist's recall does not fall with nshort
    with pytest.raises(SystemExit, match="nprobe 16 is larger than the index's number of lists nlist=8"):
        cli.main(["search", "--index", str(tmp_path / "idx"), "--queries", str(files["q"]), "--nprobe", "16"])
