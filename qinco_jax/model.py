"""The QINCo model (v1 and QINCo2) as a Flax (linen) module: its parameter tree, the nearest-codeword
scans and the beam-search encoder. The configuration is qinco_jax.config, the steps qinco_jax.steps.

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

import flax.linen as nn
import jax
import jax.numpy as jnp

from qinco_jax.config import QincoConfig
from qinco_jax.steps import Qinco2Step, QincoStep, candidate_deltas


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


def init_params(cfg: QincoConfig, key: jax.Array) -> dict:
    """Random parameters: codebooks N(0, 1), linear layers as torch.nn.Linear's default init (QINCo2: its own).

    Qinco(cfg).init runs through encode for plain QINCo (as always), through decode for IVF (creating
    the same parameters without running the nearest-centroid scan eagerly).
    """
    if cfg.nlist:
        variables = Qinco(cfg).init(key, jnp.zeros((1, cfg.num_codes), jnp.int32), method=Qinco.decode_all)
    else:
        variables = Qinco(cfg).init(key, jnp.zeros((1, cfg.d)), method=Qinco.encode)
    return variables["params"]
