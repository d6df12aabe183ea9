"""The data-parallel train step and the plateau schedule."""

import jax
import numpy as np
import optax
import pytest

import qinco_jax as qj
from qinco_jax import training

from conftest import TINY, near_codes, random_codec


def _run_step(codec, x, w, devices, lr=1e-3, steps=1):
    n = len(devices)
    state = training.replicate(training.init_state(codec.params), devices)
    step = training.train_step(TINY, tuple(devices))
    xs, ws = training.shard_batch(x / codec.scale, w, n)
    for _ in range(steps):
        state, loss = step(state, xs, ws, lr)
    return training.unreplicate(state), float(loss[0])


@pytest.mark.devices(8)
def test_eight_devices_equal_one_device():
    assert jax.local_device_count() == 8
    codec = random_codec(scale=2.0)
    x = near_codes(codec, 1024, noise=0.2)
    w = np.ones(1024, np.float32)
    s8, l8 = _run_step(codec, x, w, jax.local_devices(), steps=2)
    s1, l1 = _run_step(codec, x, w, jax.local_devices()[:1], steps=2)
    assert l8 == pytest.approx(l1, rel=1e-5)
    diff = jax.tree.map(lambda a, b: np.abs(a - b).max(), s8.params, s1.params)
    assert max(jax.tree.leaves(diff)) < 1e-6
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), s1.params, codec.params)
    assert max(jax.tree.leaves(moved)) > 1e-4  # the step did change the parameters


@pytest.mark.parametrize("cfg", [
    qj.QincoConfig(d=12, K=16, M=3, L=1, h=16, variant="qinco2", de=10, A=4, B=3),
    qj.QincoConfig(d=8, K=16, M=3, L=2, h=12),
], ids=["qinco2", "qinco1"])
def test_train_step_codes_are_encode_at_the_models_search(cfg):
    """The codes the loss is computed on are those of qj.encode with the config's (A, B)."""
    codec = random_codec(cfg, seed=2)  # scale 1, no shift: raw units are the model's domain
    rng = np.random.default_rng(2)  # non-zero QINCo2 blocks, so that the networks steer the search
    params = jax.tree.map(lambda a: a + rng.normal(scale=0.1, size=a.shape).astype(np.float32), codec.params)
    codec = qj.Codec(cfg, params, 1.0)
    x = near_codes(codec, 256, seed=3, noise=0.3)
    got = np.asarray(jax.jit(training.search_codes, static_argnums=0)(cfg, codec.params, x))
    want = qj.encode(codec, x, beam=cfg.B, candidates=cfg.A)
    assert got.shape == want.shape == (256, cfg.M)
    np.testing.assert_array_equal(got, want)


def test_loss_is_the_original_mean_and_padding_is_ignored():
    codec = random_codec(scale=2.0)
    x = near_codes(codec, 1000, noise=0.2)
    xs = x / codec.scale
    err, _ = training.loss_terms(TINY, codec.params, xs, np.ones(1000, np.float32))
    want = float(err / (1000 * TINY.d))  # the original: losses.sum() / B / d
    xp = np.zeros((1024, TINY.d), np.float32)
    xp[:1000] = x
    w = np.zeros(1024, np.float32)
    w[:1000] = 1
    s_pad, loss = _run_step(codec, xp, w, jax.local_devices())
    assert loss == pytest.approx(want, rel=1e-5)
    s_ref, _ = _run_step(codec, x[:1000], np.ones(1000, np.float32), jax.local_devices()[:1])
    diff = jax.tree.map(lambda a, b: np.abs(a - b).max(), s_pad.params, s_ref.params)
    assert max(jax.tree.leaves(diff)) < 1e-6


def test_step_matches_plain_adam():
    codec = random_codec(scale=2.0)
    x = near_codes(codec, 512, noise=0.2) / codec.scale
    s1, _ = _run_step(codec, x * codec.scale, np.ones(512, np.float32), jax.local_devices()[:1], lr=1e-3)
    tx = optax.adam(1e-3)
    g = jax.grad(lambda p: training.loss_terms(TINY, p, x, np.ones(len(x), np.float32))[0] / x.size)(codec.params)
    upd, _ = tx.update(g, tx.init(codec.params))
    ref = optax.apply_updates(codec.params, upd)
    diff = jax.tree.map(lambda a, b: np.abs(a - b).max(), s1.params, ref)
    assert max(jax.tree.leaves(diff)) < 1e-6


def test_batch_must_split_over_devices():
    with pytest.raises(ValueError, match="multiple of 8"):
        training.check_batch(1020, 8)


def _original_scheduler(vals, lr0):
    """The original's host-side rule (spec §2.5): lr /10 when E > last_update + 10 and the last 10 > best."""
    lr, last_update, lrs = lr0, 0, []
    for e in range(1, len(vals) + 1):
        best = min(vals[:e])
        if e > last_update + 10 and all(v > best for v in vals[e - 10 : e]):
            lr /= 10
            last_update = e
        lrs.append(lr)
    return lrs


def _ours(vals, lr0):
    tx = training.plateau()
    state, lrs = tx.init({}), []
    for v in vals:
        _, state = tx.update({}, state, value=v)
        lrs.append(lr0 * float(state.scale))
    return lrs


def _sequences():
    rng = np.random.default_rng(0)
    yield [10.0] + [9.0] * 60  # ties with the best: the original never reduces
    yield [10.0, 9.0, 9.0, 9.5] * 15
    yield list(np.r_[np.linspace(10, 5, 20), 5 + rng.uniform(0.01, 1, 40), [4.0], 4 + rng.uniform(0.01, 1, 30)])
    for _ in range(200):
        n = int(rng.integers(1, 120))
        kind = rng.integers(3)
        if kind == 0:  # few distinct values: many ties, with the best and with each other
            yield list(rng.integers(0, 4, n).astype(float))
        elif kind == 1:  # a slowly decreasing trend with noise
            yield list(np.linspace(10, 1, n) + rng.normal(0, 1.5, n))
        else:  # a decrease then a noisy plateau that sometimes touches its minimum again
            base = np.maximum(np.linspace(10, 0, n), 3.0)
            yield list(np.round(base + rng.uniform(0, 2, n), 1))


def test_plateau_reproduces_the_original_scheduler():
    reductions = 0
    for vals in _sequences():
        want = _original_scheduler(vals, 1e-3)
        np.testing.assert_allclose(_ours(vals, 1e-3), want, rtol=1e-5, err_msg=str(vals))
        reductions += len(set(np.round(np.log10(want)).astype(int))) - 1
    assert reductions > 100  # the rule did fire, many times


def test_plateau_ties_never_reduce():
    assert set(_ours([10.0] + [9.0] * 100, 1e-3)) == {1e-3}
    lrs = _ours([10.0] + [9.0] + [9.5] * 30, 1e-3)
    assert lrs[10] == 1e-3 and lrs[11] == pytest.approx(1e-4)  # 10 values above the best, then the cut


def _reference_loss(params, codes, x, L, lowrank):
    """The original's loss in float64 numpy with the codes fixed: sum over prefixes of the squared
    errors, divided by B * d (tests/reference.py's independent decoder)."""
    import reference

    total = sum(((reference.decode(params, codes[:, :m], L, lowrank) - x) ** 2).sum() for m in range(1, codes.shape[1] + 1))
    return total / x.size


@pytest.mark.parametrize("lowrank", [False, True])
def test_gradient_matches_float64_finite_differences(lowrank):
    cfg = qj.QincoConfig(d=6, K=8, M=3, L=2, h=5, lowrank=lowrank)
    codec = random_codec(cfg, seed=4, scale=1.0)
    x = near_codes(codec, 40, seed=5, noise=0.3).astype(np.float64)
    w = np.ones(len(x), np.float32)
    grads = jax.grad(lambda p: training.loss_terms(cfg, p, x.astype(np.float32), w)[0] / x.size)(codec.params)
    codes = np.asarray(training.search_codes(cfg, codec.params, x.astype(np.float32)))
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), codec.params)
    leaves, treedef = jax.tree_util.tree_flatten(p64)
    g_leaves = [np.asarray(g) for g in jax.tree_util.tree_leaves(grads)]
    rng = np.random.default_rng(0)
    eps, checked = 1e-6, 0
    for i, leaf in enumerate(leaves):
        for j in rng.choice(leaf.size, min(4, leaf.size), replace=False):
            fd = []
            for sign in (1, -1):
                moved = [a.copy() for a in leaves]
                moved[i].flat[j] += sign * eps
                fd.append(_reference_loss(jax.tree_util.tree_unflatten(treedef, moved), codes, x, cfg.L, lowrank))
            num = (fd[0] - fd[1]) / (2 * eps)
            assert g_leaves[i].flat[j] == pytest.approx(num, rel=2e-3, abs=1e-6), (i, j)
            checked += 1
    assert checked > 40
    # the gradient does reach every kind of parameter
    assert all(np.abs(g).max() > 0 for g in g_leaves)
