"""The codec record: architecture, parameters (normalised domain) and normalisation, checked on creation.

Encoding and decoding are qinco_jax.api (any codec) and qinco_jax.runtime (the jit / pmap streaming of a
Codec); initialisation from training data is qinco_jax.initialise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from qinco_jax.config import QincoConfig
from qinco_jax.model import init_params


@dataclasses.dataclass(frozen=True, eq=False)
class Norm:
    """How raw vectors map to the model's domain: x_model = (x - shift) / scale.

    QINCo v1: shift None (0) and scale the data scale (db_scale); QINCo2: shift the per-dimension
    mean and scale one scalar std (spec 3.4).
    """

    shift: np.ndarray | None
    scale: float

    def __post_init__(self):
        s = float(self.scale)
        if not np.isfinite(s) or s <= 0:
            raise ValueError(f"scale must be a positive finite number, got {self.scale!r}")
        object.__setattr__(self, "scale", s)
        if self.shift is not None:
            shift = np.asarray(self.shift, np.float32)
            if shift.ndim != 1 or not np.isfinite(shift).all():
                raise ValueError(f"shift must be a finite vector, got shape {shift.shape}")
            object.__setattr__(self, "shift", shift)


@dataclasses.dataclass(frozen=True, eq=False)
class Codec:
    """A trained QINCo codec: architecture, parameters (normalised domain) and the normalisation.

    Inputs are mapped to (x - shift) / scale before the model sees them; reconstructions back.
    `norm` may be given as a number: the scale of a QINCo v1 codec (no shift).
    """

    config: QincoConfig
    params: Any
    norm: Norm

    def __post_init__(self):
        if not isinstance(self.config, QincoConfig):
            raise TypeError(f"config must be a QincoConfig, got {type(self.config).__name__}")
        norm = self.norm if isinstance(self.norm, Norm) else Norm(None, self.norm)
        if norm.shift is not None and norm.shift.shape != (self.config.d,):
            raise ValueError(f"shift has shape {norm.shift.shape}, expected ({self.config.d},)")
        object.__setattr__(self, "norm", norm)
        check_params(self.config, self.params)

    def __repr__(self) -> str:
        """One line: the architecture and the scale, not the parameter arrays."""
        c = self.config
        lr = ", lowrank" if c.lowrank else ""
        ivf = f", nlist={c.nlist}" if c.nlist else ""
        v2 = f", qinco2 de={c.emb} A={c.A} B={c.B}" if c.variant == "qinco2" else ""
        return (f"Codec(d={c.d}, K={c.K}, M={c.M}, L={c.L}, h={c.h}{lr}{ivf}{v2}, scale={self.scale:.6g}, "
                f"{c.num_params():,} parameters)")

    @property
    def scale(self) -> float:
        return self.norm.scale

    @property
    def shift(self) -> np.ndarray | None:
        return self.norm.shift

    @property
    def ivf_centroids(self) -> np.ndarray | None:
        """(nlist, d) float32 IVF centroids in raw units; None for a plain QINCo codec."""
        if not self.config.nlist:
            return None
        c = np.asarray(self.params["codebook0"], np.float32) * np.float32(self.scale)
        return c if self.shift is None else c + self.shift


def param_shapes(cfg: QincoConfig) -> dict:
    """The expected parameter tree as shapes (no computation)."""
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return jax.tree.map(lambda a: tuple(a.shape), params)


def check_params(cfg: QincoConfig, params) -> None:
    """Raise a ValueError naming the first parameter whose presence or shape is wrong."""
    want = param_shapes(cfg)
    got_leaves = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    want_leaves = dict(jax.tree_util.tree_flatten_with_path(want, is_leaf=lambda x: isinstance(x, tuple))[0])
    name = lambda p: "/".join(str(getattr(k, "key", k)) for k in p)  # noqa: E731
    got = {name(p): v for p, v in got_leaves.items()}
    for p, shape in want_leaves.items():
        n = name(p)
        if n not in got:
            raise ValueError(f"parameter {n} is missing for {cfg}")
        if tuple(np.shape(got[n])) != shape:
            raise ValueError(f"parameter {n} has shape {tuple(np.shape(got[n]))}, expected {shape} for {cfg}")
    extra = set(got) - {name(p) for p in want_leaves}
    if extra:
        raise ValueError(f"unexpected parameters for {cfg}: {sorted(extra)[:5]}")
