"""Tests for eval.metrics, eval.baselines and eval.report (small synthetic data)."""

import json

import faiss
import numpy as np
import pytest

from eval import baselines, metrics, report
from qinco_jax.checks import QincoInputError


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    d = 16
    scale = np.linspace(0.3, 2.0, d).astype(np.float32)  # anisotropic, so OPQ/RQ have something to do
    make = lambda n: (rng.normal(size=(n, d)) * scale).astype(np.float32)
    return {"xt": make(2000), "xb": make(3000), "xq": make(100), "var": float((scale**2).sum())}


@pytest.fixture(scope="module")
def trained(data):
    small_lsq = {"train_iters": 4, "encode_ils_iters": 4, "train_ils_iters": 4}
    return {
        name: baselines.train_baseline(name, data["xt"], 4, 4, **(small_lsq if name == "LSQ" else {}))
        for name in baselines.BASELINES
    }


def test_mse_matches_numpy_and_streams_any_dtype(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1000, 24))
    xhat = x + rng.normal(scale=0.1, size=x.shape)
    ref = ((x - xhat) ** 2).sum(1).mean()
    assert metrics.mse(x, xhat, chunk=77) == pytest.approx(ref, rel=1e-12)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float16, shape=x.shape)
    mm[:] = x
    mm.flush()
    ref16 = ((mm.astype(np.float64) - xhat) ** 2).sum(1).mean()
    assert metrics.mse(np.load(tmp_path / "x.npy", mmap_mode="r"), xhat, chunk=100) == pytest.approx(ref16, rel=1e-12)
    with pytest.raises(QincoInputError):
        metrics.mse(x, xhat[:10])


@pytest.mark.parametrize("block", [3, 7, 256, 1000, 5000])
@pytest.mark.parametrize("nq", [5, 60])
def test_knn_search_blocked_equals_faiss_knn(block, nq):
    rng = np.random.default_rng(2)
    xb = rng.normal(size=(2000, 32)).astype(np.float32)
    xq = rng.normal(size=(nq, 32)).astype(np.float32)
    D0, I0 = faiss.knn(xq, xb, 10)
    D, I = metrics.knn_search(xq, xb, 10, block=block)
    np.testing.assert_array_equal(I, I0)
    np.testing.assert_allclose(D, D0, rtol=1e-5, atol=1e-4)


def test_knn_search_memmap_database_and_k_above_nb(tmp_path):
    rng = np.random.default_rng(3)
    xb = rng.normal(size=(1500, 20)).astype(np.float32)
    xq = rng.normal(size=(30, 20)).astype(np.float32)
    path = tmp_path / "xb.f32"
    xb.tofile(path)
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=xb.shape)
    D, I = metrics.knn_search(xq, mm, 25, block=128)
    D0, I0 = faiss.knn(xq, xb, 25)
    np.testing.assert_array_equal(I, I0)
    np.testing.assert_allclose(D, D0, rtol=1e-5, atol=1e-4)
    D, I = metrics.knn_search(xq, xb[:6], 8, block=4)  # fewer vectors than k: padded like faiss.knn
    D0, I0 = faiss.knn(xq, xb[:6], 8)
    np.testing.assert_array_equal(I, I0)
    assert (I[:, 6:] == -1).all()


def test_exact_groundtruth_is_brute_force():
    rng = np.random.default_rng(4)
    xb = rng.normal(size=(500, 16))
    xq = rng.normal(size=(20, 16))
    gt = metrics.exact_groundtruth(xq, xb, k=5, block=64)
    dist = ((xq[:, None, :] - xb[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(gt, np.argsort(dist, axis=1)[:, :5])
    assert metrics.exact_groundtruth(xq, xb[:3], k=100).shape == (20, 3)


def test_recalls_hand_built_and_random():
    I = np.array([[5, 1, 2], [0, 9, 3], [7, 8, 6], [4, 4, 4]])
    gt = np.array([[5, 0], [9, 1], [6, 2], [1, 3]])
    assert metrics.recalls(I, gt, ks=(1, 2, 3)) == {1: 0.25, 2: 0.5, 3: 0.75}
    rng = np.random.default_rng(5)
    I = np.stack([rng.permutation(50)[:20] for _ in range(200)])
    gt = rng.integers(0, 50, size=(200, 10))
    for k, r in metrics.recalls(I, gt, ks=(1, 5, 20)).items():
        assert r == sum(gt[q, 0] in I[q, :k] for q in range(200)) / 200
    with pytest.raises(QincoInputError, match="recall@100"):
        metrics.recalls(I, gt, ks=(1, 100))
    with pytest.raises(QincoInputError):
        metrics.recalls(I[:10], gt)


def test_check_groundtruth_errors():
    gt = np.arange(12).reshape(4, 3)
    assert metrics.check_groundtruth(gt, 12, 4) is not None
    with pytest.raises(QincoInputError, match="database id 11 but only 10 vectors"):
        metrics.check_groundtruth(gt, 10, 4)
    with pytest.raises(QincoInputError, match="database id -1"):
        metrics.check_groundtruth(gt - 1, 100, 4)
    with pytest.raises(QincoInputError, match="3 rows but there are 4 queries"):
        metrics.check_groundtruth(gt[:3], 100, 4)
    with pytest.raises(QincoInputError, match="integer"):
        metrics.check_groundtruth(gt.astype(np.float32), 100, 4)


def test_baselines_train_encode_decode(data, trained):
    xb = data["xb"]
    mses = {}
    for name, b in trained.items():
        codes = b.encode(xb)
        assert b.name == name and b.bytes == 2 and codes.shape == (len(xb), 2) and codes.dtype == np.uint8
        xhat = b.decode(codes)
        assert xhat.shape == xb.shape
        mses[name] = metrics.mse(xb, xhat)
        assert 0 < mses[name] < 0.7 * data["var"], (name, mses[name])
    assert mses["RQ-beam5"] <= mses["RQ"] * 1.02
    assert mses["OPQ"] <= mses["PQ"] * 1.05
    assert trained["RQ"].index.rq.max_beam_size == 1 and trained["RQ-beam5"].index.rq.max_beam_size == 5


def test_baseline_errors(data):
    with pytest.raises(baselines.BaselineUnavailable, match="divide"):
        baselines.train_baseline("PQ", data["xt"], 5, 4)
    with pytest.raises(QincoInputError, match="unknown baseline"):
        baselines.train_baseline("XQ", data["xt"], 4, 4)
    with pytest.raises(QincoInputError, match="unknown option"):
        baselines.train_baseline("RQ", data["xt"], 4, 4, no_such_option=3)


def test_evaluate_baseline_and_curves(data, trained):
    gt = metrics.exact_groundtruth(data["xq"], data["xb"], k=10)
    row = baselines.evaluate_baseline(trained["RQ"], data["xb"], data["xq"], gt, ks=(1, 10))
    assert set(row) == {"method", "bytes", "mse", "r1", "r10", "encode_us"}
    assert row["method"] == "RQ" and row["bytes"] == 2 and 0 <= row["r1"] <= row["r10"] <= 1 and row["encode_us"] > 0
    with pytest.raises(QincoInputError, match="only 5 vectors"):
        baselines.evaluate_baseline(trained["RQ"], data["xb"][:5], data["xq"], gt, ks=(1,))
    curves = baselines.baseline_mse_by_bytes(["PQ", "RQ"], data["xt"][:1000], data["xb"][:500], 3, nbits=4)
    assert curves["PQ"][2] is None and all(m is not None for m in curves["PQ"][:2] + curves["RQ"])
    assert curves["RQ"][0] > curves["RQ"][1] > curves["RQ"][2]


def test_format_table_and_json(tmp_path):
    rows = [
        {"method": "RQ", "bytes": 8, "mse": 1.234567e4, "r1": 0.12345, "encode_us": 12.345},
        {"method": "QINCo", "bytes": 8, "mse": 0.000123456, "r1": 0.5, "encode_us": None},
    ]
    text = report.format_table(rows, ["method", "bytes", "mse", "r1", "encode_us"])
    lines = text.splitlines()
    assert len(lines) == 4 and lines[0].split() == ["method", "bytes", "mse", "r1", "encode_us"]
    assert lines[2].split() == ["RQ", "8", "1.235e+04", "0.123", "12.3"]
    assert lines[3].split() == ["QINCo", "8", "0.0001235", "0.500", "n/a"]
    assert len({len(line) for line in lines[:2]}) == 1
    path = tmp_path / "sub" / "res.json"
    report.write_json(path, {"rows": rows, "arr": np.arange(3), "x": np.float32(1.5)})
    assert json.loads(path.read_text())["arr"] == [0, 1, 2]
    assert [p.name for p in path.parent.iterdir()] == ["res.json"]


def test_plot_rate_distortion(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "rd.png"
    report.plot_rate_distortion({"RQ": ([1, 2, 3], [3.0, 2.0, 1.0]), "PQ": ([1, 2, 3], [3.5, None, 1.2])}, path, "test")
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_recalls_and_distortion(tmp_path):
    """eval/paired.py: the paired recall difference, its standard error and the distortion of two decodings."""
    from eval import paired

    rng = np.random.default_rng(3)
    xb = rng.normal(size=(400, 8)).astype(np.float32)
    xq = rng.normal(size=(30, 8)).astype(np.float32)
    gt = metrics.exact_groundtruth(xq, xb, k=20)
    fine = xb + rng.normal(scale=0.05, size=xb.shape).astype(np.float32)
    coarse = xb + rng.normal(scale=1.5, size=xb.shape).astype(np.float32)
    res = paired.compare(xq, xb, gt, xb, coarse, ks=(1, 10), top=20)
    for k, r in res["recalls"].items():
        assert r["a"] == 1.0  # the exact database finds every true neighbour
        assert r["b_only"] == 0 and (k > 1 or r["b"] < 1.0)
        assert np.isclose(r["diff"], (r["b_only"] - r["a_only"]) / 30)
        d = np.r_[np.full(r["a_only"], -1.0), np.zeros(30 - r["a_only"])]
        assert np.isclose(r["se"], d.std(ddof=1) / np.sqrt(30))
    assert res["distortion"]["a"]["nn_growth"] == 0 and res["distortion"]["a"]["spread"] == 0
    both_fine = paired.compare(xq, xb, gt, fine, fine, ks=(1,), top=20)
    assert res["distortion"]["b"]["spread"] > both_fine["distortion"]["a"]["spread"] > 0
    same = both_fine["recalls"][1]
    assert same["diff"] == 0 and same["se"] == 0 and same["a_only"] == same["b_only"] == 0
    with pytest.raises(QincoInputError, match="decoded database b has 399"):
        paired.compare(xq, xb, gt, xb, xb[:399])
    # the command line: files in, a clear error for a decoded file of the wrong dimension
    np.save(tmp_path / "a.npy", xb)
    np.save(tmp_path / "b.npy", coarse)
    np.save(tmp_path / "bad.npy", coarse[:, :4])
    for name, arr in (("db", xb), ("q", xq)):
        np.save(tmp_path / f"{name}.npy", arr)
    np.save(tmp_path / "gt.npy", gt.astype(np.int32))
    common = ["--db", str(tmp_path / "db.npy"), "--queries", str(tmp_path / "q.npy"), "--gt", str(tmp_path / "gt.npy"),
              "--top", "20"]
    assert paired.main([*common, str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["recalls"]["1"]["a"] == 1.0
    assert paired.main([*common, str(tmp_path / "a.npy"), str(tmp_path / "bad.npy")]) == 2
