"""Test set-up: 8 fake CPU devices (set before JAX starts), tiny configs, shared fixtures."""

import os
import pathlib
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import qinco_jax as qj  # noqa: E402
from qinco_jax import model  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = qj.QincoConfig(d=16, K=16, M=3, L=2, h=24)


def pytest_configure(config):
    config.addinivalue_line("markers", "devices(n): needs n JAX devices (8 fake CPU devices unless XLA_FLAGS is set)")


def pytest_runtest_setup(item):
    """Skip tests marked devices(n) in a process with fewer devices: the fake CPU devices come from
    XLA_FLAGS, and an XLA_FLAGS set before the tests started (without the device count) is kept."""
    for mark in item.iter_markers("devices"):
        if jax.device_count() < mark.args[0]:
            pytest.skip(f"needs {mark.args[0]} JAX devices, this process has {jax.device_count()} "
                        f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; add --xla_force_host_platform_device_count=8)")


def shared_file(name: str) -> pathlib.Path:
    """A file of ../shared/data, or skip the test when it is absent (users' machines)."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def as_rq(codec: qj.Codec) -> qj.Codec:
    """The codec with zero concat and residual-block outputs: f(c, xhat) = c, i.e. plain RQ."""
    zero = lambda path, a: a * 0 if any(getattr(k, "key", "") in ("concat", "down") for k in path) else a  # noqa
    return qj.Codec(codec.config, jax.tree_util.tree_map_with_path(zero, codec.params), codec.scale)


def random_codec(cfg: qj.QincoConfig = TINY, seed: int = 0, scale: float = 1.0) -> qj.Codec:
    """Random weights with N(0,1) codebooks."""
    return qj.Codec(cfg, jax.device_get(model.init_params(cfg, jax.random.key(seed))), scale)


def near_codes(codec: qj.Codec, n: int, seed: int = 1, noise: float = 0.05) -> np.ndarray:
    """Raw-unit vectors close to decoded random codes (so that every step matters); IVF codecs: a random
    list id first."""
    rng = np.random.default_rng(seed)
    cfg = codec.config
    if cfg.nlist:
        codes = np.concatenate([rng.integers(0, cfg.nlist, (n, 1)), rng.integers(0, cfg.K, (n, cfg.M))], 1)
    else:
        codes = rng.integers(0, cfg.K, (n, cfg.M))
    x = qj.decode(codec, codes)
    return (x + rng.normal(scale=noise * codec.scale, size=x.shape)).astype(np.float32)


@pytest.fixture
def tiny_codec():
    return random_codec()


NO_MATPLOTLIB = "plots need matplotlib (pip install 'qinco-jax[plots]')"


def need_matplotlib() -> None:
    """Skip the calling test, with the reason, where matplotlib is not installed."""
    pytest.importorskip("matplotlib", reason=NO_MATPLOTLIB)


@pytest.fixture
def without_matplotlib(monkeypatch):
    """matplotlib unimportable for one test, as on an install without the plots extra."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
