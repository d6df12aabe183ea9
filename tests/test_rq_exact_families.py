"""`--init rq-exact` per family (QINCo v1, QINCo-LR, IVF-QINCo v1, QINCo2 with and without projections,
IVF-QINCo2, PQ-QINCo blocks): the untrained codec is faiss's RQ with the same search (to 1e-5 relative on validation), and
the first training step gives every trainable parameter a non-zero gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax import data, faiss_ops, training

FAMILIES = {
    "v1": dict(d=32, K=16, M=3, L=1, h=16),
    "qinco-lr": dict(d=32, K=16, M=3, L=1, h=8, lowrank=True),
    "ivf-v1": dict(d=32, K=16, M=2, L=1, h=16, nlist=8),
    "qinco2": dict(d=32, K=16, M=3, L=1, h=16, variant="qinco2", de=24, A=4, B=3),
    # A >= B: pre-selecting A of the K codes by their RQ distance keeps the B best of each beam, so the
    # search is faiss's beam search of width B (IVF: the first networked step keeps max(A, B) of its one beam)
    "qinco2-no-proj": dict(d=32, K=16, M=3, L=2, h=32, variant="qinco2", A=4, B=3),  # de = d: no projections
    "ivf-qinco2": dict(d=32, K=16, M=2, L=1, h=16, variant="qinco2", de=24, A=4, B=3, nlist=8),
    "pq-blocks": dict(d=16, K=16, M=2, L=1, h=16),  # each of the 2 blocks of 16 dimensions
}
PQ_BLOCKS = 2


@pytest.fixture(scope="module")
def ds():
    return data.synthetic(seed=0, nt=2000, nval=300, nb=100)


def _parts(name, xt, xv):
    """(config, training part, validation part) per quantizer: one, or one per PQ block."""
    cfg = qj.QincoConfig(**FAMILIES[name])
    if name != "pq-blocks":
        return [(cfg, xt, xv)]
    w = xt.shape[1] // PQ_BLOCKS
    return [(cfg, xt[:, b * w : (b + 1) * w], xv[:, b * w : (b + 1) * w]) for b in range(PQ_BLOCKS)]


def _faiss_rq_mse(codec, xt, xv) -> np.ndarray:
    """Per-vector squared error of faiss's RQ (trained with beam 1, as the initialisation) searched with
    the codec's beam; IVF: on the residuals to the codec's own centroids and assignment."""
    cfg = codec.config
    xt, xv = np.array(xt, np.float32), np.array(xv, np.float32)
    if cfg.nlist:
        c = codec.ivf_centroids
        xt -= c[qj.runtime.ivf_assign(codec, xt)]
        xv -= c[qj.runtime.ivf_assign(codec, xv)]
    rq = faiss_ops.train_rq(xt, cfg.M, cfg.K)
    rq.max_beam_size = cfg.B
    return ((rq.decode(rq.compute_codes(xv)) - xv) ** 2).sum(1)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_rq_exact_starts_at_faiss_rq(ds, name):
    xt, xv = np.asarray(ds.xt, np.float32), np.asarray(ds.xval, np.float32)
    ours, theirs, subs = 0.0, 0.0, []
    for cfg, t, v in _parts(name, xt, xv):
        codec = qj.init_codec(cfg, t, seed=0, init="rq-exact")
        subs.append(codec)
        theirs = theirs + _faiss_rq_mse(codec, t, v)
        ours = ours + qj.encode_with_error(codec, v)[1]
    if name == "pq-blocks":  # the PQ codec of the blocks: its error is the blocks' errors summed
        pq_err = qj.encode_with_error(qj.PQCodec(None, tuple(subs)), xv)[1]
        np.testing.assert_allclose(pq_err, ours, rtol=1e-5)
    assert float(np.mean(ours)) == pytest.approx(float(np.mean(theirs)), rel=1e-5)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_rq_exact_first_step_moves_every_parameter(ds, name):
    xt = np.asarray(ds.xt, np.float32)
    zero = []
    for b, (cfg, t, _) in enumerate(_parts(name, xt, xt[:1])):
        codec = qj.init_codec(cfg, t, seed=0, init="rq-exact")
        x = (t[:512] - (0 if codec.shift is None else codec.shift)) / np.float32(codec.scale)
        grads = jax.grad(lambda p: training.loss_terms(cfg, p, jnp.asarray(x), jnp.ones(len(x)))[0])(codec.params)
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            key = jax.tree_util.keystr(path)
            if cfg.nlist and key == "['codebook0']":
                continue  # the frozen IVF centroids are not trained
            if not np.any(np.asarray(g)):
                zero.append(f"block {b} {key}" if name == "pq-blocks" else key)
    assert not zero, f"parameters with a zero gradient at the first step: {zero}"


def test_rq_exact_without_mirrored_pairs_is_still_exact(ds):
    """Widths that cannot be mirrored (odd h; QINCo2 without projections and h < de) fall back to
    zeroed inner paths: still exactly the RQ."""
    xt, xv = np.asarray(ds.xt, np.float32), np.asarray(ds.xval, np.float32)
    for cfg in (qj.QincoConfig(d=32, K=16, M=3, L=1, h=15),
                qj.QincoConfig(d=32, K=16, M=3, L=1, h=16, variant="qinco2", A=4, B=3)):
        assert not qj.initialise.mirror_possible(cfg)
        codec = qj.init_codec(cfg, xt, seed=0, init="rq-exact")
        ours = qj.encode_with_error(codec, xv)[1]
        assert float(np.mean(ours)) == pytest.approx(float(np.mean(_faiss_rq_mse(codec, xt, xv))), rel=1e-5)
