"""Search over QINCo codes: least squares, resumable encoding, faiss indexes over the codes, the pipeline."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax import search as S
from qinco_jax.checks import QincoInputError
from qinco_jax.search.index import _set_tables
from tests.conftest import near_codes, random_codec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_hot(codes, K):
    n, M = codes.shape
    B = np.zeros((n, M * K))
    for m in range(M):
        B[np.arange(n), m * K + codes[:, m]] = 1
    return B


# ----------------------------------------------------------------------------- least squares


@pytest.mark.parametrize("ivf", [False, True])
def test_lstsq_tables_equal_numpy_lstsq(ivf):
    rng = np.random.default_rng(0)
    n, M, K, d, nlist = 300, 3, 16, 8, 5
    codes = rng.integers(0, K, (n, M))
    codes[codes == 5] = 6  # codeword 5 is never used: the minimal-norm solution gives 0
    codes[:, 2] = np.where(codes[:, 1] == 3, 7, codes[:, 2])  # correlated columns: more null directions
    x = rng.normal(size=(n, d)).astype(np.float32) * 3 + 1
    cent, target = None, x.astype(np.float64)
    if ivf:
        cent = rng.normal(size=(nlist, d)).astype(np.float32)
        lists = rng.integers(0, nlist, n)
        target = x - cent[lists].astype(np.float64)
        codes = np.concatenate([lists[:, None], codes], 1)
    T = S.lstsq_tables(codes, x, K, centroids=cent, chunk=64)  # several chunks
    ref = np.linalg.lstsq(one_hot(codes[:, 1:] if ivf else codes, K), target, rcond=None)[0].reshape(M, K, d)
    assert T.shape == (M, K, d)
    np.testing.assert_allclose(T, ref, atol=1e-5)
    assert not T[:, 5].any()


def test_lstsq_tables_memmap_input_and_bad_codes(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    codes = rng.integers(0, 4, (100, 2))
    a = S.lstsq_tables(codes, np.load(tmp_path / "x.npy", mmap_mode="r"), 4, chunk=7)
    np.testing.assert_allclose(a, S.lstsq_tables(codes, x, 4), atol=1e-6)
    with pytest.raises(QincoInputError, match="out of range"):
        S.lstsq_tables(codes + 3, x, 4)
    with pytest.raises(QincoInputError, match="one row per vector"):
        S.lstsq_tables(codes[:50], x, 4)


# ----------------------------------------------------------------------------- faiss index over the codes


def _index_setup(ivf, norm, seed=0, hnsw=0):
    rng = np.random.default_rng(seed)
    n, M, K, d, nlist = 400, 3, 16, 8, 6
    steps = rng.integers(0, K, (n, M))
    tables = rng.normal(size=(M, K, d)).astype(np.float32)
    cent = rng.normal(size=(nlist, d)).astype(np.float32) * 4 if ivf else None
    codes = np.concatenate([rng.integers(0, nlist, (n, 1)), steps], 1) if ivf else steps
    index = S.new_index(tables, cent, norm=norm, train_norms=S.additive_norms(tables, steps), hnsw=hnsw)
    S.add_codes(index, tables, codes, chunk=150)
    return index, tables, cent, codes, rng


@pytest.mark.parametrize("ivf,hnsw", [(False, 0), (True, 0), (True, 4)])
@pytest.mark.parametrize("norm", ["float", "qint8"])
def test_index_distances_equal_brute_force(ivf, hnsw, norm):
    """faiss's LUT distances over our codes equal ||q - (c + sum_m T_m[i_m])||^2 computed in numpy."""
    index, tables, cent, codes, rng = _index_setup(ivf, norm, hnsw=hnsw)
    assert index.ntotal == codes.shape[0]
    xq = rng.normal(size=(5, tables.shape[2])).astype(np.float32) * 3
    k = 50
    if ivf:
        index.nprobe = index.nlist  # every list: the result must be the exact additive top-k
        if hnsw:
            import faiss

            quantizer = faiss.downcast_index(index.quantizer)
            assert quantizer.ntotal == cent.shape[0] and hasattr(quantizer, "hnsw")
            quantizer.hnsw.efSearch = 16
        D, I, raw = index.search_and_return_codes(xq, k, include_listnos=True)
        cc = index.coarse_code_size()
        got = np.concatenate([S.decode_listnos(raw[..., :cc])[..., None], S.unpack_codes(raw[..., cc:], 3, 4)], -1)
        np.testing.assert_array_equal(got, codes[I])  # the codes come back as we stored them
    else:
        D, I = index.search(xq, k)
    ref = S.additive_distances(tables, xq, codes[I], cent)
    if norm == "float":
        tol = 1e-4 * ref.max()
    else:  # the stored norm is quantized to 256 levels over the trained [min, max]
        norms = S.additive_norms(tables, codes[:, 1:] if ivf else codes)
        tol = (norms.max() - norms.min()) / 255 + 1e-4 * ref.max()
    np.testing.assert_allclose(D, ref, atol=tol)
    # and the shortlist is the true additive top-k (up to the norm quantization)
    all_d = S.additive_distances(tables, xq, np.broadcast_to(codes, (5,) + codes.shape), cent)
    kth = np.sort(all_d, axis=1)[:, k - 1]
    assert (ref <= kth[:, None] + 2 * tol).all()


def test_norm_quantizer_trained_on_stored_norms():
    index, tables, _, codes, _ = _index_setup(True, "qint8")
    norms = S.additive_norms(tables, codes[:, 1:])
    assert index.rq.norm_min == pytest.approx(norms.min(), rel=1e-6)
    assert index.rq.norm_max == pytest.approx(norms.max(), rel=1e-6)


def test_unpack_codes_matches_faiss_packing():
    import faiss

    rng = np.random.default_rng(3)
    for nbits in (4, 6, 8):
        rq = faiss.ResidualQuantizer(8, 5, nbits)
        rq.search_type = faiss.AdditiveQuantizer.ST_norm_float
        rq.set_derived_values()
        _set_tables(rq, rng.normal(size=(5, 1 << nbits, 8)))
        c = rng.integers(0, 1 << nbits, (20, 5))
        packed = S.pack_codes(rq, c, np.ones(20, np.float32))
        np.testing.assert_array_equal(S.unpack_codes(packed, 5, nbits), c)


# ----------------------------------------------------------------------------- resumable database encoding


def test_encode_database_parts_and_processes(tmp_path, tiny_codec):
    x = near_codes(tiny_codec, 300)
    ref = qj.encode(tiny_codec, x)
    one = S.encode_database(tiny_codec, x, tmp_path / "one", part_size=64, process_index=0, process_count=1)
    np.testing.assert_array_equal(S.open_codes(one, tiny_codec), ref)
    two = tmp_path / "two"
    S.encode_database(tiny_codec, x, two, part_size=50, process_index=1, process_count=2)
    with pytest.raises(QincoInputError, match="unfinished .*150 of 300"):
        S.open_codes(two)
    S.encode_database(tiny_codec, x, two, part_size=50, process_index=0, process_count=2)
    np.testing.assert_array_equal(S.open_codes(two), ref)
    with pytest.raises(QincoInputError, match="another codec"):
        S.open_codes(two, random_codec(seed=5))
    with pytest.raises(QincoInputError, match="made with another codec"):
        S.encode_database(random_codec(seed=5), x, two, part_size=50, process_index=0, process_count=2)
    with pytest.raises(QincoInputError, match="part_size"):
        S.encode_database(tiny_codec, x, two, part_size=64, process_index=0, process_count=2)
    with pytest.raises(QincoInputError, match="dimension"):
        S.encode_database(tiny_codec, x[:, :5], tmp_path / "bad")


KILLED_BUILD = """
import sys, time
import numpy as np
import qinco_jax as qj
from qinco_jax import search as S
from tests.conftest import random_codec, near_codes
codec = random_codec()
x = near_codes(codec, 2000)
real = qj.encode
calls = []
def slow(c, xs, **kw):  # a slow encoder, so that the kill lands in the middle of the build
    calls.append(len(xs))
    time.sleep(float(sys.argv[2]))
    return real(c, xs, **kw)
qj.encode = slow
S.encode_database(codec, x, sys.argv[1], part_size=100, process_index=0, process_count=1)
print("parts encoded:", len(calls))
"""


@pytest.mark.slow
def test_killed_build_resumes_to_identical_codes(tmp_path, tiny_codec):
    """SIGKILL a build in a subprocess; the interrupted codes are refused; a rerun continues from the last
    finished part (it encodes only the rest) and the codes equal an uninterrupted build's."""
    script = tmp_path / "build.py"
    script.write_text(KILLED_BUILD)
    out = tmp_path / "codes"
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, str(script), str(out), "0.3"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        st = S.codes_status(out) if out.exists() else {"done": 0}
        if st["done"] >= 300:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = S.codes_status(out)["done"]
    assert 300 <= done < 2000
    with pytest.raises(QincoInputError, match="unfinished.*resume"):
        S.open_codes(out)
    res = subprocess.run([sys.executable, str(script), str(out), "0"], env=env, cwd=REPO, capture_output=True,
                         text=True, check=True)
    assert f"parts encoded: {(2000 - done) // 100}" in res.stdout  # only the unfinished parts
    ref = qj.encode(tiny_codec, near_codes(tiny_codec, 2000))
    np.testing.assert_array_equal(S.open_codes(out, tiny_codec), ref)


# ----------------------------------------------------------------------------- flat pipeline end to end


@pytest.fixture(scope="module")
def flat_setup(tmp_path_factory):
    codec = random_codec(qj.QincoConfig(d=16, K=16, M=3, L=1, h=16), seed=2)
    xt = near_codes(codec, 1500, seed=1, noise=0.3)
    xb = near_codes(codec, 600, seed=2, noise=0.3)
    xq = near_codes(codec, 20, seed=3, noise=0.3)
    d = tmp_path_factory.mktemp("flat")
    tables = S.lstsq_tables(qj.encode(codec, xt), xt, 16)
    db = S.open_codes(S.encode_database(codec, xb, d / S.DB_CODES, part_size=256), codec)
    index = S.new_index(tables, norm="float")
    S.add_codes(index, tables, db)
    S.save_index(d, codec, index, tables)
    return codec, d, xt, xb, xq


def test_flat_pipeline_rerank_equals_exact_search_of_decoded(flat_setup):
    codec, d, _, xb, xq = flat_setup
    p = S.load_pipeline(d, codec)
    xhat = qj.decode(codec, p.db_codes)
    r = S.search(p, xq, k=10, nshort=600, batch_size=7)  # every vector re-ranked: exact search of the decoded db
    diff = xq[:, None, :] - xhat[None]
    dist = np.einsum("qnd,qnd->qn", diff, diff)
    ref = np.argsort(dist, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(r.I, ref)
    np.testing.assert_allclose(r.D, np.take_along_axis(dist, ref, 1), rtol=1e-4)
    small = S.search(p, xq, k=10, nshort=30)
    add = S.additive_distances(p.tables, xq, np.asarray(p.db_codes)[None].repeat(len(xq), 0))
    np.testing.assert_array_equal(small.I_short, np.argsort(add, axis=1, kind="stable")[:, :30])
    # the re-rank keeps the shortlist's ids, ordered by the QINCo distance
    assert all(set(small.I[i]) <= set(small.I_short[i]) for i in range(len(xq)))
    stages = ("coarse", "shortlist", "pairwise", "decode", "rerank")
    assert small.times["decode"] is None  # overlapped: the stages are not timed apart
    small = S.search(p, xq, k=10, nshort=30, staged=True)
    assert small.times["pairwise"] == 0 and 0 < sum(small.times[s] for s in stages) <= small.times["total"]


def test_pairwise_decoder_lowers_error_and_narrows(flat_setup):
    codec, d, xt, xb, xq = flat_setup
    p = S.load_pipeline(d, codec)
    ct = qj.encode(codec, xt)
    alone = S.train_pairwise(ct, xt, 16, n_tables=3)
    pw = S.train_pairwise(ct, xt, 16, n_tables=3, base=p.tables)
    assert 1 <= len(pw.pairs) <= 3 and len(alone.pairs) == 3
    add_err = ((S.additive_decode(p.tables, ct) - xt) ** 2).sum(1).mean()
    assert ((pw.decode(ct) - xt) ** 2).sum(1).mean() < add_err  # the pairs refine the additive decoder
    # a table is the shrunk mean of the target over the vectors of each joint code (first table, no base)
    (a, b), K = alone.pairs[0], 16
    joint = ct[:, a] * K + ct[:, b]
    cell = np.bincount(joint, minlength=K * K)
    first = alone.tables[: K * K]
    used = np.flatnonzero(cell)
    ratio = [np.linalg.norm(first[c]) / np.linalg.norm(xt[joint == c].sum(0)) for c in used[:20]]
    assert np.allclose([1 / r for r in ratio] - cell[used[:20]], (1 / np.array(ratio) - cell[used[:20]])[0])
    pw.save(d / "pw.npz")
    np.testing.assert_array_equal(S.PairwiseDecoder.load(d / "pw.npz").decode(ct[:5]), pw.decode(ct[:5]))
    p.pairwise = pw
    r = S.search(p, xq, k=5, nshort=10, pairwise_factor=4, staged=True)
    assert r.I.shape == (len(xq), 5)
    # the pairwise stage ran, and each stage is timed within the search's total
    stages = ("coarse", "shortlist", "pairwise", "decode", "rerank")
    assert r.times["pairwise"] > 0 and sum(r.times[s] for s in stages) <= r.times["total"]
    wide = S.search(p, xq, k=40, nshort=40)  # the pairwise stage picks its 10 among the additive 40
    assert all(set(r.I_short[i]) <= set(wide.I_short[i]) for i in range(len(xq)))


def test_pipeline_bad_input(flat_setup, tmp_path):
    codec, d, _, _, xq = flat_setup
    p = S.load_pipeline(d, codec)
    with pytest.raises(QincoInputError, match="dimension 15, the model expects d=16"):
        S.search(p, xq[:, :15])
    with pytest.raises(QincoInputError, match="built with another model"):
        S.load_pipeline(d, random_codec(codec.config, seed=9))
    with pytest.raises(QincoInputError, match="pairwise decoder"):
        S.search(p, xq, pairwise_factor=2)
    with pytest.raises(QincoInputError, match="not a search index"):
        S.load_pipeline(tmp_path, codec)


def test_ivf_index_survives_faiss_files(tmp_path):
    import faiss

    index, tables, _, _, rng = _index_setup(True, "qint8", hnsw=4)
    faiss.write_index(index, str(tmp_path / "i.faiss"))
    back = faiss.read_index(str(tmp_path / "i.faiss"))
    xq = rng.normal(size=(4, tables.shape[2])).astype(np.float32)
    index.nprobe = back.nprobe = 3
    a, b = index.search_and_return_codes(xq, 10, include_listnos=True), back.search_and_return_codes(
        xq, 10, include_listnos=True)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
