"""QINCo2: parameter counts against the spec's table, initialisation, the beam-search encoder
against a plain per-vector reference and brute force, search overrides and refusals."""

import itertools

import jax
import numpy as np
import pytest

import faiss
import qinco_jax as qj
from qinco_jax import codec as codec_mod
from qinco_jax.model import init_params
from qinco_jax import faiss_ops
from train.config import architecture

import reference
from conftest import near_codes, random_codec

V2 = qj.QincoConfig(d=12, K=16, M=3, L=2, h=20, variant="qinco2", de=10, A=4, B=3)


def _count(cfg) -> int:
    """Trainable parameters, counted on the actual parameter tree (shapes only, nothing computed)."""
    return sum(int(np.prod(s)) for s in jax.tree.leaves(codec_mod.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)))


# spec 1.4: (net, tot) in millions, per preset, for D = 96, 128, 256, 768 at 8 and 16 bytes
SPEC_COUNTS = {
    "qinco1": [(5.63, 5.83, 12.07, 12.47), (7.57, 7.83, 16.22, 16.75), (15.60, 16.12, 33.43, 34.48),
               (52.30, 53.88, 112.08, 115.22)],
    "qinco2-S": [(1.29, 1.66, 2.77, 3.53), (1.15, 1.64, 2.46, 3.48), (1.72, 2.70, 3.69, 5.72),
                 (3.10, 6.05, 6.64, 12.73)],
    "qinco2-M": [(10.07, 10.44, 21.57, 22.33), (10.32, 10.82, 22.12, 23.14), (11.36, 12.34, 24.34, 26.37),
                 (15.49, 18.43, 33.18, 39.28)],
    "qinco2-L": [(34.84, 35.21, 74.66, 75.42), (35.10, 35.59, 75.21, 76.22), (36.13, 37.11, 77.42, 79.45),
                 (40.26, 43.21, 86.27, 92.36)],
}


@pytest.mark.parametrize("preset", sorted(SPEC_COUNTS))
def test_parameter_counts_equal_the_spec_table(preset):
    for D, (net8, tot8, net16, tot16) in zip((96, 128, 256, 768), SPEC_COUNTS[preset]):
        for M, net, tot in ((8, net8, tot8), (16, net16, tot16)):
            cfg = qj.QincoConfig(**{**architecture(preset, D), "M": M})
            total = _count(cfg)
            books = cfg.K * D * (1 + (M - 1) * (2 if cfg.A else 1))
            assert round(total / 1e6, 2) == tot, (preset, D, M, total)
            assert round((total - books) / 1e6, 2) == net, (preset, D, M, total - books)
            assert total == cfg.num_params()


def test_qinco2_initialisation():
    for de in (10, 12):  # projections, and identity projections (de == d)
        cfg = qj.QincoConfig(d=12, K=16, M=3, L=2, h=20, variant="qinco2", de=de, A=4)
        p = init_params(cfg, jax.random.key(0))["step_1"]
        assert not np.any(p["concat"]["kernel"]) and not np.any(p["concat"]["bias"])
        assert not np.any(p["block_0"]["down"]["kernel"]) and not np.any(p["block_1"]["down"]["kernel"])
        up = np.asarray(p["block_0"]["up"]["kernel"])
        assert np.abs(up).max() <= np.sqrt(6 / de) and np.abs(up).max() > 0.9 * np.sqrt(6 / de)
        assert ("in_proj" in p) == ("out_proj" in p) == (de != 12)
        if de != 12:
            assert np.abs(p["in_proj"]["kernel"]).max() <= np.sqrt(6 / 12)
            assert np.abs(p["out_proj"]["kernel"]).max() <= np.sqrt(6 / de)
        codec = qj.Codec(cfg, jax.device_get(init_params(cfg, jax.random.key(0))), 1.0)
        codes = np.random.default_rng(0).integers(0, 16, (20, 3))
        c1 = codec.params["step_1"]["codebook"][codes[:, 1]]
        step = qj.decode(codec, codes[:, :2]) - qj.decode(codec, codes[:, :1])
        want = 2 * c1 if de == 12 else c1 + c1 @ p["in_proj"]["kernel"] @ p["out_proj"]["kernel"]
        np.testing.assert_allclose(step, want, rtol=1e-5, atol=1e-5)  # f = c + P_out P_in c, 2c when de == d


def _trained_like(cfg, seed=0):
    """Random QINCo2 weights with non-zero concat and down-projections (so every part matters)."""
    params = jax.device_get(init_params(cfg, jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: a + rng.normal(scale=0.2, size=a.shape).astype(np.float32) if "codebook" not in str(p) else a, params)
    return qj.Codec(cfg, params, 1.0)


@pytest.mark.parametrize("A,B", [(0, 1), (4, 1), (4, 3), (0, 5), (16, 2)])
def test_beam_search_matches_the_plain_reference(A, B):
    codec = _trained_like(V2)
    x = near_codes(codec, 120, noise=0.3)
    codes, err = qj.encode_with_error(codec, x, beam=B, candidates=A)
    ref_codes, ref_xhat = reference.beam_encode(codec.params, x, V2.M, V2.L, "qinco2", A, B)
    assert (codes == ref_codes).all(axis=1).mean() >= 0.98
    np.testing.assert_allclose(err, ((ref_xhat - x) ** 2).sum(1), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(qj.decode(codec, codes), reference.decode_any(codec.params, codes, V2.L, "qinco2"),
                               rtol=1e-4, atol=1e-4)


def test_beam_one_without_preselection_is_v1_greedy(tiny_codec):
    x = near_codes(tiny_codec, 200)
    greedy, _ = reference.encode(tiny_codec.params, x, tiny_codec.config.M, tiny_codec.config.L)
    codes = qj.encode(tiny_codec, x, beam=1, candidates=0)
    assert (codes == greedy).mean() >= 0.999
    np.testing.assert_array_equal(codes, qj.encode(tiny_codec, x))  # the v1 default is this search


def _brute_force(codec, x):
    cfg = codec.config
    tuples = np.array(list(itertools.product(range(cfg.K), repeat=cfg.M)))
    rec = reference.decode_any(codec.params, tuples, cfg.L, cfg.variant)
    dist = ((x[:, None, :] - rec[None]) ** 2).sum(-1)
    return tuples[dist.argmin(1)], dist.min(1)


@pytest.mark.parametrize("variant,A", [("qinco1", 0), ("qinco2", 0), ("qinco2", 4)])
def test_full_beam_equals_brute_force(variant, A):
    cfg = qj.QincoConfig(d=6, K=4, M=3, L=1, h=8, variant=variant, A=A, **({"de": 5} if variant == "qinco2" else {}))
    codec = _trained_like(cfg, seed=3) if variant == "qinco2" else random_codec(cfg, seed=3)
    x = near_codes(codec, 300, noise=0.5)
    best, best_err = _brute_force(codec, x)
    codes, err = qj.encode_with_error(codec, x, beam=cfg.K ** (cfg.M - 1), candidates=A)
    np.testing.assert_array_equal(codes, best)
    np.testing.assert_allclose(err, best_err, rtol=1e-4, atol=1e-5)
    greedy_err = qj.encode_with_error(codec, x, beam=1, candidates=A)[1]
    assert greedy_err.mean() > err.mean()  # the brute force really is better than greedy here


def test_search_overrides_decode_and_default_to_the_codec():
    codec = _trained_like(V2, seed=1)
    x = near_codes(codec, 200, noise=0.3)
    np.testing.assert_array_equal(qj.encode(codec, x), qj.encode(codec, x, beam=V2.B, candidates=V2.A))
    errs = {}
    for A, B in [(1, 1), (4, 1), (4, 8), (16, 8), (0, 8)]:
        codes, err = qj.encode_with_error(codec, x, beam=B, candidates=A)
        np.testing.assert_allclose(err, ((qj.decode(codec, codes) - x) ** 2).sum(1), rtol=1e-3, atol=1e-4)
        errs[A, B] = err.mean()
    assert errs[16, 8] < errs[1, 1]


def test_search_refusals():
    codec = _trained_like(V2)
    x = near_codes(codec, 10)
    with pytest.raises(qj.QincoInputError, match="candidates must be between 0"):
        qj.encode(codec, x, candidates=17)
    with pytest.raises(qj.QincoInputError, match="beam must be >= 1"):
        qj.encode(codec, x, beam=0)
    with pytest.raises(qj.QincoInputError, match="trained without"):
        qj.encode(random_codec(), near_codes(random_codec(), 10), candidates=4)
    no_pre = _trained_like(qj.QincoConfig(**{**V2.to_dict(), "A": 0}))
    with pytest.raises(qj.QincoInputError, match="trained without"):
        qj.encode(no_pre, x, candidates=2)
    with pytest.raises(ValueError, match="A = 17"):
        qj.QincoConfig(d=8, K=16, A=17, variant="qinco2")
    with pytest.raises(ValueError, match="lowrank"):
        qj.QincoConfig(d=8, K=16, variant="qinco2", lowrank=True)


def test_save_load_round_trip_with_mean_std_normalisation(tmp_path):
    rng = np.random.default_rng(0)
    xt = (rng.normal(size=(2000, 12)) * 3 + np.arange(12)).astype(np.float32)
    codec = qj.init_codec(V2, xt, seed=0, init="rq-exact")  # an untrained codec that already compresses
    assert codec.shift is not None and codec.shift.shape == (12,)
    np.testing.assert_allclose(codec.shift, xt.mean(0), rtol=1e-4, atol=1e-4)
    assert codec.scale == pytest.approx(float(xt.std()), rel=1e-6)  # numpy's std() of all entries, as the original
    assert codec.scale > float((xt - xt.mean(0)).std()) * 1.1  # not around each dimension's mean
    back = qj.load(qj.save(codec, tmp_path / "c"))
    assert back.config == V2
    np.testing.assert_array_equal(back.shift, codec.shift)
    np.testing.assert_array_equal(qj.encode(back, xt[:100]), qj.encode(codec, xt[:100]))
    rec = qj.decode(back, qj.encode(back, xt[:100]))
    assert ((rec - xt[:100]) ** 2).sum(1).mean() < ((xt[:100] - xt.mean(0)) ** 2).sum(1).mean() / 2


def test_v1_codec_saved_before_the_qinco2_fields_still_loads(tmp_path):
    import json

    codec = random_codec(scale=3.0)
    path = qj.save(codec, tmp_path / "old")
    meta_path = tmp_path / "old" / "qinco.json"
    meta = json.loads(meta_path.read_text())
    meta["config"] = {k: meta["config"][k] for k in ("d", "K", "M", "L", "h", "lowrank")}
    meta_path.write_text(json.dumps(meta))
    back = qj.load(path)
    assert back.config == codec.config and back.shift is None and back.scale == 3.0


@pytest.mark.parametrize("variant", ["qinco1", "qinco2"])
def test_rq_exact_init_is_the_rq(variant):
    rng = np.random.default_rng(0)
    xt = (rng.normal(size=(3000, 12)) * np.linspace(4, 1, 12) + 5).astype(np.float32)
    extra = {"de": 10, "A": 16, "B": 4} if variant == "qinco2" else {}
    cfg = qj.QincoConfig(d=12, K=16, M=3, L=2, h=20, variant=variant, **extra)
    codec = qj.init_codec(cfg, xt[:2000], init="rq-exact")
    rq = faiss_ops.train_rq(xt[:2000], cfg.M, cfg.K)
    rq.max_beam_size = cfg.B
    x = xt[2000:]
    rq_codes = faiss.unpack_bitstrings(rq.compute_codes(x), cfg.M, 4)
    rq_rec = rq.decode(rq.compute_codes(x))
    np.testing.assert_allclose(qj.decode(codec, rq_codes), rq_rec, rtol=1e-5, atol=1e-4)
    codes, err = qj.encode_with_error(codec, x)
    assert (codes == rq_codes).all(1).mean() > 0.99
    assert err.mean() == pytest.approx(((rq_rec - x) ** 2).sum(1).mean(), rel=1e-5)
