"""Finite but extreme weights: refused at load with a CheckpointError naming the tensor; encode never raises a
bare OverflowError."""

import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax.checks import CheckpointError, QincoInputError
from qinco_jax.probe import refuse_overflow

from conftest import TINY, random_codec


def _with(codec, name, leaf, value):
    params = {k: dict(v) if isinstance(v, dict) else v for k, v in codec.params.items()}
    target = params[name] if leaf else params
    key = leaf or name
    target[key] = np.full_like(np.asarray(target[key]), value)
    return qj.Codec(codec.config, params, codec.norm)


@pytest.mark.parametrize("name,leaf,match", [("codebook0", None, "codebook0"),
                                             ("step_1", "codebook", "step_1/codebook")])
def test_extreme_codebooks_refused_at_load(tmp_path, name, leaf, match):
    bad = _with(random_codec(), name, leaf, 3e38)
    qj.save(bad, tmp_path / "c")
    with pytest.raises(CheckpointError, match=f"overflows float32.*{match}.*finite but extreme"):
        qj.load(tmp_path / "c")


def test_extreme_ivf_centroids_and_scale_refused(tmp_path):
    cfg = qj.QincoConfig(d=16, K=16, M=3, L=1, h=16, nlist=8)
    ivf = random_codec(cfg)
    with pytest.raises(CheckpointError, match="IVF centroids: tensor codebook0"):
        refuse_overflow(_with(ivf, "codebook0", None, 1e38), "x")
    for scale in (3e38, 3e300):
        qj.save(random_codec(scale=scale), tmp_path / f"s{scale}")
        with pytest.raises(CheckpointError, match="data scale"):
            qj.load(tmp_path / f"s{scale}")
    qj.save(random_codec(scale=1e30), tmp_path / "big")  # large but usable: decode stays finite
    with pytest.raises(CheckpointError, match="overflow float32 once scaled back|data scale"):
        refuse_overflow(_with(random_codec(scale=1e30), "codebook0", None, 1e9), "x")
    assert qj.load(tmp_path / "big").scale == 1e30


def test_encode_never_raises_overflow_error():
    codec = random_codec(TINY, scale=3e300)
    x = np.ones((4, TINY.d), np.float32)
    with pytest.raises(QincoInputError, match="data scale 3e\\+300 is outside"):
        qj.encode(codec, x)
