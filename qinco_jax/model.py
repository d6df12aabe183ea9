"""QINCo v1 architecture: configuration and pure Flax (linen) modules.

Parameter tree (Flax Dense layout, kernels are (in, out)):

    codebook0                         (K, d)          plain QINCo; (nlist, d) frozen IVF centroids
    step_{m}/codebook                 (K, d)          m = 1 .. M-1 (plain), 1 .. M (IVF)
    step_{m}/concat/{kernel,bias}     (2d, d), (d,)   plain QINCo
    step_{m}/concat_in/kernel         (2d, h)         QINCo-LR (no bias)
    step_{m}/concat_out/kernel        (h, d)          QINCo-LR (no bias)
    step_{m}/block_{l}/up/kernel      (d, h)          l = 0 .. L-1
    step_{m}/block_{l}/down/kernel    (h, d)

The concatenation order is [codeword, partial reconstruction], as in the original.
Code column m is produced by step_{m} (column 0 by codebook0) in both variants.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class QincoConfig:
    """Architecture of a QINCo codec.

    Args:
      d: vector dimension.
      K: codebook size per step (256 gives one byte per step).
      M: number of quantization steps (codes per vector).
      L: residual blocks per step network.
      h: hidden width of the residual blocks (and the rank of QINCo-LR's concat block).
      lowrank: QINCo-LR: the concat Linear 2d->d becomes 2d->h->d without bias.
      nlist: 0 for plain QINCo. > 0 for IVF-QINCo (the original's IVFQINCo): step 0 is a frozen table
        of nlist centroids (code column 0 is the list id) followed by M full QINCo steps, so codes have
        M + 1 columns.
    """

    d: int
    K: int = 256
    M: int = 8
    L: int = 2
    h: int = 256
    lowrank: bool = False
    nlist: int = 0

    def __post_init__(self):
        for name, low in (("d", 1), ("K", 2), ("M", 1), ("L", 0), ("h", 1), ("nlist", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"QincoConfig.{name} must be an int, got {value!r}")
            if value < low:
                raise ValueError(f"QincoConfig.{name} must be >= {low}, got {value}")
        if self.K > 65536:
            raise ValueError(f"QincoConfig.K must be <= 65536 (codes are stored as uint16), got {self.K}")
        if not isinstance(self.lowrank, bool):
            raise TypeError(f"QincoConfig.lowrank must be a bool, got {self.lowrank!r}")
        if self.nlist >= 1 << 31:
            raise ValueError(f"QincoConfig.nlist must be < 2**31 (list ids are int32), got {self.nlist}")

    @property
    def num_codes(self) -> int:
        """Columns of a full code matrix: M, plus the list id for IVF."""
        return self.M + 1 if self.nlist else self.M

    @property
    def num_steps(self) -> int:
        """Neural steps after step 0 (step_1 .. step_{num_steps})."""
        return self.num_codes - 1

    @property
    def code_dtype(self):
        """Smallest unsigned integer type that holds every code (the IVF list ids included)."""
        import numpy as np

        top = max(self.K, self.nlist)
        return np.uint8 if top <= 256 else np.uint16 if top <= 65536 else np.uint32

    def num_params(self) -> int:
        """Number of trainable parameters (same count as the original's; IVF centroids are frozen
        and not counted: the parameter tree holds nlist * d more)."""
        d, K, h = self.d, self.K, self.h
        concat = 2 * d * h + h * d if self.lowrank else 2 * d * d + d
        first = 0 if self.nlist else K * d
        return first + self.num_steps * (K * d + concat + 2 * self.L * d * h)

    def encode_flops_per_vector(self) -> int:
        """Multiply-adds x2 of greedy encoding with the split concat algebra (the dominant terms)."""
        d, K, h = self.d, self.K, self.h
        # residual blocks (the first block's input projection is split per codeword / per vector)
        per_cand = 2 * d * h * max(0, 2 * self.L - 1) + (h if self.L else 0) + 3 * d
        per_vec = 2 * (2 * d * h if self.lowrank else d * d) + (2 * d * h if self.L else 0)
        first = 2 * self.nlist * d if self.nlist else 3 * K * d
        return first + self.num_steps * (K * per_cand + per_vec)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QincoConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown QincoConfig fields: {sorted(unknown)}")
        return cls(**d)


def torch_uniform(fan_in: int):
    """PyTorch's default nn.Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Linear(nn.Module):
    """y = x @ kernel (+ bias), initialised like torch.nn.Linear."""

    features: int
    fan_in: int
    use_bias: bool = True

    def setup(self):
        self.kernel = self.param("kernel", torch_uniform(self.fan_in), (self.fan_in, self.features))
        if self.use_bias:
            self.bias = self.param("bias", torch_uniform(self.fan_in), (self.features,))

    def __call__(self, x):
        y = x @ self.kernel
        return y + self.bias if self.use_bias else y


class ResBlock(nn.Module):
    """z + W2 relu(W1 z), no biases."""

    d: int
    h: int

    def setup(self):
        self.up = Linear(self.h, self.d, use_bias=False)
        self.down = Linear(self.d, self.h, use_bias=False)

    def __call__(self, z):
        return z + self.down(nn.relu(self.up(z)))


class QincoStep(nn.Module):
    """One QINCo step: f(c, xhat) = mlp(c + concat([c, xhat])).

    The concat block is linear in [c, xhat], so it splits into a per-codeword part
    (computed once for the K codewords) and a per-vector part (once per vector).
    """

    d: int
    K: int
    L: int
    h: int
    lowrank: bool = False

    def setup(self):
        d, h = self.d, self.h
        self.codebook = self.param("codebook", nn.initializers.normal(1.0), (self.K, d))
        if self.lowrank:
            self.concat_in = Linear(h, 2 * d, use_bias=False)
            self.concat_out = Linear(d, h, use_bias=False)
        else:
            self.concat = Linear(d, 2 * d, use_bias=True)
        self.blocks = [ResBlock(d, h, name=f"block_{l}") for l in range(self.L)]

    def codeword_part(self):
        """(K, d): c + the codeword half of the concat block (bias included)."""
        c, d = self.codebook, self.d
        if self.lowrank:
            return c + (c @ self.concat_in.kernel[:d]) @ self.concat_out.kernel
        return c + c @ self.concat.kernel[:d] + self.concat.bias

    def vector_part(self, xhat):
        """(..., d): the partial-reconstruction half of the concat block."""
        d = self.d
        if self.lowrank:
            return (xhat @ self.concat_in.kernel[d:]) @ self.concat_out.kernel
        return xhat @ self.concat.kernel[d:]

    def mlp(self, z):
        for block in self.blocks:
            z = block(z)
        return z

    def decode(self, xhat_BD, codes_B):
        """Next reconstruction xhat + f(C[codes], xhat)."""
        z = self.codeword_part()[codes_B] + self.vector_part(xhat_BD)
        return xhat_BD + self.mlp(z)

    def encode(self, xhat_BD, x_BD):
        """Greedy step: the candidate nearest to x (squared L2, first index on ties)."""
        cw_KD, vec_BD = self.codeword_part(), self.vector_part(xhat_BD)
        z_BKD = cw_KD[None, :, :] + vec_BD[:, None, :]
        blocks = self.blocks
        if blocks:
            # The first block's input projection is linear too: project the K codeword parts and
            # the B vector parts separately instead of all B*K sums (saves 1/(2L) of the FLOPs).
            up = blocks[0].up.kernel
            u_BKH = (cw_KD @ up)[None, :, :] + (vec_BD @ up)[:, None, :]
            z_BKD = z_BKD + blocks[0].down(nn.relu(u_BKH))
        for block in blocks[1:]:
            z_BKD = block(z_BKD)
        r_BD = x_BD - xhat_BD
        dist_BK = jnp.sum(jnp.square(r_BD[:, None, :] - z_BKD), axis=-1)
        codes_B = jnp.argmin(dist_BK, axis=-1).astype(jnp.int32)
        z_BD = jnp.take_along_axis(z_BKD, codes_B[:, None, None], axis=1)[:, 0]
        return codes_B, xhat_BD + z_BD


def nearest(x_BD, c_KD):
    """Exact nearest row of c for each row of x (direct squared differences, first index on ties)."""
    dist = jnp.sum(jnp.square(x_BD[:, None, :] - c_KD[None, :, :]), axis=-1)
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


CENTROID_BLOCK = 1024  # centroids compared per scan step: memory is (B, block), whatever nlist
RECHECK = 4  # per block, candidates whose distance is recomputed exactly


def nearest_blocked(x_BD, c_ND, block: int = CENTROID_BLOCK, recheck: int = RECHECK):
    """Nearest row of a large table c (IVF centroids) for each row of x, first index on ties.

    The table is scanned in blocks of `block` rows, so memory is O(B * block) whatever N. In each
    block the `recheck` best rows by the expanded formula ||c||^2 - 2<x, c> (one matmul, as faiss and
    the original rank centroids) have their distance recomputed as a direct sum of squared
    differences, and those exact distances decide. The expanded formula alone loses the small
    distance of a near neighbour to cancellation against ||x||^2 and ||c||^2, so two close centroids
    can swap; the recheck makes the result that of `nearest` (direct differences) unless more than
    `recheck` rows of one block beat the true nearest under the rounding of the expanded formula.
    """
    n = c_ND.shape[0]
    block = min(block, n)
    k = min(recheck, block)
    # Block starts; the last block is shifted back to end at n (it re-reads a few rows, which cannot
    # change the result), so nothing is padded or copied whatever n is.
    starts = jnp.minimum(jnp.arange(-(-n // block), dtype=jnp.int32) * block, n - block)

    def scan_block(best, start):
        best_d, best_i = best
        c_bD = jax.lax.dynamic_slice_in_dim(c_ND, start, block)
        approx_Bb = jnp.sum(jnp.square(c_bD), axis=-1)[None, :] - 2.0 * (x_BD @ c_bD.T)
        _, cand_Bk = jax.lax.top_k(-approx_Bb, k)
        exact_Bk = jnp.sum(jnp.square(x_BD[:, None, :] - c_bD[cand_Bk]), axis=-1)
        idx_Bk = cand_Bk.astype(jnp.int32) + start
        blk_d = jnp.min(exact_Bk, axis=-1)
        blk_i = jnp.min(jnp.where(exact_Bk == blk_d[:, None], idx_Bk, jnp.iinfo(jnp.int32).max), axis=-1)
        better = (blk_d < best_d) | ((blk_d == best_d) & (blk_i < best_i))  # ties: the smaller index
        return (jnp.where(better, blk_d, best_d), jnp.where(better, blk_i, best_i)), None

    B = x_BD.shape[0]
    init = (jnp.full((B,), jnp.inf, x_BD.dtype), jnp.full((B,), jnp.iinfo(jnp.int32).max, jnp.int32))
    (_, best_i), _ = jax.lax.scan(scan_block, init, starts)
    return best_i


class Qinco(nn.Module):
    """QINCo v1: a plain first codebook followed by M-1 neural steps; with cfg.nlist, IVF-QINCo: a
    frozen table of nlist centroids followed by M neural steps. Works on scaled data."""

    cfg: QincoConfig

    def setup(self):
        cfg = self.cfg
        self.codebook0 = self.param("codebook0", nn.initializers.normal(1.0), (cfg.nlist or cfg.K, cfg.d))
        self.steps = [
            QincoStep(cfg.d, cfg.K, cfg.L, cfg.h, cfg.lowrank, name=f"step_{m}") for m in range(1, cfg.num_codes)
        ]

    def table0(self):
        """codebook0; the IVF centroids are frozen, so no gradient reaches them (the original's loss_0)."""
        return jax.lax.stop_gradient(self.codebook0) if self.cfg.nlist else self.codebook0

    def assign(self, x_BD):
        """Code column 0: the nearest row of codebook0 (IVF: blocked over the nlist centroids)."""
        if self.cfg.nlist:
            return nearest_blocked(x_BD, self.table0())
        return nearest(x_BD, self.codebook0)

    def encode(self, x_BD, code0_B=None):
        """Greedy encoding. Returns (codes (B, num_codes) int32, reconstruction (B, d)).

        code0_B: column 0 if already known (the IVF assignment), else computed by `assign`.
        """
        code = self.assign(x_BD) if code0_B is None else code0_B
        xhat = self.table0()[code]
        codes = [code]
        for step in self.steps:
            code, xhat = step.encode(xhat, x_BD)
            codes.append(code)
        return jnp.stack(codes, axis=1), xhat

    def decode_prefixes(self, codes_BM):
        """Reconstructions after 1 .. m steps, m = codes.shape[1] (a list of (B, d))."""
        xhat = self.table0()[codes_BM[:, 0]]
        out = [xhat]
        for i in range(1, codes_BM.shape[1]):
            xhat = self.steps[i - 1].decode(xhat, codes_BM[:, i])
            out.append(xhat)
        return out

    def decode(self, codes_BM):
        """Reconstruction from the first m = codes.shape[1] <= num_codes codes."""
        return self.decode_prefixes(codes_BM)[-1]
