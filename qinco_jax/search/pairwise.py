"""The pairwise additive decoder (spec v2 §5.2): tables indexed by the joint code of pairs of codes, fitted
greedily with shrunk cell means, optionally on top of the additive tables; IVF sub-codes join the code pool."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from qinco_jax import checks
from qinco_jax.checks import QincoInputError
from qinco_jax.progress import Progress
from qinco_jax.files import MAX_NPZ_BYTES, read_npz
from qinco_jax.search.common import ivf_centroids, split_codes
from qinco_jax.search.tables import additive_decode, sum_rows_by_label, targets

SHRINKS = (0.5, 2.0, 8.0, 32.0)
_MEMBERS = {"pairs": ("<i8", 2), "sizes": ("<i8", 1), "tables": ("<f4", 2), "offsets": ("<i8", 1),
            "centroids": ("<f4", 2), "ivf_subcodes": ("<i8", 2), "base": ("<f4", 3)}
MAX_PAIRS, MAX_POOL = 4096, 1024


@dataclasses.dataclass
class PairwiseDecoder:
    """A pairwise additive decoder (spec v2 §5.2): x~ = c[list] + sum_j T_j[pool[a_j] * size[b_j] + pool[b_j]].

    The code pool of a vector is its M step codes followed by `ivf_subcodes[list]` (sub-codes of its IVF
    centroid from a small residual quantizer; none for flat codecs). Each table T_j is indexed by the joint
    code of one pair (a_j, b_j) of pool positions.
    """

    pairs: np.ndarray  # (P, 2) pool positions
    sizes: np.ndarray  # (pool,) code range of each pool position
    tables: np.ndarray  # (sum_j size[a_j] * size[b_j], d) float32, table j at rows offsets[j]:offsets[j+1]
    offsets: np.ndarray  # (P + 1,)
    centroids: np.ndarray | None = None  # (nlist, d) raw units
    ivf_subcodes: np.ndarray | None = None  # (nlist, S)
    base: np.ndarray | None = None  # (M, K, d) additive tables the pairs refine (None: pairs alone)

    def pool(self, codes: np.ndarray) -> np.ndarray:
        """(n, pool) code pool of (n, M) flat codes or (n, 1 + M) IVF codes."""
        codes = np.asarray(codes, np.int64)
        if self.centroids is None:
            return codes
        return np.concatenate([codes[:, 1:], self.ivf_subcodes[codes[:, 0]]], axis=1)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(n, d) float32 pairwise reconstructions of (n, num_codes) codes, raw units."""
        pool = self.pool(codes)
        out = (np.zeros((pool.shape[0], self.tables.shape[1]), np.float32) if self.centroids is None
               else self.centroids[np.asarray(codes)[:, 0]].astype(np.float32))
        if self.base is not None:
            out += additive_decode(self.base, pool[:, : self.base.shape[0]])
        for j, (a, b) in enumerate(self.pairs):
            out += self.tables[self.offsets[j] + pool[:, a] * self.sizes[b] + pool[:, b]]
        return out

    def save(self, path) -> None:
        arrays = dict(pairs=self.pairs, sizes=self.sizes, tables=self.tables, offsets=self.offsets)
        if self.centroids is not None:
            arrays.update(centroids=self.centroids, ivf_subcodes=self.ivf_subcodes)
        if self.base is not None:
            arrays.update(base=self.base)
        with open(os.fspath(path) + ".tmp", "wb") as f:
            np.savez(f, **arrays)
        os.replace(os.fspath(path) + ".tmp", os.fspath(path))

    @classmethod
    def load(cls, path, codec=None, *, max_bytes: int = MAX_NPZ_BYTES) -> "PairwiseDecoder":
        """A decoder saved by `save`, checked: the archive's entries, dtypes and shapes from its headers before
        anything is inflated (within max_bytes), then every offset, pair and sub-code range, and (given the
        codec) M, K, d and the IVF centroids. A QincoInputError names the file and the problem otherwise."""
        what = "pairwise decoder"
        a = read_npz(path, what, _MEMBERS, ("pairs", "sizes", "tables", "offsets"), max_bytes=max_bytes,
                     check_shapes=lambda shapes: _check_shapes(shapes, codec, f"{what}: {os.fspath(path)}"))
        pw = cls(**a)
        problem = pw._problem(codec)
        if problem:
            raise QincoInputError(f"{what}: {os.fspath(path)}: {problem}; rebuild it with `eval/search.py build "
                                  "--pairwise N`")
        return pw

    def _problem(self, codec) -> str | None:
        """What makes this decoder unusable (for the codec, if given), or None."""
        P, pool, (rows, d) = self.pairs.shape[0], self.sizes.shape[0], self.tables.shape
        if P < 1 or self.pairs.shape[1] != 2 or self.offsets.shape != (P + 1,):
            return f"pairs {self.pairs.shape} and offsets {self.offsets.shape} do not match"
        if (self.centroids is None) != (self.ivf_subcodes is None):
            return "centroids and ivf_subcodes come together"
        M = pool - (0 if self.ivf_subcodes is None else self.ivf_subcodes.shape[1])
        if M < 1 or self.sizes.min() < 1 or self.sizes.max() > 1 << 16:
            return f"code ranges {self.sizes[:8].tolist()} out of [1, 65536] (pool of {pool})"
        if self.pairs.min() < 0 or self.pairs.max() >= pool or np.any(self.pairs[:, 0] == self.pairs[:, 1]):
            return f"pairs outside the code pool of {pool} positions"
        cells = self.sizes[self.pairs[:, 0]] * self.sizes[self.pairs[:, 1]]
        if self.offsets[0] != 0 or np.any(np.diff(self.offsets) != cells) or self.offsets[-1] != rows:
            return f"offsets {self.offsets[:8].tolist()} are not the running sum of the pairs' cells ({rows} rows)"
        if self.centroids is not None:
            nlist = self.centroids.shape[0]
            if self.ivf_subcodes.shape[0] != nlist or self.centroids.shape[1] != d:
                return f"centroids {self.centroids.shape} and sub-codes {self.ivf_subcodes.shape} do not match"
            if self.ivf_subcodes.size and (self.ivf_subcodes.min() < 0
                                           or np.any(self.ivf_subcodes >= self.sizes[M:])):
                return "IVF sub-codes outside their code ranges"
        if self.base is not None and self.base.shape[0] != M:
            return f"base tables {self.base.shape} for M={M}"
        for name in ("tables", "centroids", "base"):
            v = getattr(self, name)
            if v is not None and not np.isfinite(v).all():
                return f"{name} holds NaN or inf"
        if codec is not None:
            cfg = codec.config
            if (M, d) != (cfg.M, cfg.d) or np.any(self.sizes[:M] != cfg.K):
                return f"made for M={M}, d={d}, K={self.sizes[:M].tolist()}; the codec has M={cfg.M}, d={cfg.d}, K={cfg.K}"
            if self.base is not None and self.base.shape != (cfg.M, cfg.K, cfg.d):
                return f"base tables {self.base.shape} for a codec of (M, K, d) = {(cfg.M, cfg.K, cfg.d)}"
            cent = ivf_centroids(codec)
            if (cent is None) != (self.centroids is None) or (cent is not None and not np.array_equal(
                    cent, self.centroids)):
                return "its IVF centroids are not the codec's"
        return None


def _check_shapes(shapes: dict, codec, where: str) -> None:
    """Bounds on the shapes of a saved decoder, checked before its arrays are inflated."""
    P = shapes["pairs"][0]
    rows, d = shapes["tables"]
    pool = shapes["sizes"][0]
    cfg = getattr(codec, "config", None)
    cells = cfg.K * cfg.K if cfg is not None else 1 << 24
    problem = None
    if not 1 <= P <= MAX_PAIRS or shapes["pairs"][1] != 2 or shapes["offsets"] != (P + 1,):
        problem = f"pairs {shapes['pairs']} and offsets {shapes['offsets']}: expected (P, 2) and (P + 1,), P <= {MAX_PAIRS}"
    elif pool > MAX_POOL or rows > P * cells or (cfg is not None and d != cfg.d):
        problem = f"tables {shapes['tables']} for {P} pairs over a pool of {pool} codes"
    elif cfg is not None and shapes.get("base", (cfg.M, cfg.K, cfg.d)) != (cfg.M, cfg.K, cfg.d):
        problem = f"base tables {shapes['base']} for a codec of (M, K, d) = {(cfg.M, cfg.K, cfg.d)}"
    elif "centroids" in shapes and (shapes["centroids"][0] > 1 << 24 or shapes["centroids"][1] != d or
                                    shapes.get("ivf_subcodes", (0, 0))[0] != shapes["centroids"][0]):
        problem = f"centroids {shapes['centroids']} and sub-codes {shapes.get('ivf_subcodes')}"
    if problem:
        raise QincoInputError(f"{where}: {problem}")


def ivf_subcodes(centroids: np.ndarray, n_sub: int, K: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """(nlist, n_sub) sub-codes of the IVF centroids from n_sub stages of residual k-means (faiss), and the
    words per stage: K, or nlist // 4 when there are few centroids."""
    import faiss

    res = np.ascontiguousarray(centroids, np.float32).copy()
    ks = int(max(2, min(K, res.shape[0] // 4)))
    out = np.empty((res.shape[0], n_sub), np.int64)
    for s in range(n_sub):
        km = faiss.Kmeans(res.shape[1], ks, niter=20, seed=seed + s)
        km.train(res)
        out[:, s] = km.index.search(res, 1)[1][:, 0]
        res -= km.centroids[out[:, s]]
    return out, ks


def _heldout_gains(joint, target, ncells: int, n_val: int, shrinks) -> np.ndarray:
    """Drop of the squared error of rows [:n_val] when each row subtracts the shrunk mean sum / (count + s) of
    its cell, the cell sums and counts taken over rows [n_val:] (one gain per shrink s)."""
    sums, counts = sum_rows_by_label(joint[n_val:], target[n_val:], ncells, np.float32)
    S = sums[joint[:n_val]]
    u = np.einsum("nd,nd->n", target[:n_val], S, dtype=np.float64)
    v = np.einsum("nd,nd->n", S, S, dtype=np.float64)
    w = counts[joint[:n_val]].astype(np.float64)
    return np.array([(2 * u / (w + s) - v / np.square(w + s)).sum() for s in shrinks])


def train_pairwise(codes, x, K: int, n_tables: int, *, centroids=None, base=None, n_sub: int = 2,
                   n_val: int | None = None, shrinks=SHRINKS, progress: bool = False) -> PairwiseDecoder:
    """Greedy pairwise additive decoder fitted to training vectors (spec v2 §5.2, with shrunk cell means).

    A table for a pair (a, b) of pool positions holds, for each joint code, the shrunk mean
    sum / (count + s) of the current target over the training vectors with that joint code. Each round scores
    every pair and every shrink s on held-out rows: cell means from rows [n_val:], error drop measured on
    rows [:n_val] (n_val: half the rows by default), so that pairs whose K^2 cells only memorise the training
    set are not chosen. The best (pair, s) is fitted on all rows, its reconstruction subtracted from the target,
    and so on, n_tables times or until no pair lowers the held-out error (a pair may come back). The target
    is x (flat) or x - c[list], minus the additive reconstruction sum_m base[m, i_m] when base tables (M, K, d)
    are given: the pairs then refine the additive decoder. Holds the training set in memory (n x d float32).
    """
    x = checks.vectors(x, None, "training vectors")
    if centroids is not None:
        centroids = np.asarray(centroids, np.float32)
    steps, lists = split_codes(np.asarray(codes), K, centroids)
    target = targets(x, lists, centroids).astype(np.float32)
    if base is not None:
        base = np.asarray(base, np.float32)
        target -= additive_decode(base, steps)
    pool, sizes = steps.astype(np.int64), [K] * steps.shape[1]
    sub = None
    if centroids is not None and n_sub > 0:
        sub, ks = ivf_subcodes(centroids, n_sub, K)
        pool = np.concatenate([pool, sub[lists]], axis=1)
        sizes += [ks] * n_sub
    sizes = np.asarray(sizes, np.int64)
    cand = [(a, b) for a in range(pool.shape[1]) for b in range(a + 1, pool.shape[1])]
    n_val = target.shape[0] // 2 if n_val is None else int(n_val)
    if not 0 < n_val < target.shape[0] or min(shrinks) <= 0:
        raise QincoInputError(f"need 0 < n_val < n={target.shape[0]} and positive shrinks, got {n_val}, {shrinks}")
    pairs, tables = [], []
    with Progress(n_tables, desc="pairwise", enabled=progress) as bar:
        for _ in range(checks.batch_size(n_tables, "n_tables")):
            best = None
            for a, b in cand:
                joint = pool[:, a] * sizes[b] + pool[:, b]
                gains = _heldout_gains(joint, target, int(sizes[a] * sizes[b]), n_val, shrinks)
                g = int(np.argmax(gains))
                if best is None or gains[g] > best[0]:
                    best = (gains[g], a, b, shrinks[g])
            gain, a, b, shrink = best
            if gain <= 0:
                break
            joint = pool[:, a] * sizes[b] + pool[:, b]
            sums, counts = sum_rows_by_label(joint, target, int(sizes[a] * sizes[b]))
            table = (sums / (counts + shrink)[:, None]).astype(np.float32)
            target -= table[joint]
            pairs.append((a, b))
            tables.append(table)
            bar.update(1)
    if not tables:
        raise QincoInputError("no pair of codes lowers the held-out error: the pairwise decoder would be empty")
    offsets = np.concatenate([[0], np.cumsum([t.shape[0] for t in tables])]).astype(np.int64)
    return PairwiseDecoder(np.asarray(pairs, np.int64).reshape(-1, 2), sizes, np.concatenate(tables), offsets,
                           centroids, sub, base)
