"""The QINCo re-rank, jitted: decode the shortlisted codes on JAX's default device (an accelerator when there is
one) and keep the k nearest by exact L2, without bringing the decoded vectors back to the host. Also what it
costs: the FLOP count of the decode per candidate (from XLA's cost analysis)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qinco_jax import runtime
from qinco_jax.model import Qinco


def _precision() -> str:
    return runtime.MATMUL_PRECISION


@functools.lru_cache(maxsize=64)
def _decode_fn(cfg, precision: str):
    """(params, codes (B, n, ncol) int32, scale, shift (d,)) -> (B, n, d) raw-unit reconstructions."""
    model = Qinco(cfg)

    def run(params, codes, scale, shift):
        with jax.default_matmul_precision(precision):
            flat = codes.reshape(-1, codes.shape[-1])
            x = model.apply({"params": params}, flat, method=Qinco.decode)
        return (x * scale + shift).reshape(codes.shape[:-1] + (x.shape[-1],))

    return jax.jit(run)


@functools.lru_cache(maxsize=64)
def _rank_fn(k: int):
    """(queries (B, d), candidates (B, n, d), ids (B, n); -1 invalid) -> the k nearest (D, I) per query."""

    def run(xq, x, ids):
        d = jnp.sum(jnp.square(x - xq[:, None, :]), axis=-1)
        d = jnp.where(ids < 0, jnp.inf, d)
        neg, i = jax.lax.top_k(-d, k)
        return -neg, jnp.where(jnp.isfinite(neg), jnp.take_along_axis(ids, i, 1), -1)

    return jax.jit(run)


class Reranker:
    """The codec's parameters on the device and the jitted decode and rank."""

    def __init__(self, codec, device=None):
        self.codec, self.cfg = codec, codec.config
        put = functools.partial(jax.device_put, device=device or jax.devices()[0])
        self.params = put(codec.params)
        self.scale = put(np.float32(codec.scale))
        shift = getattr(codec, "shift", None)
        self.shift = put(np.zeros(self.cfg.d, np.float32) if shift is None else np.asarray(shift, np.float32))
        self.put = put

    def decode(self, codes):
        """(B, n, d) reconstructions of (B, n, ncol) codes (device or host), not waited for."""
        return _decode_fn(self.cfg, _precision())(self.params, codes, self.scale, self.shift)

    def rank(self, xq, xhat, ids, k: int):
        """The min(k, n) nearest of the decoded candidates per query: (D, I) device arrays."""
        return _rank_fn(min(k, ids.shape[1]))(xq, xhat, ids)

    def flops_per_candidate(self, n: int = 4096) -> float | None:
        """The decode's FLOPs per candidate, from XLA's cost analysis of the compiled decode (None when the
        backend does not report it)."""
        codes = jax.ShapeDtypeStruct((1, n, self.cfg.num_codes), jnp.int32)
        compiled = _decode_fn(self.cfg, _precision()).lower(self.params, codes, self.scale, self.shift).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = (cost or {}).get("flops")
        return None if flops is None else float(flops) / n
