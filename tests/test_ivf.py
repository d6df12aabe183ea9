"""IVF-QINCo: the codec against a float64 numpy reference and faiss IVF residual quantization,
the blocked nearest-centroid search, saving, checks, and the frozen-centroid train step."""

import json

import faiss
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax import faiss_ops, runtime, training
from qinco_jax.initialise import with_codebooks
from qinco_jax.model import init_params, nearest, nearest_blocked

import reference
from conftest import random_codec

IVF = qj.QincoConfig(d=12, K=16, M=3, L=2, h=10, nlist=40)


def near_ivf_codes(codec, n, seed=1, noise=0.05):
    """Raw-unit vectors close to decoded random IVF codes (list id < nlist, then codes < K)."""
    cfg, rng = codec.config, np.random.default_rng(seed)
    codes = np.concatenate([rng.integers(0, cfg.nlist, (n, 1)), rng.integers(0, cfg.K, (n, cfg.M))], axis=1)
    x = qj.decode(codec, codes)
    return (x + rng.normal(scale=noise * codec.scale, size=x.shape)).astype(np.float32)


def test_config():
    assert (IVF.num_codes, IVF.num_steps, IVF.code_dtype) == (4, 3, np.uint8)
    assert qj.QincoConfig(d=8, K=16, M=2, nlist=300).code_dtype == np.uint16
    assert qj.QincoConfig(d=8, K=16, M=2, nlist=65536).code_dtype == np.uint16
    assert qj.QincoConfig(d=8, K=16, M=2, nlist=65537).code_dtype == np.uint32
    plain = qj.QincoConfig(d=12, K=16, M=3, L=2, h=10)
    assert (plain.num_codes, plain.nlist) == (3, 0)
    with pytest.raises(ValueError, match="nlist must be >= 0"):
        qj.QincoConfig(d=8, nlist=-1)
    params = init_params(IVF, jax.random.key(0))
    assert sorted(params) == ["codebook0", "step_1", "step_2", "step_3"]
    assert params["codebook0"].shape == (40, 12)
    # the original counts trainable parameters only: the M steps, not the frozen centroids
    assert sum(a.size for a in jax.tree.leaves(params)) == IVF.num_params() + IVF.nlist * IVF.d
    step = sum(a.size for a in jax.tree.leaves(params["step_1"]))
    assert IVF.num_params() == IVF.M * step


@pytest.mark.parametrize("lowrank", [False, True])
def test_matches_numpy_reference(lowrank):
    cfg = qj.QincoConfig(d=12, K=16, M=3, L=2, h=10, lowrank=lowrank, nlist=40)
    codec = random_codec(cfg, seed=3, scale=2.5)
    x = near_ivf_codes(codec, 300)
    codes_ref, xhat_ref = reference.encode(codec.params, x / codec.scale, cfg.M, cfg.L, lowrank, ivf=True)
    codes, err = qj.encode_with_error(codec, x)
    assert codes.shape == (300, 4) and codes.dtype == np.uint8
    np.testing.assert_array_equal(codes[:, 0], codes_ref[:, 0])  # the list ids: exact
    assert (codes == codes_ref).mean() >= 0.999
    dec = reference.decode(codec.params, codes_ref, cfg.L, lowrank) * codec.scale
    np.testing.assert_allclose(qj.decode(codec, codes_ref), dec, atol=1e-4)
    np.testing.assert_allclose(err, ((xhat_ref * codec.scale - x) ** 2).sum(1), rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(runtime.ivf_assign(codec, x), codes_ref[:, 0])


def test_prefixes_and_centroids():
    codec = random_codec(IVF, seed=1, scale=4.0)
    np.testing.assert_allclose(codec.ivf_centroids, np.asarray(codec.params["codebook0"]) * 4.0)
    assert random_codec(seed=0).ivf_centroids is None
    x = near_ivf_codes(codec, 200)
    codes = qj.encode(codec, x)
    np.testing.assert_allclose(qj.decode(codec, codes[:, :1]), codec.ivf_centroids[codes[:, 0]], rtol=1e-6)
    for m in range(2, IVF.num_codes + 1):
        want = reference.decode(codec.params, codes[:, :m].astype(np.int64), IVF.L) * codec.scale
        np.testing.assert_allclose(qj.decode(codec, codes[:, :m]), want, atol=1e-4)


def _ivf_rq_codec(xt, cfg):
    """IVF-QINCo with zero concat blocks and L=0 (pure IVF residual quantization), and its faiss parts."""
    centroids = faiss_ops.kmeans(xt, cfg.nlist, seed=5)
    _, assign = faiss.knn(xt, centroids, 1)
    rq = faiss_ops.train_rq(xt - centroids[assign[:, 0]], cfg.M, cfg.K, beam_size=1)
    params = with_codebooks(init_params(cfg, jax.random.key(0)), faiss_ops.rq_codebooks(rq), centroids)
    params = jax.tree.map(np.asarray, params)
    for m in range(1, cfg.M + 1):
        params[f"step_{m}"]["concat"] = {k: np.zeros_like(v) for k, v in params[f"step_{m}"]["concat"].items()}
    return qj.Codec(cfg, params, 1.0), centroids, rq


def test_zero_network_equals_faiss_ivf_residual_quantizer():
    rng = np.random.default_rng(0)
    xt = (rng.normal(size=(4000, 16)) * np.linspace(3, 0.5, 16) + 2).astype(np.float32)
    cfg = qj.QincoConfig(d=16, K=16, M=3, L=0, h=16, nlist=24)
    codec, centroids, rq = _ivf_rq_codec(xt[:3000], cfg)
    quantizer = faiss.IndexFlatL2(cfg.d)
    quantizer.add(centroids)
    index = faiss.IndexIVFResidualQuantizer(quantizer, cfg.d, cfg.nlist, cfg.M, 4)
    assert index.by_residual
    faiss.copy_array_to_vector(faiss_ops.rq_codebooks(rq).ravel(), index.rq.codebooks)
    index.rq.max_beam_size = 1
    index.rq.is_trained = index.is_trained = True
    x = xt[3000:]
    packed = index.sa_encode(x)
    cc = index.coarse_code_size()
    listno = sum(packed[:, i].astype(np.int64) << (8 * i) for i in range(cc))
    want = np.concatenate([listno[:, None], faiss.unpack_bitstrings(np.ascontiguousarray(packed[:, cc:]), cfg.M, 4)], axis=1)
    ours = qj.encode(codec, x)
    np.testing.assert_array_equal(ours, want)
    np.testing.assert_allclose(qj.decode(codec, ours), index.sa_decode(packed), atol=1e-5)


def test_blocked_nearest_ties_and_bounded_memory():
    rng = np.random.default_rng(0)
    c = rng.normal(size=(2500, 8)).astype(np.float32)
    c[1500], c[2400], c[2490] = c[300], c[2300], c[2300]  # exact duplicates across and within blocks
    x = rng.normal(size=(300, 8)).astype(np.float32)
    x[:3] = c[[1500, 2400, 2490]]
    got = np.asarray(jax.jit(nearest_blocked)(x, c))
    np.testing.assert_array_equal(got[:3], [300, 2300, 2300])  # first index on ties
    np.testing.assert_array_equal(got, np.asarray(nearest(x, c)))
    # temporary memory is one (B, block) tile, whatever nlist (no (B, nlist) matrix, no padded copy)
    temp = []
    for n in (4096, 65536 + 7, 1 << 18):
        args = (jax.ShapeDtypeStruct((1024, 128), jnp.float32), jax.ShapeDtypeStruct((n, 128), jnp.float32))
        temp.append(jax.jit(nearest_blocked).lower(*args).compile().memory_analysis().temp_size_in_bytes)
    assert max(temp) < 1.05 * min(temp) and max(temp) < 32 << 20


def test_large_nlist_is_exact_and_widens_the_codes():
    rng = np.random.default_rng(1)
    cfg = qj.QincoConfig(d=4, K=16, M=1, L=0, h=4, nlist=70_000)
    codec = random_codec(cfg, seed=0)
    x = rng.normal(size=(257, 4)).astype(np.float32)
    codes = qj.encode(codec, x)
    assert codes.dtype == np.uint32 and codes.shape == (257, 2)
    c64 = np.asarray(codec.params["codebook0"], np.float64)
    d64 = np.stack([((c64 - xi) ** 2).sum(1) for xi in x.astype(np.float64)])
    best = d64.min(1)
    chosen = d64[np.arange(257), codes[:, 0].astype(np.int64)]
    assert (codes[:, 0] == d64.argmin(1)).mean() >= 0.99
    np.testing.assert_allclose(chosen, best, rtol=1e-5, atol=1e-7)  # any disagreement is a float32 tie
    np.testing.assert_allclose(qj.decode(codec, codes[:, :1]), codec.ivf_centroids[codes[:, 0]])


@pytest.mark.parametrize(
    "codes, match",
    [
        (np.array([[40, 0, 0, 0]]), r"IVF list ids \(codes column 0\) out of range \[0, 40\)"),
        (np.array([[39, 16, 0, 0]]), r"codes \(columns 1..\) out of range \[0, 16\)"),
        (np.zeros((2, 5), np.int64), "between 1 and M\\+1=4 columns"),
        (np.array([[-1]]), "column 0"),
    ],
)
def test_decode_checks_each_column(codes, match):
    codec = random_codec(IVF)
    with pytest.raises(qj.QincoInputError, match=match):
        qj.decode(codec, codes)
    qj.decode(codec, np.array([[39, 15, 15, 15]]))  # the largest valid codes pass


def test_save_load_round_trip_and_old_files(tmp_path):
    codec = random_codec(IVF, scale=7.5)
    back = qj.load(qj.save(codec, tmp_path / "c"))
    assert back.config == codec.config and back.config.nlist == 40
    x = near_ivf_codes(codec, 100)
    np.testing.assert_array_equal(qj.encode(back, x), qj.encode(codec, x))
    np.testing.assert_array_equal(back.ivf_centroids, codec.ivf_centroids)
    # a qinco.json written before IVF existed (no nlist field) loads as plain QINCo
    plain = random_codec(scale=2.0)
    path = qj.save(plain, tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "qinco.json").read_text())
    del meta["config"]["nlist"]
    (tmp_path / "old" / "qinco.json").write_text(json.dumps(meta))
    old = qj.load(path)
    assert old.config == plain.config and old.config.nlist == 0


def test_init_codec_trains_rq_on_the_ivf_residuals():
    rng = np.random.default_rng(0)
    xt = (rng.normal(size=(3000, 12)) * 4 + 10).astype(np.float32)
    centroids = faiss_ops.kmeans(xt, 40, seed=3)
    codec = qj.init_codec(IVF, xt, seed=0, centroids=centroids)
    np.testing.assert_allclose(codec.ivf_centroids, centroids, rtol=1e-6, atol=1e-5)
    assign = runtime.ivf_assign(codec, xt)
    rq = faiss_ops.train_rq(xt - centroids[assign], IVF.M, IVF.K)
    want = faiss_ops.rq_codebooks(rq)
    for m in range(1, IVF.M + 1):
        np.testing.assert_allclose(codec.params[f"step_{m}"]["codebook"] * codec.scale, want[m - 1], rtol=1e-5, atol=1e-4)
    km = qj.init_codec(IVF, xt, seed=0)  # default: faiss k-means with the seed
    np.testing.assert_array_equal(km.ivf_centroids, qj.init_codec(IVF, xt, seed=0).ivf_centroids)
    with pytest.raises(qj.QincoInputError, match="nlist=40 centroids needs at least"):
        qj.init_codec(IVF, xt[:30])
    with pytest.raises(qj.QincoInputError, match="dimension 11"):
        qj.init_codec(IVF, xt, centroids=centroids[:, :11])
    with pytest.raises(qj.QincoInputError, match="not IVF"):
        qj.init_codec(qj.QincoConfig(d=12, K=16, M=3, L=2, h=10), xt, centroids=centroids)


# ----------------------------------------------------------------------------------------------
# Training


def _run_step(codec, x, devices, steps=2, lr=1e-3):
    cfg = codec.config
    state = training.replicate(training.init_state(codec.params, cfg), tuple(devices))
    step = training.train_step(cfg, tuple(devices))
    xs, ws = training.shard_batch(x / codec.scale, np.ones(len(x), np.float32), len(devices))
    for _ in range(steps):
        state, loss = step(state, xs, ws, lr)
    return training.unreplicate(state), float(loss[0])


@pytest.mark.devices(8)
def test_train_step_eight_devices_equal_one_and_centroids_stay_frozen():
    assert jax.local_device_count() == 8
    codec = random_codec(IVF, scale=2.0)
    x = near_ivf_codes(codec, 1024, noise=0.2)
    s8, l8 = _run_step(codec, x, jax.local_devices())
    s1, l1 = _run_step(codec, x, jax.local_devices()[:1])
    assert l8 == pytest.approx(l1, rel=1e-5)
    diff = jax.tree.map(lambda a, b: np.abs(a - b).max(), s8.params, s1.params)
    assert max(jax.tree.leaves(diff)) < 1e-6
    for s in (s8, s1):  # bit for bit (a one-device subset of 8 unreplicates with a leading axis of 1)
        np.testing.assert_array_equal(np.reshape(s.params["codebook0"], (40, 12)), codec.params["codebook0"])
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), s1.params["step_1"], codec.params["step_1"])
    assert max(jax.tree.leaves(moved)) > 1e-4  # the steps do train
    assert "codebook0" not in s1.opt_state.mu  # Adam keeps no state for the frozen table


def test_loss_includes_the_ivf_error_without_gradient():
    codec = random_codec(IVF, scale=2.0)
    xs = near_ivf_codes(codec, 256, noise=0.2) / codec.scale
    w = np.ones(256, np.float32)
    codes, xhat = reference.encode(codec.params, xs, IVF.M, IVF.L, ivf=True)
    want = sum(((reference.decode(codec.params, codes[:, :m], IVF.L) - xs) ** 2).sum() for m in range(1, 5))
    err, count = training.loss_terms(IVF, codec.params, jnp.asarray(xs), jnp.asarray(w))
    assert float(err) == pytest.approx(want, rel=1e-4) and float(count) == 256
    g = jax.grad(lambda p: training.loss_terms(IVF, p, jnp.asarray(xs), jnp.asarray(w))[0])(codec.params)
    assert float(jnp.abs(g["codebook0"]).max()) == 0.0
    assert float(jnp.abs(g["step_1"]["codebook"]).max()) > 0.0


@pytest.mark.parametrize("value, match", [("40", "'nlist' is '40', expected an integer"), (1 << 29, "over the budget"),
                                          (-1, "nlist must be >= 0")])
def test_saved_nlist_is_checked(tmp_path, value, match):
    path = qj.save(random_codec(IVF), tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "qinco.json").read_text())
    meta["config"]["nlist"] = value
    (tmp_path / "c" / "qinco.json").write_text(json.dumps(meta))
    with pytest.raises(qj.CheckpointError, match=match):
        qj.load(path)
