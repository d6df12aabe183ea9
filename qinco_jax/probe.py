"""Loaded weights that are finite but extreme: a codec whose decode of its own codewords overflows float32.

A checkpoint can hold only finite numbers and still be useless: codebook entries of 3e38, IVF centroids of
1e38 or a data scale of 3e38 make decode return inf or NaN for every code. `refuse_overflow` decodes a small
probe (every codeword k in every step at once, and a few seeded random codes) right after a load, and
refuses the codec with a CheckpointError naming the tensor: the normalisation (scale / shift), the IVF
centroids, or the first step whose prefix decode overflows.
"""

from __future__ import annotations

import numpy as np

from qinco_jax.checks import CheckpointError
from qinco_jax.codec import Codec
from qinco_jax.runtime import decode

F32 = np.finfo(np.float32)
F32_TINY, F32_BIG = float(F32.tiny), float(F32.max) / 64
PROBE_RANDOM = 32


def _probe_codes(cfg, seed: int = 0) -> np.ndarray:
    K, M, nlist = cfg.K, cfg.M, int(getattr(cfg, "nlist", 0) or 0)
    rng = np.random.default_rng(seed)
    steps = np.concatenate([np.repeat(np.arange(K)[:, None], M, 1), rng.integers(0, K, (PROBE_RANDOM, M))])
    if nlist:
        lists = np.concatenate([np.arange(K) % nlist, rng.integers(0, nlist, PROBE_RANDOM)])
        if nlist > K:
            extra = np.arange(K, nlist)
            lists = np.concatenate([lists, extra])
            steps = np.concatenate([steps, rng.integers(0, K, (extra.size, M))])
        steps = np.concatenate([lists[:, None], steps], 1)
    return steps


def refuse_overflow(codec, where: str) -> None:
    """CheckpointError (naming `where` and the tensor) when the codec's decode of its own codewords is not
    finite in float32; also for a scale outside float32's range. PQ codecs are probed per sub-codec."""

    if not isinstance(codec, Codec):
        for i, sub in enumerate(getattr(codec, "codecs", ())):
            refuse_overflow(sub, f"{where} (sub-codec {i})")
        return
    scale = float(codec.scale)
    if not F32_TINY < scale < F32_BIG:
        raise CheckpointError(f"{where}: the data scale (scale / db_scale / data_std) is {scale:.3g}, outside the "
                              f"range float32 can use ({F32_TINY:.3g} .. {F32_BIG:.3g})")
    cfg = codec.config
    codes = _probe_codes(cfg)
    unit = Codec(cfg, codec.params, 1.0)  # the model's own (normalised) domain
    with np.errstate(over="ignore", invalid="ignore"):
        xs = decode(unit, codes)
        raw = xs * np.float32(scale) + (0 if codec.shift is None else codec.shift)
    if np.isfinite(raw).all() and np.abs(raw).max() < F32_BIG:
        return
    if np.isfinite(xs).all() and np.abs(xs).max() < F32_BIG:
        raise CheckpointError(f"{where}: decoded vectors overflow float32 once scaled back (scale {scale:.3g}, "
                              f"largest decoded value {np.abs(xs).max():.3g} in the model's units): the data "
                              "scale / shift is extreme")
    names = list(codec.params)
    for m in range(1, codes.shape[1] + 1):
        with np.errstate(over="ignore", invalid="ignore"):
            part = decode(unit, codes[:, :m])
        if not (np.isfinite(part).all() and np.abs(part).max() < F32_BIG):
            name = names[min(m, len(names)) - 1]
            path, big = _largest(codec.params[name], name)
            what = "the IVF centroids" if cfg.nlist and m == 1 else f"step {m - bool(cfg.nlist)}"
            raise CheckpointError(f"{where}: decoding the codec's own codewords overflows float32 at code column "
                                  f"{m} ({what}: tensor {path}, largest entry {big:.3g}); the weights are finite "
                                  "but extreme")
    raise CheckpointError(f"{where}: decoding the codec's own codewords overflows float32")


def _largest(tree, prefix: str) -> tuple[str, float]:
    """(path, value) of the parameter leaf with the largest absolute entry."""
    if isinstance(tree, dict):
        return max((_largest(v, f"{prefix}/{k}") for k, v in tree.items()), key=lambda pv: pv[1],
                   default=(prefix, 0.0))
    a = np.abs(np.asarray(tree, np.float64))
    return prefix, float(a.max()) if a.size else 0.0
