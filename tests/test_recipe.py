"""QINCo2's recipe pieces: schedule, optimizer, pre-selection loss, usage statistics over devices,
dead-codeword reset."""

import jax
import numpy as np
import optax
import pytest

import qinco_jax as qj
from qinco_jax import model
from qinco_jax import recipe, training

from conftest import near_codes

V2 = qj.QincoConfig(d=12, K=16, M=3, L=1, h=16, variant="qinco2", de=10, A=4, B=2)


def _codec(seed=0):
    rng = np.random.default_rng(seed)
    params = jax.device_get(model.init_params(V2, jax.random.key(seed)))
    params = jax.tree.map(lambda a: a + rng.normal(scale=0.1, size=a.shape).astype(np.float32), params)
    return qj.Codec(V2, params, 1.0)


def test_schedule_is_the_originals_scaled_to_the_run():
    epochs = 63  # the original's 3 + 60: its schedule exactly
    assert recipe.lr_factor(1.5, epochs) == pytest.approx(0.5)
    assert recipe.lr_factor(3.0, epochs) == pytest.approx(1.0)
    assert recipe.lr_factor(3 + 30, epochs) == pytest.approx(np.cos(np.pi / 4))
    assert recipe.lr_factor(63, epochs) == recipe.LR_FLOOR
    f = [recipe.lr_factor(t, 21) for t in np.linspace(0, 21, 200)]
    peak = int(np.argmax(f))
    assert np.all(np.diff(f[: peak + 1]) >= 0) and np.all(np.diff(f[peak:]) <= 0)
    assert recipe.lr_factor(1.0, 21) == pytest.approx(1.0)  # warm-up keeps its 3/63 share


def test_optimizer_is_adamw_with_per_element_clipping():
    params = {"a": np.linspace(-1, 1, 6, dtype=np.float32), "b": np.ones((2, 3), np.float32)}
    grads = {"a": np.array([5, -0.05, 0.3, -2, 0.01, 0], np.float32), "b": np.full((2, 3), -0.7, np.float32)}
    lr = 8e-4
    tx = training.optimizer(V2)
    upd, _ = tx.update(grads, tx.init(params), params)
    ours = optax.apply_updates(params, jax.tree.map(lambda u: -lr * u, upd))
    ref_tx = optax.chain(optax.clip(0.1), optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1))
    ref_upd, _ = ref_tx.update(grads, ref_tx.init(params), params)
    ref = optax.apply_updates(params, ref_upd)
    for k in params:
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-6, atol=1e-8)


def test_preselection_term_trains_only_the_preselection_books():
    codec = _codec()
    x = near_codes(codec, 64, noise=0.3)
    w = np.ones(64, np.float32)

    codes = training.search_codes(V2, codec.params, x)

    def pre_term(p):
        xhats = model.Qinco(V2).apply({"params": p}, codes, method=model.Qinco.decode_prefixes)
        return recipe.preselection_error(V2, p, codes, xhats, x).sum()

    g_pre = jax.grad(pre_term)(codec.params)
    g_all = jax.grad(lambda p: training.loss_terms(V2, p, x, w)[0])(codec.params)
    for m in (1, 2):
        step_pre, step_all = g_pre[f"step_{m}"], g_all[f"step_{m}"]
        assert np.abs(step_pre["presel_codebook"]).sum() > 0
        np.testing.assert_allclose(step_all["presel_codebook"], step_pre["presel_codebook"], rtol=1e-5, atol=1e-7)
        for k, v in step_pre.items():  # the term reaches nothing but its own book
            if k != "presel_codebook":
                assert not any(np.any(leaf) for leaf in jax.tree.leaves(v)), k
    # the term equals the RQ error of the books on the encoder's codes
    xh = [qj.decode(codec, np.asarray(codes)[:, : m + 1]) for m in range(V2.M)]
    want = sum(((xh[m - 1] + np.asarray(codec.params[f"step_{m}"]["presel_codebook"])[np.asarray(codes)[:, m]] - x) ** 2).sum(1)
               for m in (1, 2))
    got = recipe.preselection_error(V2, codec.params, codes, [np.asarray(a) for a in xh], x)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def _stats_step(codec, x, devices):
    state = training.replicate(training.init_state(codec.params, V2), tuple(devices))
    step = training.train_step(V2, tuple(devices), stats=True)
    xs, ws = training.shard_batch(x, np.ones(len(x), np.float32), len(devices))
    state, loss, stats = step(state, xs, ws, 1e-3)
    return training.unreplicate(state), jax.device_get(jax.tree.map(lambda a: a[0], stats))


@pytest.mark.devices(8)
def test_usage_is_counted_over_all_devices():
    assert jax.local_device_count() == 8
    codec = _codec(1)
    x = near_codes(codec, 256, noise=0.3)
    s8, st8 = _stats_step(codec, x, jax.local_devices())
    s1, st1 = _stats_step(codec, x, jax.local_devices()[:1])
    np.testing.assert_array_equal(st8["counts"], st1["counts"])
    assert st8["counts"].sum() == 256 * V2.M and st8["n"] == 256
    codes = np.asarray(training.search_codes(V2, codec.params, x))
    for m in range(V2.M):
        np.testing.assert_array_equal(st8["counts"][m], np.bincount(codes[:, m], minlength=V2.K))
    np.testing.assert_allclose(st8["rsum"][0], x.sum(0), rtol=1e-4, atol=1e-3)
    diff = jax.tree.map(lambda a, b: np.abs(a - b).max(), s8.params, s1.params)
    assert max(jax.tree.leaves(diff)) < 1e-5


def test_dead_codeword_reset():
    codec = _codec(2)
    counts = np.ones((V2.M, V2.K))
    counts[1, [3, 7]] = 0
    counts[0, 5] = 0
    rng = np.random.default_rng(0)
    mean, std = rng.normal(size=(V2.M, V2.d)), rng.uniform(0.5, 2, size=(V2.M, V2.d))
    n = 1000.0
    stats = {"counts": counts, "n": n, "rsum": mean * n, "rsq": (std**2 + mean**2) * n}
    new, total = recipe.reset_dead_codes(V2, codec.params, stats, seed=1, epoch=4)
    again, _ = recipe.reset_dead_codes(V2, codec.params, stats, seed=1, epoch=4)
    assert total == 3
    old1, new1 = np.asarray(codec.params["step_1"]["codebook"]), new["step_1"]["codebook"]
    changed = np.flatnonzero(np.any(old1 != new1, axis=1))
    np.testing.assert_array_equal(changed, [3, 7])
    np.testing.assert_array_equal(np.flatnonzero(np.any(np.asarray(codec.params["codebook0"]) != new["codebook0"], 1)), [5])
    np.testing.assert_array_equal(new["step_2"]["codebook"], codec.params["step_2"]["codebook"])
    pre = new["step_1"]["presel_codebook"][[3, 7]]
    assert 0 < np.abs(pre - new1[[3, 7]]).max() < 1.0  # the same vector plus small noise
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)  # seeded by (seed, epoch): a resumed run resets alike
