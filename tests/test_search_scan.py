"""The shortlist scan with one look-up table per query: distances against a float64 brute force over the same
codes, the exact top-n, the CSR lists and their file checks, the one-byte term, and bad input."""

import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax import data
from qinco_jax import search as S
from qinco_jax.checks import QincoInputError
from qinco_jax.search import scan as SC

M, K, D, NLIST, N, NQ = 3, 16, 16, 8, 600, 21


def setup(K=K, nlist=NLIST, seed=0):
    rng = np.random.default_rng(seed)
    T = rng.normal(size=(M, K, D)).astype(np.float32)
    cent = (rng.normal(size=(nlist, D)) * 4).astype(np.float32) if nlist else None
    steps = rng.integers(0, K, (N, M))
    codes = np.concatenate([rng.integers(0, nlist, (N, 1)), steps], 1) if nlist else steps
    xq = (rng.normal(size=(NQ, D)) * 4).astype(np.float32)
    return T, cent, codes, xq


def coarse(xq, cent, nprobe):
    if cent is None:
        return np.zeros((len(xq), 1), np.int64), np.einsum("nd,nd->n", xq, xq)[:, None].astype(np.float32)
    d = ((xq[:, None, :].astype(np.float64) - cent[None]) ** 2).sum(-1)
    I = np.argsort(d, axis=1)[:, :nprobe]
    return I, np.take_along_axis(d, I, 1).astype(np.float32)


def scan_all(scanner, xq, Iq, Dq, nshort, qb=8):
    nq = len(xq)
    Dout, Iout = np.empty((nq, nshort), np.float32), np.empty((nq, nshort), np.int64)
    Cout = np.empty((nq, nshort, scanner.M + scanner.ivf), np.int64)
    for rows, n, (d, i, c) in scanner.scan(xq, Iq, Dq, nshort, qb=qb):
        Dout[rows[:n]], Iout[rows[:n]], Cout[rows[:n]] = (np.asarray(a)[:n] for a in (d, i, c))
    return Dout, Iout, Cout


@pytest.mark.parametrize("nlist,nprobe", [(NLIST, 3), (NLIST, NLIST), (0, 1)])
def test_scan_equals_float64_brute_force(nlist, nprobe):
    T, cent, codes, xq = setup(nlist=nlist)
    lists = SC.build_lists(codes, T, cent)
    scanner = SC.Scanner(lists, T, ivf=bool(nlist))
    Iq, Dq = coarse(xq, cent, nprobe)
    nshort = 40
    Dout, Iout, Cout = scan_all(scanner, xq, Iq, Dq, nshort)
    np.testing.assert_array_equal(Cout, codes[Iout])  # the codes come back with the ids
    ref_all = S.additive_distances(T, xq, np.broadcast_to(codes, (NQ,) + codes.shape), cent)  # (nq, N) float64
    ref = np.take_along_axis(ref_all, Iout, 1)
    np.testing.assert_allclose(Dout, ref, rtol=1e-5)
    for q in range(NQ):  # the exact top-n of the candidates in the probed lists
        cand = np.flatnonzero(np.isin(codes[:, 0], Iq[q])) if nlist else np.arange(N)
        best = cand[np.argsort(ref_all[q, cand], kind="stable")[:nshort]]
        assert set(Iout[q]) == set(best)
        assert (np.diff(Dout[q]) >= 0).all()


def test_short_lists_pad_with_minus_one_and_empty_probes():
    T, cent, codes, xq = setup()
    scanner = SC.Scanner(SC.build_lists(codes, T, cent), T, ivf=True)
    Iq, Dq = coarse(xq, cent, 2)
    Iq[:, 1] = -1  # a coarse search that found fewer lists than asked (HNSW)
    Dout, Iout, _ = scan_all(scanner, xq, Iq, Dq, N)
    counts = np.bincount(codes[:, 0], minlength=NLIST)[Iq[:, 0]]
    assert ((Iout >= 0).sum(1) == counts).all()
    assert np.isinf(Dout[Iout < 0]).all()
    assert all(set(codes[Iout[q][Iout[q] >= 0], 0]) <= {Iq[q, 0]} for q in range(NQ))


def test_csr_lists():
    T, cent, codes, _ = setup()
    lists = SC.build_lists(codes, T, cent)
    assert lists.codes.dtype == np.uint8 and lists.codes.shape == (N, M) and lists.nlist == NLIST
    assert lists.offsets[0] == 0 and lists.offsets[-1] == N and (np.diff(lists.offsets) >= 0).all()
    for l in range(NLIST):
        ids = lists.ids[lists.offsets[l]:lists.offsets[l + 1]]
        assert (codes[ids, 0] == l).all() and (np.diff(ids) > 0).all()
    np.testing.assert_array_equal(lists.codes, codes[lists.ids, 1:])
    # the term: ||x^||^2 - ||c||^2 = ||r^||^2 + 2 <c, r^>
    r = S.additive_decode(T, codes[lists.ids, 1:]).astype(np.float64)
    c = cent[codes[lists.ids, 0]].astype(np.float64)
    np.testing.assert_allclose(lists.term, ((c + r) ** 2).sum(1) - (c ** 2).sum(1), rtol=1e-5, atol=1e-3)


def test_uint8_term_within_half_a_step():
    T, cent, codes, xq = setup()
    f32, u8 = SC.build_lists(codes, T, cent), SC.build_lists(codes, T, cent, term="uint8")
    assert u8.term.dtype == np.uint8
    step = np.repeat(u8.term_step, u8.counts)
    assert (np.abs(u8.term_float() - f32.term) <= step * 0.5 + 1e-3).all()
    Iq, Dq = coarse(xq, cent, NLIST)
    Df, If, _ = scan_all(SC.Scanner(f32, T, True), xq, Iq, Dq, N)
    Du, Iu, _ = scan_all(SC.Scanner(u8, T, True), xq, Iq, Dq, N)
    ref = np.take_along_axis(S.additive_distances(T, xq, np.broadcast_to(codes, (NQ,) + codes.shape), cent), Iu, 1)
    lists_of = np.take_along_axis(np.broadcast_to(codes[:, 0], (NQ, N)), Iu, 1)
    assert (np.abs(Du - ref) <= u8.term_step[lists_of] * 0.5 + 1e-3 * np.abs(ref)).all()


def test_uint16_codes_and_k_limits():
    T, cent, codes, xq = setup(K=300)
    lists = SC.build_lists(codes, T, cent)
    assert lists.codes.dtype == np.uint16
    Iq, Dq = coarse(xq, cent, 2)
    Dout, Iout, _ = scan_all(SC.Scanner(lists, T, True), xq, Iq, Dq, 20)
    ref = np.take_along_axis(S.additive_distances(T, xq, np.broadcast_to(codes, (NQ,) + codes.shape), cent), Iout, 1)
    np.testing.assert_allclose(Dout, ref, rtol=1e-5)
    with pytest.raises(QincoInputError, match="K must be in \\[1, 65536\\], got K=65537"):
        SC.code_store_dtype(65537)


def test_bad_input():
    T, cent, codes, _ = setup()
    with pytest.raises(QincoInputError, match="codes must be \\(n, 4\\)"):
        SC.build_lists(np.concatenate([codes, codes[:, 1:2]], 1), T, cent)  # wider than the index
    bad = codes.copy()
    bad[3, 2] = K
    with pytest.raises(QincoInputError, match="codes"):
        SC.build_lists(bad, T, cent)
    with pytest.raises(QincoInputError, match="unknown term encoding"):
        SC.build_lists(codes, T, cent, term="float16")
    lists = SC.build_lists(codes, T, cent)
    with pytest.raises(QincoInputError, match="do not match the tables"):
        SC.Scanner(lists, T[:2], True)


def test_lists_file_round_trip_and_checks(tmp_path):
    T, cent, codes, _ = setup()
    path = tmp_path / SC.SCAN_LISTS
    for term in SC.TERMS:
        lists = SC.build_lists(codes, T, cent, term=term)
        SC.save_lists(path, lists)
        back = SC.load_lists(path, n=N, M=M, K=K, nlist=NLIST)
        for f in ("offsets", "codes", "ids", "term"):
            np.testing.assert_array_equal(getattr(back, f), getattr(lists, f))
    lists = SC.build_lists(codes, T, cent)
    with pytest.raises(QincoInputError, match="do not match the index: .*the index has 9 lists.*rebuild"):
        SC.load_lists(path, n=N, M=M, K=K, nlist=NLIST + 1)
    with pytest.raises(QincoInputError, match="codes \\(600, 3\\), the index wants \\(601, 3\\)"):
        SC.load_lists(path, n=N + 1, M=M, K=K, nlist=NLIST)
    lists.offsets = lists.offsets.copy()
    lists.offsets[2], lists.offsets[3] = lists.offsets[3], lists.offsets[2] - 1
    SC.save_lists(path, lists)
    with pytest.raises(QincoInputError, match="offsets must rise from 0 to n=600"):
        SC.load_lists(path, n=N, M=M, K=K, nlist=NLIST)
    lists = SC.build_lists(codes, T, cent)
    lists.codes = lists.codes.astype(np.int32)
    SC.save_lists(path, lists)
    with pytest.raises(QincoInputError, match="codes: a int32 array.*expected uint8"):
        SC.load_lists(path, n=N, M=M, K=K, nlist=NLIST)
    path.write_bytes(b"not a zip")
    with pytest.raises(QincoInputError, match="scan lists.*unreadable term entry"):
        SC.load_lists(path, n=N, M=M, K=K, nlist=NLIST)


def test_lists_checked_against_the_database_codes(tmp_path):
    """A file that passes its own checks but disagrees with the database codes, the tables or the recorded
    sha256 is refused (index folders are untrusted input)."""
    from qinco_jax.search.faiss_file import sha256_file

    T, cent, codes, _ = setup()
    path = tmp_path / SC.SCAN_LISTS
    for term in SC.TERMS:
        SC.save_lists(path, SC.build_lists(codes, T, cent, term=term))
        SC.check_lists(SC.load_lists(path, n=N, M=M, K=K, nlist=NLIST, sha256=sha256_file(path)), codes, T, cent,
                       str(path))
    with pytest.raises(QincoInputError, match="sha256 differs"):
        SC.load_lists(path, n=N, M=M, K=K, nlist=NLIST, sha256="0" * 64)
    for what, tamper in (("codes differ", lambda L: L.codes.__setitem__((5, 1), (L.codes[5, 1] + 1) % K)),
                         ("codes differ", lambda L: L.ids.__setitem__(slice(0, 2), L.ids[[1, 0]])),
                         ("stored term differs", lambda L: L.term.__setitem__(slice(None), L.term * 1.01 + 1))):
        lists = SC.build_lists(codes, T, cent)
        tamper(lists)
        with pytest.raises(QincoInputError, match=what):
            SC.check_lists(lists, codes, T, cent, str(path))


@pytest.fixture(scope="module")
def ivf_pipeline():
    ds = data.synthetic(d=D, nt=1500, nval=0, nb=500, nq=NQ, seed=3)
    codec = qj.init_codec(qj.QincoConfig(d=D, K=K, M=M, L=1, h=16, nlist=NLIST), ds.xt)
    ct = qj.encode(codec, ds.xt)
    cent = S.ivf_centroids(codec)
    tables = S.lstsq_tables(ct, ds.xt, K, centroids=cent)
    index = S.new_index(tables, cent, norm="float")
    db = qj.encode(codec, ds.xb)
    S.add_codes(index, tables, db)
    return S.Pipeline(codec, index, tables, db), ds


def test_pipeline_scans_agree_and_rerank_is_exact(ivf_pipeline):
    p, ds = ivf_pipeline
    xhat = qj.decode(p.codec, p.db_codes)
    for nprobe, nshort in ((2, 30), (NLIST, 500)):
        res = {scan: S.search(p, ds.xq, k=10, nshort=nshort, nprobe=nprobe, scan=scan, batch_size=8)
               for scan in S.SCANS}
        staged = S.search(p, ds.xq, k=10, nshort=nshort, nprobe=nprobe, staged=True)
        np.testing.assert_array_equal(res["jax"].I, res["faiss"].I)
        np.testing.assert_array_equal(res["jax"].I, staged.I)
        np.testing.assert_allclose(res["jax"].D, res["faiss"].D, rtol=1e-5)
        assert all(v is not None for v in staged.times.values())
        probed = np.argsort(((ds.xq[:, None] - S.ivf_centroids(p.codec)[None]) ** 2).sum(-1), 1)[:, :nprobe]
        for q in range(NQ):  # the re-rank is exact over the shortlist
            short = res["jax"].I_short[q][res["jax"].I_short[q] >= 0]
            d = ((xhat[short] - ds.xq[q]) ** 2).sum(1)
            np.testing.assert_array_equal(res["jax"].I[q][:min(10, len(short))], short[np.argsort(d, kind="stable")][:10])
            assert np.isin(p.db_codes[short, 0], probed[q]).all()


def test_pipeline_hnsw_coarse_and_bad_input(ivf_pipeline):
    import faiss

    p, ds = ivf_pipeline
    hnsw = faiss.IndexHNSWFlat(D, 4)
    hnsw.add(S.ivf_centroids(p.codec))
    ph = S.Pipeline(p.codec, p.index, p.tables, p.db_codes, lists=p.scanner.lists, coarse=hnsw)
    a = S.search(p, ds.xq, k=10, nshort=50, nprobe=NLIST)
    b = S.search(ph, ds.xq, k=10, nshort=50, nprobe=NLIST, ef_search=16)
    np.testing.assert_array_equal(a.I, b.I)  # every list probed: the coarse quantizer does not matter
    for bad in (0, -1):
        with pytest.raises(QincoInputError, match="nprobe must be a positive int"):
            S.search(p, ds.xq, nprobe=bad)
    with pytest.raises(QincoInputError, match="unknown scan 'gpu'"):
        S.search(p, ds.xq, scan="gpu")
    other = SC.build_lists(np.concatenate([p.db_codes, p.db_codes[:5]]), p.tables, S.ivf_centroids(p.codec))
    with pytest.raises(QincoInputError, match="the scan lists .* do not match the index"):
        S.Pipeline(p.codec, p.index, p.tables, p.db_codes, lists=other)


def test_lists_built_in_chunks_equal_a_whole_sort():
    """The two-pass counting sort over chunks gives the stable sort by list of the whole database."""
    T, cent, codes, _ = setup()
    whole = SC.build_lists(codes, T, cent, chunk=codes.shape[0])
    order = np.argsort(codes[:, 0], kind="stable")
    assert np.array_equal(whole.ids, order) and np.array_equal(whole.codes, codes[order, 1:])
    for chunk in (1, 7, 64):
        part = SC.build_lists(codes, T, cent, chunk=chunk)
        for f in ("offsets", "codes", "ids", "term"):
            np.testing.assert_array_equal(getattr(part, f), getattr(whole, f))


@pytest.mark.parametrize("min_decode", [1, 50, 10**6])
def test_decode_groups_give_the_same_results(ivf_pipeline, monkeypatch, min_decode):
    """The re-rank joins the scan's sub-batches into decode calls of at least MIN_DECODE candidates: one call
    per sub-batch (1), groups of a few with a smaller last group (50), one call per batch (10**6) all give the
    same results, padded last sub-batch included."""
    from qinco_jax.search import pipeline, scan

    p, ds = ivf_pipeline
    monkeypatch.setattr(scan, "QB", 4)  # sub-batches of 4 queries, so that a batch has several
    monkeypatch.setattr(pipeline, "QB", 4)
    ref = S.search(p, ds.xq, k=10, nshort=6, nprobe=2, batch_size=NQ)
    monkeypatch.setattr(pipeline, "MIN_DECODE", min_decode)
    if min_decode == 50:
        parts = [(np.arange(4), 4, (None, np.zeros((4, 6)), None))] * 5
        assert [len(g) for g in pipeline._groups(parts, min_decode)] == [3, 2]
    for staged in (False, True):
        res = S.search(p, ds.xq, k=10, nshort=6, nprobe=2, batch_size=NQ, staged=staged)
        np.testing.assert_array_equal(res.I, ref.I)
        np.testing.assert_array_equal(res.D, ref.D)
        np.testing.assert_array_equal(res.I_short, ref.I_short)


@pytest.mark.parametrize("dtype,M", [(np.uint8, 5), (np.uint8, 8), (np.uint16, 3)])
def test_packed_codes_read_back(dtype, M):
    """The scan's packed words give back every step code, the largest ones (top bit set) included."""
    rng = np.random.default_rng(3)
    top = np.iinfo(dtype).max
    codes = rng.integers(0, top + 1, (50, M)).astype(dtype)
    codes[0], codes[1] = top, 0
    words = SC.pack_codes(codes)
    per = 4 // np.dtype(dtype).itemsize
    assert words.dtype == np.uint32 and words.shape == (50, -(-M // per))
    back = np.stack([np.asarray(SC._code(words, m, per)) for m in range(M)], -1)
    np.testing.assert_array_equal(back, codes.astype(np.int32))
