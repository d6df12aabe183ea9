"""The codec against independent references: faiss's C++ QINCo, faiss RQ, a numpy forward pass."""

import numpy as np
import pytest

import faiss
import jax
import optax

import qinco_jax as qj
from qinco_jax import data, faiss_ops, runtime, training
from qinco_jax.initialise import with_codebooks
from qinco_jax.model import init_params

import reference
from conftest import TINY, near_codes, random_codec


def _faiss_parity(codec, x):
    q = faiss_ops.to_faiss(codec)
    codes = qj.encode(codec, x)
    codes_f = faiss_ops.faiss_encode(q, x / codec.scale)
    rec = qj.decode(codec, codes)
    rec_f = faiss_ops.faiss_decode(q, codes.astype(np.int32)) * codec.scale
    return (codes == codes_f).mean(), np.abs(rec - rec_f).max() / np.abs(rec_f).max()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("cfg", [TINY, qj.QincoConfig(d=32, K=16, M=4, L=1, h=16), qj.QincoConfig(d=8, K=32, M=3, L=0, h=8)])
def test_random_model_matches_faiss(cfg, seed):
    codec = random_codec(cfg, seed, scale=3.0)
    x = near_codes(codec, 600, seed=seed + 10)
    agree, rel = _faiss_parity(codec, x)
    assert agree >= 0.999
    assert rel < 1e-5


def _train_steps(codec, xt, steps=8, lr=1e-2):
    tx = optax.adam(lr)
    params, opt = codec.params, tx.init(codec.params)

    def loss(p, x):
        return training.loss_terms(codec.config, p, x, np.ones(len(x), np.float32))[0] / x.size

    for i in range(steps):
        g = jax.grad(loss)(params, xt[i * 128 : (i + 1) * 128] / codec.scale)
        upd, opt = tx.update(g, opt)
        params = optax.apply_updates(params, upd)
    return qj.Codec(codec.config, jax.device_get(params), codec.scale)


def test_trained_model_matches_faiss():
    rng = np.random.default_rng(0)
    xt = (rng.normal(size=(3000, 16)) @ rng.normal(size=(16, 16)) + 5).astype(np.float32)
    codec = qj.init_codec(TINY, xt[:2000], seed=0)
    trained = _train_steps(codec, xt)
    assert not np.allclose(trained.params["step_1"]["concat"]["kernel"], codec.params["step_1"]["concat"]["kernel"])
    agree, rel = _faiss_parity(trained, xt[2000:])
    assert agree >= 0.999
    assert rel < 1e-5


def test_zero_network_equals_faiss_greedy_rq():
    rng = np.random.default_rng(0)
    xt = (rng.normal(size=(3000, 16)) * np.linspace(3, 0.5, 16) + 2).astype(np.float32)
    cfg = qj.QincoConfig(d=16, K=16, M=4, L=0, h=16)
    rq = faiss_ops.train_rq(xt[:2000], cfg.M, cfg.K, beam_size=1)
    params = with_codebooks(init_params(cfg, jax.random.key(0)), faiss_ops.rq_codebooks(rq))
    params = jax.tree.map(np.asarray, params)
    for m in range(1, cfg.M):
        params[f"step_{m}"]["concat"] = {k: np.zeros_like(v) for k, v in params[f"step_{m}"]["concat"].items()}
    codec = qj.Codec(cfg, params, 1.0)
    x = xt[2000:]
    rq_codes = faiss.unpack_bitstrings(rq.compute_codes(x), cfg.M, 4)
    ours = qj.encode(codec, x)
    np.testing.assert_array_equal(ours, rq_codes)
    np.testing.assert_allclose(qj.decode(codec, ours), rq.decode(rq.compute_codes(x)), atol=1e-5)


@pytest.mark.parametrize("lowrank", [False, True])
def test_matches_numpy_reference(lowrank):
    cfg = qj.QincoConfig(d=12, K=16, M=3, L=2, h=10, lowrank=lowrank)
    codec = random_codec(cfg, seed=3)
    x = near_codes(codec, 300)
    codes_ref, xhat_ref = reference.encode(codec.params, x, cfg.M, cfg.L, lowrank)
    codes = qj.encode(codec, x)
    assert (codes == codes_ref).mean() >= 0.999
    np.testing.assert_allclose(qj.decode(codec, codes_ref), reference.decode(codec.params, codes_ref, cfg.L, lowrank), atol=1e-5)


def test_prefix_decoding_is_the_m_step_reconstruction(tiny_codec):
    x = near_codes(tiny_codec, 200)
    codes = qj.encode(tiny_codec, x)
    errs = []
    for m in range(1, TINY.M + 1):
        rec = qj.decode(tiny_codec, codes[:, :m])
        np.testing.assert_allclose(rec, reference.decode(tiny_codec.params, codes[:, :m], TINY.L), atol=1e-5)
        errs.append(((rec - x) ** 2).sum(1).mean())
    assert errs[-1] < errs[0]


def test_code_dtype_and_input_dtypes():
    codec = random_codec(qj.QincoConfig(d=8, K=16, M=3, L=1, h=8), scale=50.0)
    x8 = np.random.default_rng(0).integers(0, 255, (100, 8)).astype(np.uint8)
    codes = qj.encode(codec, x8)
    assert codes.dtype == np.uint8 and codes.shape == (100, 3)
    np.testing.assert_array_equal(codes, qj.encode(codec, x8.astype(np.float32)))
    np.testing.assert_array_equal(codes, qj.encode(codec, x8.astype(np.float16)))
    big = random_codec(qj.QincoConfig(d=8, K=512, M=2, L=0, h=8))
    assert qj.encode(big, x8[:10].astype(np.float32) / 100).dtype == np.uint16


def test_streaming_compiles_once_and_matches_one_shot(tiny_codec, tmp_path):
    x = near_codes(tiny_codec, 1000)
    path = tmp_path / "x.npy"
    np.save(path, x)
    xm = np.load(path, mmap_mode="r")
    whole = qj.encode(tiny_codec, x, batch_size=1000)
    one = jax.local_devices()[:1]  # the compilation count of the jitted single-device path
    fn = runtime._encode_fn(TINY, runtime._encode_chunk(TINY, 96, 1000), tuple(one))
    before = fn._cache_size()
    streamed = qj.encode(tiny_codec, xm, batch_size=96, devices=one)  # 10 full chunks + a padded one
    assert fn._cache_size() - before <= 1
    qj.encode(tiny_codec, xm[:500], batch_size=96, devices=one)
    assert fn._cache_size() - before <= 1
    np.testing.assert_array_equal(streamed, whole)
    codes_e, err = qj.encode_with_error(tiny_codec, xm, batch_size=96)
    np.testing.assert_allclose(err, ((qj.decode(tiny_codec, codes_e) - x) ** 2).sum(1), rtol=1e-3, atol=1e-5)


def test_num_params_matches_the_original_counts():
    assert qj.QincoConfig(d=128, K=256, M=8, L=2, h=256).num_params() == 1_409_920
    assert qj.QincoConfig(d=768, K=256, M=8, L=12, h=256, lowrank=True).num_params() == 38_731_776
    for cfg in (TINY, qj.QincoConfig(d=12, K=16, M=3, L=1, h=10, lowrank=True)):
        params = init_params(cfg, jax.random.key(0))
        assert sum(a.size for a in jax.tree.leaves(params)) == cfg.num_params()


def test_torch_default_init_bounds():
    params = init_params(qj.QincoConfig(d=32, K=16, M=2, L=1, h=64), jax.random.key(0))
    s = params["step_1"]
    assert np.abs(s["concat"]["kernel"]).max() <= 1 / np.sqrt(64) + 1e-7
    assert np.abs(s["concat"]["bias"]).max() <= 1 / np.sqrt(64) + 1e-7
    assert np.abs(s["block_0"]["down"]["kernel"]).max() <= 1 / np.sqrt(64) + 1e-7
    assert np.abs(s["block_0"]["up"]["kernel"]).max() > 0.9 / np.sqrt(32)


def test_init_codec_uses_rq_codebooks_and_data_scale():
    rng = np.random.default_rng(0)
    xt = (rng.normal(size=(2000, 16)) * 4 + 10).astype(np.float32)
    codec = qj.init_codec(TINY, xt, rq_beam_size=2)
    assert codec.scale == pytest.approx(float(xt.max()))
    rq = faiss_ops.train_rq(xt, TINY.M, TINY.K, beam_size=2)
    np.testing.assert_allclose(codec.params["codebook0"] * codec.scale, faiss_ops.rq_codebooks(rq)[0], rtol=1e-5, atol=1e-4)


def test_greedy_rq_is_faiss_rq_level_by_level():
    rng = np.random.default_rng(1)
    for n in (3000, 10000):  # below and above faiss's k-means subsample (256 K = 4096 points)
        xt = (rng.normal(size=(n, 16)) * np.linspace(3, 0.5, 16) + 2).astype(np.float32)
        faiss_books = faiss_ops.rq_codebooks(faiss_ops.train_rq(xt, 4, 16, beam_size=1))
        np.testing.assert_array_equal(faiss_ops.greedy_rq_codebooks(xt, 4, 16), faiss_books)


def test_init_codec_samples_at_most_rq_nt_vectors():
    rng = np.random.default_rng(2)
    xt = (rng.normal(size=(3000, 16)) * 4 + 10).astype(np.float32)
    codec = qj.init_codec(TINY, xt, seed=5, rq_nt=1000)
    assert codec.scale == pytest.approx(float(xt.max()))  # the scale is still over all of xt
    sample = data.sample_rows(xt, 1000, 5)
    assert sample.shape == (1000, 16) and len({tuple(r) for r in sample}) == 1000
    assert {tuple(r) for r in sample} <= {tuple(r) for r in xt}
    books = faiss_ops.greedy_rq_codebooks(sample, TINY.M, TINY.K)
    np.testing.assert_allclose(codec.params["codebook0"] * codec.scale, books[0], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(data.sample_rows(xt, 5000, 5), xt)  # all of them when there are fewer


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((5, 15), np.float32), "dimension 15"),
        (np.zeros((0, 16), np.float32), "empty"),
        (np.zeros((16,), np.float32), "2-D"),
        (np.array([["a"] * 16]), "real numbers"),
    ],
)
def test_encode_rejects_bad_vectors(tiny_codec, bad, match):
    with pytest.raises(qj.QincoInputError, match=match):
        qj.encode(tiny_codec, bad)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_encode_names_the_first_non_finite_row(tiny_codec, value):
    x = np.zeros((300, 16), np.float32)
    x[217, 3] = value
    x[250, 0] = value
    with pytest.raises(qj.QincoInputError, match="first bad row is 217"):
        qj.encode(tiny_codec, x, batch_size=64)


@pytest.mark.parametrize(
    "codes, match",
    [
        (np.full((4, 3), 16), r"out of range \[0, 16\)"),
        (np.full((4, 3), -1), "out of range"),
        (np.zeros((4, 4), np.int64), "between 1 and M=3"),
        (np.zeros((4,), np.int64), "2-D"),
        (np.zeros((4, 3), np.float32), "integers"),
        (np.zeros((0, 3), np.int64), "empty"),
    ],
)
def test_decode_rejects_bad_codes(tiny_codec, codes, match):
    with pytest.raises(qj.QincoInputError, match=match):
        qj.decode(tiny_codec, codes)


def test_config_validation():
    with pytest.raises(ValueError, match="M must be >= 1"):
        qj.QincoConfig(d=8, M=0)
    with pytest.raises(TypeError, match="d must be an int"):
        qj.QincoConfig(d=8.0)
    with pytest.raises(ValueError, match="K must be <= 65536"):
        qj.QincoConfig(d=8, K=70000)
    with pytest.raises(ValueError, match="shape"):
        qj.Codec(TINY, init_params(qj.QincoConfig(d=8, K=16, M=3, L=2, h=24), jax.random.key(0)), 1.0)
    with pytest.raises(ValueError, match="scale"):
        random_codec(scale=float("nan"))


def test_small_inputs_of_many_sizes_share_compilations(tiny_codec):
    x = near_codes(tiny_codec, 64)
    sizes = range(33, 64)  # all round up to one 64-vector chunk
    one = jax.local_devices()[:1]
    fns = {runtime._encode_fn(TINY, runtime._encode_chunk(TINY, None, n), tuple(one)) for n in sizes}
    assert len(fns) == 1
    fn = fns.pop()
    before = fn._cache_size()
    for n in sizes:
        np.testing.assert_array_equal(qj.encode(tiny_codec, x[:n], devices=one), qj.encode(tiny_codec, x)[:n])
    assert fn._cache_size() - before <= 1
    # over 8 devices the same sizes share one per-device chunk (8 vectors) too
    assert len({runtime._encode_chunk(TINY, None, -(-n // 8)) for n in sizes}) == 1


def test_real_sift_vectors_match_faiss():
    from conftest import shared_file
    from qinco_jax import data

    x = np.asarray(data.read_vectors(shared_file("sift5k_ngt.fvecs")), np.float32)
    cfg = qj.QincoConfig(d=128, K=16, M=3, L=1, h=32)
    codec = _train_steps(qj.init_codec(cfg, x[:3000], seed=0), x[:3000], steps=5, lr=1e-3)
    agree, rel = _faiss_parity(codec, x[3000:4000])
    assert agree >= 0.999
    assert rel < 1e-5


@pytest.mark.devices(8)
@pytest.mark.parametrize("n, batch", [(1000, 96), (5, None), (37, 8), (2048, None)])
def test_eight_devices_give_the_single_device_codes(tiny_codec, n, batch):
    devs = jax.local_devices()
    assert len(devs) == 8
    x = near_codes(tiny_codec, n, seed=n)
    codes8, err8 = qj.encode_with_error(tiny_codec, x, batch_size=batch)
    codes1, err1 = qj.encode_with_error(tiny_codec, x, batch_size=batch, devices=devs[:1])
    np.testing.assert_array_equal(codes8, codes1)
    np.testing.assert_allclose(err8, err1, rtol=1e-5, atol=1e-6)
    for m in (1, TINY.M):
        np.testing.assert_allclose(qj.decode(tiny_codec, codes1[:, :m], batch_size=batch),
                                   qj.decode(tiny_codec, codes1[:, :m], batch_size=batch, devices=devs[:1]), atol=1e-5)
    # the default ran as one pmap over the 8 devices (its function was built and cached)
    chunk = runtime._encode_chunk(TINY, batch, -(-n // 8))
    hits = runtime._encode_fn.cache_info().hits
    assert not hasattr(runtime._encode_fn(TINY, chunk, tuple(devs)), "_cache_size")  # a pmap, not a jit
    assert runtime._encode_fn.cache_info().hits == hits + 1


def test_multi_device_encode_reports_bad_rows_and_streams_memmaps(tiny_codec, tmp_path):
    x = near_codes(tiny_codec, 700)
    np.save(tmp_path / "x.npy", x)
    xm = np.load(tmp_path / "x.npy", mmap_mode="r")
    np.testing.assert_array_equal(qj.encode(tiny_codec, xm, batch_size=16),
                                  qj.encode(tiny_codec, x, devices=jax.local_devices()[:1]))
    x[613, 1] = np.nan
    with pytest.raises(qj.QincoInputError, match="first bad row is 613"):
        qj.encode(tiny_codec, x, batch_size=16)


def test_matmul_precision_is_float32_unless_set(tiny_codec):
    x = near_codes(tiny_codec, 64)
    ref = qj.encode(tiny_codec, x)
    assert runtime.MATMUL_PRECISION == "highest"
    try:
        runtime.set_matmul_precision("bfloat16")
        codes = qj.encode(tiny_codec, x)  # compiled anew at that precision
        assert codes.shape == ref.shape and (codes < TINY.K).all()
    finally:
        runtime.set_matmul_precision("highest")
    np.testing.assert_array_equal(qj.encode(tiny_codec, x), ref)
    with pytest.raises(qj.QincoInputError, match="precision"):
        runtime.set_matmul_precision("fp8")
