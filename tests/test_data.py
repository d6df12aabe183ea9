"""Tests for qinco_jax.data: file formats, dataset layouts and splits, synthetic data, batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qinco_jax import checks, data
from qinco_jax.data import datasets, synth
from qinco_jax.checks import QincoInputError

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"
FORMATS = {
    ".fvecs": np.float32, ".ivecs": np.int32, ".bvecs": np.uint8, ".fbin": np.float32,
    ".u8bin": np.uint8, ".i8bin": np.int8, ".ibin": np.int32, ".npy": np.float16,
}


def _matrix(n: int, d: int, dtype, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(size=(n, d)).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -1000), min(info.max, 1000), size=(n, d), endpoint=True).astype(dtype)


def _is_mapped(x: np.ndarray) -> bool:
    while x is not None:
        if isinstance(x, np.memmap):
            return True
        x = x.base if isinstance(x.base, np.ndarray) else None
    return False


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("ext", list(FORMATS))
def test_round_trip_every_format(tmp_path, ext):
    x = _matrix(37, 5, FORMATS[ext])
    path = tmp_path / f"x{ext}"
    data.write_vectors(path, x)
    y = data.read_vectors(path)
    assert y.shape == (37, 5) and y.dtype == x.dtype
    np.testing.assert_array_equal(y, x)
    assert _is_mapped(y)
    z = data.read_vectors(path, mmap=False)
    assert not _is_mapped(z)
    np.testing.assert_array_equal(z, x)


def _vecs_io_read(path: Path) -> np.ndarray:
    """A texmex file read by faiss's own readers (faiss.contrib.vecs_io), independently of ours."""
    from faiss.contrib import vecs_io

    ext = path.suffix.lower()
    if ext == ".fvecs":
        return vecs_io.fvecs_read(str(path))
    if ext == ".ivecs":
        return vecs_io.ivecs_read(str(path))
    return np.array(vecs_io.bvecs_mmap(str(path)))


@pytest.mark.parametrize("ext", [".fvecs", ".ivecs", ".bvecs"])
def test_vecs_files_agree_with_faiss_vecs_io(tmp_path, ext):
    from faiss.contrib import vecs_io

    x = _matrix(41, 7, FORMATS[ext], seed=3)
    if ext == ".bvecs":
        x = np.abs(x.astype(np.int64)).clip(0, 255).astype(np.uint8)
    path = tmp_path / f"x{ext}"
    data.write_vectors(path, x)
    np.testing.assert_array_equal(_vecs_io_read(path), x)  # our writer, faiss's reader
    if ext != ".bvecs":  # vecs_io writes .fvecs / .ivecs only
        other = tmp_path / f"w{ext}"
        (vecs_io.fvecs_write if ext == ".fvecs" else vecs_io.ivecs_write)(str(other), x)
        assert other.read_bytes() == path.read_bytes()  # byte-identical files
        np.testing.assert_array_equal(data.read_vectors(other), x)  # faiss's writer, our reader


def test_vecs_view_is_strided_over_the_file(tmp_path):
    x = _matrix(10, 4, np.float32)
    data.write_vectors(tmp_path / "x.fvecs", x)
    y = data.read_vectors(tmp_path / "x.fvecs")
    assert isinstance(y, np.memmap) and y.strides == (20, 4)  # row = int32 dim + 4 floats, no copy


def test_crop_suffix_and_upper_case_extension(tmp_path):
    x = _matrix(6, 3, np.uint8)
    data.write_vectors(tmp_path / "base.1B.u8bin.crop_nb_6", x)
    data.write_vectors(tmp_path / "X.FVECS", x)
    np.testing.assert_array_equal(data.read_vectors(tmp_path / "base.1B.u8bin.crop_nb_6"), x)
    np.testing.assert_array_equal(data.read_vectors(tmp_path / "X.FVECS"), x)


def test_write_refuses_values_the_format_cannot_hold(tmp_path):
    with pytest.raises(QincoInputError, match="exactly as uint8"):
        data.write_vectors(tmp_path / "x.bvecs", np.full((2, 3), 300.0))
    with pytest.raises(QincoInputError, match="exactly as"):
        data.write_vectors(tmp_path / "x.ivecs", np.full((2, 3), 0.5))


@pytest.mark.parametrize("ext", [".fvecs", ".bvecs", ".fbin", ".u8bin", ".npy"])
def test_truncated_file_names_path_and_sizes(tmp_path, ext):
    path = tmp_path / f"x{ext}"
    data.write_vectors(path, _matrix(20, 8, np.uint8 if "u8" in ext or ext == ".bvecs" else np.float32))
    full = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(QincoInputError, match="truncated") as e:
        data.read_vectors(path)
    assert str(path) in str(e.value) and f"{full - 3:,}" in str(e.value)


def test_rows_with_different_dims(tmp_path):
    path = tmp_path / "x.fvecs"
    data.write_vectors(path, _matrix(5, 4, np.float32))
    raw = bytearray(path.read_bytes())
    raw[4 * 20 : 4 * 20 + 4] = np.array([3], "<i4").tobytes()  # last row declares d=3, same size
    path.write_bytes(bytes(raw))
    with pytest.raises(QincoInputError, match="row 4 declares dimension 3"):
        data.read_vectors(path)


def test_ragged_rows_that_change_the_file_size(tmp_path):
    path = tmp_path / "x.ivecs"
    rows = [np.r_[4, np.arange(4)], np.r_[3, np.arange(3)]]
    path.write_bytes(b"".join(np.asarray(r, "<i4").tobytes() for r in rows))
    with pytest.raises(QincoInputError, match="truncated"):
        data.read_vectors(path)


def test_unknown_extension_missing_and_bad_files(tmp_path):
    (tmp_path / "x.hdf5").write_bytes(b"1234")
    with pytest.raises(QincoInputError, match=r"unknown vector file extension.*\.fvecs.*\.npy"):
        data.read_vectors(tmp_path / "x.hdf5")
    with pytest.raises(QincoInputError, match="no such file.*nope.fvecs"):
        data.read_vectors(tmp_path / "nope.fvecs")
    (tmp_path / "dir.fvecs").mkdir()
    with pytest.raises(QincoInputError, match="not a regular file"):
        data.read_vectors(tmp_path / "dir.fvecs")
    (tmp_path / "e.fvecs").write_bytes(b"")
    with pytest.raises(QincoInputError, match="empty"):
        data.read_vectors(tmp_path / "e.fvecs")
    np.save(tmp_path / "v.npy", np.zeros(5))
    with pytest.raises(QincoInputError, match="2-D"):
        data.read_vectors(tmp_path / "v.npy")


def test_groundtruth_in_big_ann_knn_result_format(tmp_path):
    ids = _matrix(4, 3, np.int32) % 50
    dis = np.sort(np.random.default_rng(0).random((4, 3)), 1).astype("<f4")
    path = tmp_path / "bigann-10M"
    path.write_bytes(np.array([4, 3], "<u4").tobytes() + ids.astype("<i4").tobytes() + dis.tobytes())
    np.testing.assert_array_equal(data.read_groundtruth(path), ids)
    data.write_vectors(tmp_path / "gt.ibin", ids)
    np.testing.assert_array_equal(data.read_groundtruth(tmp_path / "gt.ibin"), ids)


@pytest.mark.skipif(not (SHARED_DATA / "sift5k_ngt.fvecs").exists(), reason="shared SIFT sample not present")
def test_real_sift_sample():
    x = data.read_vectors(SHARED_DATA / "sift5k_ngt.fvecs")
    assert x.shape == (5000, 128) and x.dtype == np.float32 and _is_mapped(x)
    np.testing.assert_array_equal(x, _vecs_io_read(SHARED_DATA / "sift5k_ngt.fvecs"))
    assert x.min() >= 0 and x.max() <= 191 and np.array_equal(x, np.round(x))


# ----------------------------------------------------------------------------- named datasets

# (relative files for train, db, queries, gt) of each supported layout; gt None where the layout has none.
LAYOUTS = {
    "qinco-bigann": ("bigann1M", "bigann/bigann_learn.bvecs", "bigann/bigann_base.bvecs",
                     "bigann/bigann_query.bvecs", "bigann/gnd/idx_1M.ivecs", np.uint8),
    "qinco-bigann-small": ("BIGANN1m", "bigann/bigann_learn_10M10k.bvecs", "bigann/bigann_base.bvecs",
                           "bigann/bigann_query.bvecs", "bigann/gnd/idx_1M.ivecs", np.uint8),
    "bigann-benchmarks-bigann": ("bigann1M", "bigann/learn.100M.u8bin", "bigann/base.1B.u8bin",
                                 "bigann/query.public.10K.u8bin", None, np.uint8),
    "qinco-deep": ("deep1M", "deep1b/learn.fvecs", "deep1b/base.fvecs", "deep1b/deep1B_queries.fvecs",
                   "deep1b/deep1M_groundtruth.ivecs", np.float32),
    "bigann-benchmarks-deep": ("deep1M", "deep1b/learn.350M.fbin", "deep1b/base.1B.fbin.crop_nb_1000000",
                               "deep1b/query.public.10K.fbin", "deep1b/deep1M_groundtruth.ivecs", np.float32),
    "qinco-fb_ssnpp": ("FB_ssnpp1M", "fb_ssnpp/training_set10010k.npy", "fb_ssnpp/database1M.npy",
                       "fb_ssnpp/queries.npy", "fb_ssnpp/ground_truth1M.npy", np.uint8),
    "qinco-contriever": ("Contriever1M", "contriever/training_set.npy", "contriever/database1M.npy",
                         "contriever/queries.npy", "contriever/ground_truth1M.npy", np.float16),
    "texmex-sift": ("sift1M", "sift/sift_learn.fvecs", "sift/sift_base.fvecs", "sift/sift_query.fvecs",
                    "sift/sift_groundtruth.ivecs", np.float32),
}


def _make_layout(root: Path, train, db, queries, gt, dtype, nt=300, nb=120, nq=7, d=6):
    files = {}
    for rel, n, seed in ((train, nt, 1), (db, nb, 2), (queries, nq, 3)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        files[rel] = _matrix(n, d, dtype, seed)
        data.write_vectors(root / rel, files[rel])
    if gt is not None:
        (root / gt).parent.mkdir(parents=True, exist_ok=True)
        ids = synth._knn_ids(files[queries], files[db], 10).astype(np.int32)
        data.write_vectors(root / gt, ids)
    return files


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_load_dataset_layouts(tmp_path, layout):
    name, train, db, queries, gt, dtype = LAYOUTS[layout]
    files = _make_layout(tmp_path, train, db, queries, gt, dtype)
    if gt is None:
        with pytest.warns(UserWarning, match="idx_1M.ivecs"):
            ds = data.load_dataset(name, tmp_path, nt=200, nval=50)
    else:
        ds = data.load_dataset(name, tmp_path, nt=200, nval=50)
    assert ds.name == datasets._ALIASES[name.lower()] and ds.d == 6
    assert ds.xt.shape == (200, 6) and ds.xval.shape == (50, 6) and ds.xb.shape == (120, 6) and ds.xq.shape == (7, 6)
    np.testing.assert_array_equal(ds.xt, files[train][:200])
    np.testing.assert_array_equal(ds.xval, files[train][200:250])  # last nval of the first nt + nval
    np.testing.assert_array_equal(ds.xb, files[db])
    assert _is_mapped(ds.xt) and _is_mapped(ds.xb)
    for rel in (train, db, queries, gt):  # the texmex fixtures, as faiss's own readers see them
        if rel is not None and Path(rel).suffix in (".fvecs", ".ivecs", ".bvecs"):
            ours = data.read_groundtruth(tmp_path / rel) if rel == gt else data.read_vectors(tmp_path / rel)
            np.testing.assert_array_equal(_vecs_io_read(tmp_path / rel), ours)
    assert (ds.gt is None) == (gt is None)
    if gt is not None:
        assert ds.gt.shape == (7, 10) and ds.gt.max() < 120


def test_default_split_env_dir_and_nb(tmp_path, monkeypatch):
    files = _make_layout(tmp_path, *LAYOUTS["texmex-sift"][1:], nt=5100)
    monkeypatch.setenv("QINCO_DATA_DIR", str(tmp_path))
    ds = data.load_dataset("SIFT1M")
    assert ds.xt.shape[0] == 100 and ds.xval.shape[0] == 5000  # sift1M holds out 5k
    np.testing.assert_array_equal(ds.xval, files["sift/sift_learn.fvecs"][100:])
    ds = data.load_dataset("sift1M", nb=50, nval=100)
    assert ds.xb.shape == (50, 6) and ds.xt.shape == (5000, 6) and ds.gt is None  # 1M ground truth dropped
    with pytest.raises(QincoInputError, match="nb=500 is out of range.*120"):
        data.load_dataset("sift1M", nb=500)


def test_fb_ssnpp_never_trains_on_database_rows(tmp_path):
    files = _make_layout(tmp_path, "FB_ssnpp/x.u8bin", "FB_ssnpp/FB_ssnpp_database.u8bin",
                         "FB_ssnpp/FB_ssnpp_public_queries.u8bin", None, np.uint8, nt=10, nb=400)
    assert all("database" not in f.rel for f in datasets._SETS["fb_ssnpp"].train)
    with pytest.raises(QincoInputError, match="no train file found(.|\n)*training_set10010k.npy"):
        data.load_dataset("fb_ssnpp", tmp_path, nval=20)
    with pytest.warns(UserWarning, match="ground_truth1M.npy"):  # evaluation needs no training file
        ds = data.load_dataset("fb_ssnpp", tmp_path, train=False)
    assert ds.xt is None and ds.xval is None and ds.d == 6
    np.testing.assert_array_equal(ds.xb, files["FB_ssnpp/FB_ssnpp_database.u8bin"])


def test_evaluation_files_alone(tmp_path):
    name, train, db, queries, gt, dtype = LAYOUTS["qinco-bigann"]
    files = _make_layout(tmp_path, train, db, queries, gt, dtype)
    (tmp_path / train).unlink()
    ds = data.load_dataset(name, tmp_path, train=False)
    assert ds.xt is None and ds.gt.shape == (7, 10)
    np.testing.assert_array_equal(ds.xq, files[queries])


def test_missing_file_lists_candidates_and_sources(tmp_path):
    with pytest.raises(QincoInputError) as e:
        data.load_dataset("bigann1M", tmp_path)
    msg = str(e.value)
    for rel in ("bigann/bigann_learn.bvecs", "bigann/bigann_learn_10M10k.bvecs", "bigann/learn.100M.u8bin"):
        assert str(tmp_path / rel) in msg
    assert "ftp://ftp.irisa.fr/local/texmex/corpus/" in msg and "dl.fbaipublicfiles.com/QINCo/datasets" in msg
    assert "big-ann-benchmarks" in msg and "QINCO_DATA_DIR" in msg
    _make_layout(tmp_path, "bigann/bigann_learn.bvecs", "bigann/x.bvecs", "bigann/q.bvecs", None, np.uint8)
    with pytest.raises(QincoInputError, match=r"no db file found(.|\n)*base\.1B\.u8bin\.crop_nb_1000000"):
        data.load_dataset("bigann1M", tmp_path)


def test_split_too_large_and_unknown_name(tmp_path):
    _make_layout(tmp_path, *LAYOUTS["qinco-deep"][1:])
    with pytest.raises(QincoInputError, match=r"holds 300 training vectors.*290 \+ 20 = 310"):
        data.load_dataset("deep1M", tmp_path, nt=290, nval=20)
    with pytest.raises(QincoInputError, match="fewer than nval"):
        data.load_dataset("deep1M", tmp_path)  # default nval=10,000 > 300
    with pytest.raises(QincoInputError, match=r"unknown dataset 'glove'.*bigann1M.*deep1M.*sift1M"):
        data.load_dataset("glove", tmp_path)


def test_dimension_mismatch_between_files(tmp_path):
    _make_layout(tmp_path, *LAYOUTS["qinco-deep"][1:])
    data.write_vectors(tmp_path / "deep1b/deep1B_queries.fvecs", _matrix(7, 5, np.float32))
    with pytest.raises(QincoInputError, match=r"learn.fvecs has d=6.*deep1B_queries.fvecs has d=5"):
        data.load_dataset("deep1M", tmp_path, nt=10, nval=10)


# ----------------------------------------------------------------------------- user files


def test_load_files(tmp_path):
    xt, xb, xq = _matrix(50, 4, np.float32, 1), _matrix(30, 4, np.float32, 2), _matrix(5, 4, np.float32, 3)
    for name, x in (("t.fbin", xt), ("b.npy", xb), ("q.fvecs", xq)):
        data.write_vectors(tmp_path / name, x)
    data.write_vectors(tmp_path / "gt.ivecs", synth._knn_ids(xq, xb, 3).astype(np.int32))
    ds = data.load_files(tmp_path / "t.fbin", tmp_path / "b.npy", tmp_path / "q.fvecs", tmp_path / "gt.ivecs",
                         nt=40, nval=10)
    np.testing.assert_array_equal(ds.xval, xt[40:])
    assert ds.name == "t" and ds.gt.shape == (5, 3) and ds.xb.shape == (30, 4)
    ds = data.load_files(tmp_path / "t.fbin", nval=5)
    assert ds.xt.shape == (45, 4) and ds.xb is None and ds.gt is None
    with pytest.raises(QincoInputError, match="refers to database id"):
        data.load_files(tmp_path / "t.fbin", tmp_path / "b.npy", tmp_path / "q.fvecs", tmp_path / "gt.ivecs",
                        nval=5, nb=1)
    with pytest.raises(QincoInputError, match="without queries"):
        data.load_files(tmp_path / "t.fbin", tmp_path / "b.npy", gt=tmp_path / "gt.ivecs", nval=5)


def test_load_files_dim_mismatch(tmp_path):
    data.write_vectors(tmp_path / "t.fvecs", _matrix(20, 4, np.float32))
    data.write_vectors(tmp_path / "b.bvecs", _matrix(20, 8, np.uint8))
    with pytest.raises(QincoInputError, match=r"t.fvecs has d=4.*b.bvecs has d=8"):
        data.load_files(tmp_path / "t.fvecs", tmp_path / "b.bvecs", nval=5)


def test_check_groundtruth():
    gt = np.array([[0, 3], [2, 1]])
    assert data.check_groundtruth(gt, 4) is gt
    with pytest.raises(QincoInputError, match=r"refers to database id 3 .* only 3 vectors"):
        data.check_groundtruth(gt, 3)
    with pytest.raises(QincoInputError, match="negative ids"):
        data.check_groundtruth(np.array([[-1, 0]]), 3)
    with pytest.raises(QincoInputError, match="integer matrix"):
        data.check_groundtruth(np.zeros((2, 2)), 3)


# ----------------------------------------------------------------------------- synthetic, batches, streaming


def test_synthetic_deterministic_and_well_formed():
    a, b, c = data.synthetic(nt=500, nval=100, nb=300, nq=20), data.synthetic(nt=500, nval=100, nb=300, nq=20), \
        data.synthetic(nt=500, nval=100, nb=300, nq=20, seed=1)
    for f in ("xt", "xval", "xb", "xq", "gt"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.xt, c.xt) and not np.array_equal(a.xb, c.xb)
    assert not np.array_equal(a.xt[:100], a.xval) and not np.array_equal(a.xb[:20], a.xq)  # independent draws
    assert (a.xt.shape, a.xval.shape, a.xb.shape, a.xq.shape, a.gt.shape) == (
        (500, 32), (100, 32), (300, 32), (20, 32), (20, 100))
    assert all(x.dtype == np.float32 and np.isfinite(x).all() for x in (a.xt, a.xval, a.xb, a.xq))
    assert a.xt.max() > 0
    dis = ((a.xq[:, None, :].astype(np.float64) - a.xb[None].astype(np.float64)) ** 2).sum(-1)
    assert all(len(set(row)) == 100 for row in a.gt.tolist())
    np.testing.assert_allclose(np.take_along_axis(dis, a.gt, 1), np.sort(dis, 1)[:, :100], rtol=1e-4)


def test_synthetic_defaults_and_small_nb():
    ds = data.synthetic()
    assert ds.d == 32 and ds.xt.shape == (20000, 32) and ds.gt.shape == (1000, 100)
    small = data.synthetic(d=8, nt=10, nval=0, nb=50, nq=3)
    assert small.gt.shape == (3, 50) and small.xval.shape == (0, 8)
    assert data.synthetic(nt=10, nb=0, nq=0).gt is None


def test_batches_pure_function_of_seed_and_epoch():
    run = lambda seed, epoch: [b.copy() for b in data.batches(103, 10, seed, epoch)]  # noqa: E731
    a = run(0, 0)
    assert [len(b) for b in a] == [10] * 10 + [3]
    np.testing.assert_array_equal(np.sort(np.concatenate(a)), np.arange(103))
    assert all(np.array_equal(x, y) for x, y in zip(a, run(0, 0)))
    assert not np.array_equal(np.concatenate(a), np.concatenate(run(0, 1)))
    assert not np.array_equal(np.concatenate(a), np.concatenate(run(1, 0)))
    np.testing.assert_array_equal(np.concatenate(a), np.random.default_rng([0, 0]).permutation(103))
    with pytest.raises(QincoInputError):
        data.batches(10, 0, 0, 0)


def test_check_finite(tmp_path):
    x = _matrix(25, 3, np.float32)
    data.write_vectors(tmp_path / "x.fvecs", x)
    xm = data.read_vectors(tmp_path / "x.fvecs")
    checks.finite(xm, "xt", chunk=7)
    checks.finite(_matrix(5, 2, np.uint8), "xb")
    x[17, 1] = np.nan
    x[21, 0] = np.inf
    with pytest.raises(QincoInputError, match="xt has 1 row.*first bad row is 17"):
        checks.finite(x, "xt", chunk=10)
    with pytest.raises(QincoInputError, match="first bad row is 17"):
        checks.finite(x.astype(np.float16), "xt")
