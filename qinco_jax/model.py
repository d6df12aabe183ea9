"""QINCo architectures (v1 and QINCo2): configuration and pure Flax (linen) modules.

Parameter tree (Flax Dense layout, kernels are (in, out)):

    codebook0                         (K, d)          plain QINCo; (nlist, d) frozen IVF centroids
    step_{m}/codebook                 (K, d)          m = 1 .. M-1 (plain), 1 .. M (IVF)
  QINCo v1 (variant "qinco1"):
    step_{m}/concat/{kernel,bias}     (2d, d), (d,)   plain QINCo
    step_{m}/concat_in/kernel         (2d, h)         QINCo-LR (no bias)
    step_{m}/concat_out/kernel        (h, d)          QINCo-LR (no bias)
    step_{m}/block_{l}/up/kernel      (d, h)          l = 0 .. L-1
    step_{m}/block_{l}/down/kernel    (h, d)
  QINCo2 (variant "qinco2", embedding width de, hidden width dh = h):
    step_{m}/presel_codebook          (K, d)          only when A > 0
    step_{m}/in_proj/kernel           (d, de)         only when de != d
    step_{m}/concat/{kernel,bias}     (de + d, de), (de,)
    step_{m}/block_{l}/up/kernel      (de, h)
    step_{m}/block_{l}/down/kernel    (h, de)
    step_{m}/out_proj/kernel          (de, d)         only when de != d

The concatenation order is [codeword (projected for QINCo2), partial reconstruction], as in the
originals. Code column m is produced by step_{m} (column 0 by codebook0) in every variant.
Encoding is one beam search with optional candidate pre-selection (QINCo2 spec 2.1);
greedy QINCo v1 encoding is its case A = 0 (all K candidates), B = 1.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

VARIANTS = ("qinco1", "qinco2")


@dataclasses.dataclass(frozen=True)
class QincoConfig:
    """Architecture of a QINCo codec.

    Args:
      d: vector dimension.
      K: codebook size per step (256 gives one byte per step).
      M: number of quantization steps (codes per vector).
      L: residual blocks per step network.
      h: hidden width of the residual blocks (QINCo2's dh; also the rank of QINCo-LR's concat block).
      lowrank: QINCo-LR: the concat Linear 2d->d becomes 2d->h->d without bias (qinco1 only).
      variant: "qinco1" (the ICML 2024 step) or "qinco2" (embedding width de, outer skip).
      de: QINCo2 embedding width (None: d, with identity projections).
      A: default pre-selected candidates per beam; A > 0 gives each step a pre-selection codebook
        (0: no pre-selection, all K candidates are evaluated).
      B: default beam width (1: greedy).
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
    variant: str = "qinco1"
    de: int | None = None
    A: int = 0
    B: int = 1
    nlist: int = 0

    def __post_init__(self):
        for name, low in (("d", 1), ("K", 2), ("M", 1), ("L", 0), ("h", 1), ("A", 0), ("B", 1), ("nlist", 0)):
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
        if self.variant not in VARIANTS:
            raise ValueError(f"QincoConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.de is not None:
            if isinstance(self.de, bool) or not isinstance(self.de, int) or self.de < 1:
                raise ValueError(f"QincoConfig.de must be a positive int or None, got {self.de!r}")
            if self.variant == "qinco1" and self.de != self.d:
                raise ValueError(f"QincoConfig.de = {self.de}: QINCo v1 steps work in width d = {self.d}")
        if self.A > self.K:
            raise ValueError(f"QincoConfig.A = {self.A} pre-selected candidates is more than the K = {self.K} codes")
        if self.A and self.variant != "qinco2":
            raise ValueError(f"QincoConfig.A = {self.A}: pre-selection codebooks are a QINCo2 feature (variant='qinco2')")
        if self.variant == "qinco2" and self.lowrank:
            raise ValueError("QincoConfig.lowrank (QINCo-LR) is a QINCo v1 variant, not available with qinco2")

    @property
    def num_codes(self) -> int:
        """Columns of a full code matrix: M, plus the list id for IVF."""
        return self.M + 1 if self.nlist else self.M

    @property
    def num_steps(self) -> int:
        """Neural steps after step 0 (step_1 .. step_{num_steps})."""
        return self.num_codes - 1

    @property
    def emb(self) -> int:
        """Width of the step networks (de for QINCo2, d for v1)."""
        return self.de or self.d

    @property
    def dh(self) -> int:
        """Hidden width of the residual blocks (QINCo2's name for h)."""
        return self.h

    @property
    def preselect(self) -> bool:
        """Whether the steps carry a pre-selection codebook."""
        return self.A > 0

    @property
    def code_dtype(self):
        """Smallest unsigned integer type that holds every code (the IVF list ids included)."""
        import numpy as np

        top = max(self.K, self.nlist)
        return np.uint8 if top <= 256 else np.uint16 if top <= 65536 else np.uint32

    def step_params(self) -> int:
        """Trainable parameters of one networked step's network (codebooks excluded)."""
        d, e, h = self.d, self.emb, self.h
        if self.variant == "qinco2":
            return (e + d) * e + e + 2 * self.L * e * h + (2 * d * e if e != d else 0)
        concat = 2 * d * h + h * d if self.lowrank else 2 * d * d + d
        return concat + 2 * self.L * d * h

    def num_params(self) -> int:
        """Number of trainable parameters (same count as the original's; IVF centroids are frozen
        and not counted: the parameter tree holds nlist * d more)."""
        books = self.K * self.d * (2 if self.preselect else 1)
        first = 0 if self.nlist else self.K * self.d
        return first + self.num_steps * (books + self.step_params())

    def encode_flops_per_vector(self, A: int | None = None, B: int | None = None) -> int:
        """Multiply-adds x2 of encoding with the split concat algebra (the dominant terms).

        A, B: the search (default the config's); per-step work independent of the vectors is left out.
        """
        A = self.A if A is None else A
        B = self.B if B is None else B
        d, e, K, h = self.d, self.emb, self.K, self.h
        out_proj = 2 * e * d if e != d else 0
        # per candidate: the residual blocks (the first block's input projection is split per
        # codeword / per beam), the out-projection and the distance
        per_cand = 2 * e * h * max(0, 2 * self.L - 1) + (h if self.L else 0) + 3 * d + out_proj
        per_beam = 2 * (2 * d * h if self.lowrank else d * e) + (2 * e * h if self.L else 0)
        per_beam += 3 * K * d if A else 0  # pre-selection distances
        first = 2 * self.nlist * d if self.nlist else 3 * K * d
        return first + self.num_steps * B * ((A or K) * per_cand + per_beam)

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


def kaiming_uniform(fan_in: int):
    """Kaiming-uniform with ReLU gain, fan_in mode (QINCo2): U(-sqrt(6/fan_in), sqrt(6/fan_in))."""
    bound = math.sqrt(6.0 / fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _initializer(kind: str, fan_in: int):
    if kind == "torch":
        return torch_uniform(fan_in)
    if kind == "kaiming":
        return kaiming_uniform(fan_in)
    return nn.initializers.zeros


class Linear(nn.Module):
    """y = x @ kernel (+ bias); init "torch" (nn.Linear's default), "kaiming" or "zeros" (bias: 0
    unless torch)."""

    features: int
    fan_in: int
    use_bias: bool = True
    init: str = "torch"

    def setup(self):
        self.kernel = self.param("kernel", _initializer(self.init, self.fan_in), (self.fan_in, self.features))
        if self.use_bias:
            bias_init = "torch" if self.init == "torch" else "zeros"
            self.bias = self.param("bias", _initializer(bias_init, self.fan_in), (self.features,))

    def __call__(self, x):
        y = x @ self.kernel
        return y + self.bias if self.use_bias else y


class ResBlock(nn.Module):
    """z + W2 relu(W1 z), no biases. QINCo2 initialises W1 Kaiming-uniform and W2 to zero."""

    d: int
    h: int
    qinco2: bool = False

    def setup(self):
        self.up = Linear(self.h, self.d, use_bias=False, init="kaiming" if self.qinco2 else "torch")
        self.down = Linear(self.d, self.h, use_bias=False, init="zeros" if self.qinco2 else "torch")

    def __call__(self, z):
        return z + self.down(nn.relu(self.up(z)))


class QincoStep(nn.Module):
    """One QINCo v1 step: f(c, xhat) = mlp(c + concat([c, xhat])).

    The concat block is linear in [c, xhat], so it splits into a per-codeword part
    (computed once for the K codewords) and a per-vector part (once per vector).
    Interface shared with Qinco2Step: codeword_part, vector_part, blocks, finish.
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

    def finish(self, z, c):
        """The step's output from the residual blocks' output z (no outer skip in v1)."""
        return z

    def decode(self, xhat_BD, codes_B):
        """Next reconstruction xhat + f(C[codes], xhat)."""
        return xhat_BD + step_delta(self, xhat_BD, codes_B)


class Qinco2Step(nn.Module):
    """One QINCo2 step (spec 1.1): z = P_in c; z += W_cat [z; xhat] + b; L residual blocks;
    f(c, xhat) = c + P_out z. Projections are the identity when de == d.

    Initialisation (spec 1.2): W_cat, b and every block's down-projection are zero; up-projections
    and P_in / P_out Kaiming-uniform (fan_in, ReLU gain). Hence f = c + P_out P_in c at init.
    """

    d: int
    K: int
    L: int
    h: int
    de: int
    preselect: bool

    def setup(self):
        d, e = self.d, self.de
        self.codebook = self.param("codebook", nn.initializers.normal(1.0), (self.K, d))
        if self.preselect:
            self.presel_codebook = self.param("presel_codebook", nn.initializers.normal(1.0), (self.K, d))
        if e != d:
            self.in_proj = Linear(e, d, use_bias=False, init="kaiming")
            self.out_proj = Linear(d, e, use_bias=False, init="kaiming")
        self.concat = Linear(e, e + d, use_bias=True, init="zeros")
        self.blocks = [ResBlock(e, self.h, qinco2=True, name=f"block_{l}") for l in range(self.L)]

    def codeword_part(self):
        """(K, de): z0 + the codeword half of the concat block (bias included), z0 = P_in c."""
        z0 = self.codebook if self.de == self.d else self.in_proj(self.codebook)
        return z0 + z0 @ self.concat.kernel[: self.de] + self.concat.bias

    def vector_part(self, xhat):
        """(..., de): the partial-reconstruction half of the concat block (xhat is not projected)."""
        return xhat @ self.concat.kernel[self.de :]

    def finish(self, z, c):
        """Outer skip: c + P_out z."""
        return c + (z if self.de == self.d else self.out_proj(z))

    def decode(self, xhat_BD, codes_B):
        """Next reconstruction xhat + f(C[codes], xhat)."""
        return xhat_BD + step_delta(self, xhat_BD, codes_B)


def step_delta(step, xhat_BD, codes_B):
    """f(C[codes], xhat) of one step, for one code per vector."""
    z = step.codeword_part()[codes_B] + step.vector_part(xhat_BD)
    for block in step.blocks:
        z = block(z)
    return step.finish(z, step.codebook[codes_B])


def candidate_deltas(step, xhat_NFD, ids_NFA):
    """f(C[k], xhat_b) for candidate codes k of every beam b: (N, F, A, d).

    ids_NFA: the candidate codes per beam, or None for all K codes (then A = K, no gather).
    The first block's input projection is linear too: the codeword parts and the beam parts are
    projected separately instead of all N*F*A sums (saves 1/(2L) of the FLOPs).
    """
    cw_Ke, vec_NFe = step.codeword_part(), step.vector_part(xhat_NFD)

    def per_cand(table):  # (K, ...) -> broadcastable (1, 1, K, ...) or gathered (N, F, A, ...)
        return table[None, None] if ids_NFA is None else table[ids_NFA]

    z = per_cand(cw_Ke) + vec_NFe[:, :, None, :]
    blocks = step.blocks
    if blocks:
        up = blocks[0].up.kernel
        u = per_cand(cw_Ke @ up) + (vec_NFe @ up)[:, :, None, :]
        z = z + blocks[0].down(nn.relu(u))
    for block in blocks[1:]:
        z = block(z)
    return step.finish(z, per_cand(step.codebook))


def sq_dists(x_ND, c_KD):
    """Squared L2 distances (N, K), by direct differences (exact, no cancellation)."""
    return jnp.sum(jnp.square(x_ND[:, None, :] - c_KD[None, :, :]), axis=-1)


def nearest(x_BD, c_KD):
    """Exact nearest row of c for each row of x (direct squared differences, first index on ties)."""
    return jnp.argmin(sq_dists(x_BD, c_KD), axis=-1).astype(jnp.int32)


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


def smallest(dist_NC, k: int):
    """Indices (N, k) of the k smallest entries per row, ascending (first index on ties for k = 1)."""
    if k == 1:
        return jnp.argmin(dist_NC, axis=-1).astype(jnp.int32)[:, None]
    return jax.lax.top_k(-dist_NC, k)[1].astype(jnp.int32)


def preselect(r_NFD, book_KD, A: int):
    """The A codes per beam whose pre-selection codeword is nearest to the residual: (N, F, A).

    Only ranks (the network scores the survivors), so the expanded form |r|^2 - 2 r.c + |c|^2 is used.
    """
    dist = jnp.sum(jnp.square(book_KD), axis=-1) - 2.0 * (r_NFD @ book_KD.T)  # |r|^2 is constant per beam
    return jax.lax.top_k(-dist, A)[1].astype(jnp.int32)


def _take(a_NF, idx_NG):
    """a[n, idx[n, g]] for arrays of any trailing shape."""
    idx = idx_NG.reshape(idx_NG.shape + (1,) * (a_NF.ndim - 2))
    return jnp.take_along_axis(a_NF, idx, axis=1)


class Qinco(nn.Module):
    """QINCo (v1 or QINCo2): a plain first codebook followed by M-1 neural steps; with cfg.nlist,
    IVF-QINCo: a frozen table of nlist centroids followed by M neural steps. Works on normalised data."""

    cfg: QincoConfig

    def setup(self):
        cfg = self.cfg
        self.codebook0 = self.param("codebook0", nn.initializers.normal(1.0), (cfg.nlist or cfg.K, cfg.d))
        if cfg.variant == "qinco2":
            self.steps = [
                Qinco2Step(cfg.d, cfg.K, cfg.L, cfg.h, cfg.emb, cfg.preselect, name=f"step_{m}")
                for m in range(1, cfg.num_codes)
            ]
        else:
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

    def encode(self, x_ND, code0_N=None, A: int | None = None, B: int | None = None):
        """Beam search with candidate pre-selection (QINCo2 spec 2.1); A = 0, B = 1 is greedy QINCo.

        code0_N: column 0 if already known (the IVF assignment). A: candidates pre-selected per beam
        with the cheap codebook (0: all K); B: beam width. IVF keeps one beam after the list id, and
        its first step pre-selects max(A, B) candidates (spec 2.1).
        Returns (codes (N, num_codes) int32, reconstruction (N, d)).
        """
        cfg = self.cfg
        A = cfg.A if A is None else A
        B = cfg.B if B is None else B
        N = x_ND.shape[0]
        if cfg.nlist or code0_N is not None:
            codes_NFm = (self.assign(x_ND) if code0_N is None else code0_N)[:, None, None]
        else:
            F = 1 if cfg.num_codes == 1 else min(B, cfg.K)
            codes_NFm = smallest(sq_dists(x_ND, self.codebook0), F)[:, :, None]
        xhat_NFD = self.table0()[codes_NFm[:, :, 0]]
        for m, step in enumerate(self.steps, start=1):
            r_NFD = x_ND[:, None, :] - xhat_NFD
            n_pre = min(max(A, B), cfg.K) if A and m == 1 and cfg.nlist else A
            ids_NFA = preselect(r_NFD, step.presel_codebook, n_pre) if A else None
            delta_NFAD = candidate_deltas(step, xhat_NFD, ids_NFA)
            n = delta_NFAD.shape[2]
            F_in = xhat_NFD.shape[1]
            dist_NC = jnp.sum(jnp.square(r_NFD[:, :, None, :] - delta_NFAD), axis=-1).reshape(N, F_in * n)
            F = 1 if m == cfg.num_codes - 1 else min(B, F_in * n)
            sel_NF = smallest(dist_NC, F)
            parent_NF = sel_NF // n
            code_NF = sel_NF % n if ids_NFA is None else _take(ids_NFA.reshape(N, F_in * n), sel_NF)
            delta_NFD = _take(delta_NFAD.reshape(N, F_in * n, cfg.d), sel_NF)
            xhat_NFD = _take(xhat_NFD, parent_NF) + delta_NFD
            codes_NFm = jnp.concatenate([_take(codes_NFm, parent_NF), code_NF[:, :, None]], axis=2)
        return codes_NFm[:, 0, :], xhat_NFD[:, 0, :]

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

    def decode_all(self, codes_BM):
        """decode(), touching the pre-selection books too: initialises every parameter without
        running an encoder (the IVF assignment scan)."""
        extra = sum(jnp.sum(step.presel_codebook[:1]) * 0 for step in self.steps) if self.cfg.preselect else 0
        return self.decode(codes_BM) + extra

    def presel_books(self):
        """The pre-selection codebooks of steps 1 .. M-1 (a list of (K, d))."""
        return [step.presel_codebook for step in self.steps]
