"""numpy-in / numpy-out faiss helpers: RQ codebooks for initialisation, export to faiss's C++ QINCo."""

from __future__ import annotations

import math

import numpy as np


def _f32(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def nbits(K: int) -> int:
    b = int(round(math.log2(K)))
    if 1 << b != K:
        raise ValueError(f"faiss quantizers need K to be a power of two, got K={K}")
    return b


def train_rq(xt: np.ndarray, M: int, K: int, beam_size: int = 1):
    """Train a faiss ResidualQuantizer (M x log2 K bits, given beam) on xt. Returns the trained faiss object."""
    import faiss

    xt = _f32(xt)
    rq = faiss.ResidualQuantizer(xt.shape[1], M, nbits(K))
    rq.max_beam_size = int(beam_size)
    rq.train(xt)
    return rq


def kmeans(xt: np.ndarray, k: int, seed: int, niter: int = 10) -> np.ndarray:
    """(k, d) faiss k-means centroids of xt (the original's IVF recipe: 10 iterations), seeded."""
    import faiss

    xt = _f32(xt)
    km = faiss.Kmeans(xt.shape[1], int(k), niter=niter, seed=int(seed), verbose=False)
    km.train(xt)
    return km.centroids.copy()


def greedy_rq_codebooks(x: np.ndarray, M: int, K: int, *, inplace: bool = False, chunk: int = 65536) -> np.ndarray:
    """(M, K, d) codebooks of faiss's greedy (beam 1) ResidualQuantizer(d, M, log2 K), trained level by
    level in bounded memory.

    Each level runs the same progressive-dim k-means that faiss's ResidualQuantizer runs (its default
    parameters, so the same seed and the same internal subsample of 256 K points) on all current
    residuals, then subtracts each vector's nearest codeword chunk by chunk. The codebooks are those of
    `train_rq(x, M, K, 1)` exactly, but only the residuals (x itself with inplace=True) are held, where
    faiss's own training holds several n x d arrays at once.
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    r = x if inplace else x.copy()
    n, d = r.shape
    level_rq = faiss.ResidualQuantizer(d, 1, nbits(K))  # kept alive: its cp holds faiss's k-means defaults
    params = level_rq.cp
    books = np.empty((M, K, d), np.float32)
    for m in range(M):
        clus = faiss.ProgressiveDimClustering(d, K, params)
        clus.train(n, faiss.swig_ptr(r), faiss.ProgressiveDimIndexFactory())
        books[m] = faiss.vector_to_array(clus.centroids).reshape(K, d)
        for i in range(0, n, chunk):
            _, idx = faiss.knn(r[i : i + chunk], books[m], 1)
            r[i : i + chunk] -= books[m][idx[:, 0]]
    return books


def rq_codebooks(rq) -> np.ndarray:
    """(M, K, d) codebooks of a trained additive quantizer."""
    import faiss

    K = 1 << rq.nbits.at(0)
    return faiss.vector_to_array(rq.codebooks).reshape(rq.M, K, rq.d).copy()


def to_faiss(codec):
    """A faiss.QINCo carrying the codec's weights (scaled domain: feed it x / codec.scale).

    Only plain QINCo exists in faiss (not QINCo-LR).
    """
    import faiss

    cfg = codec.config
    if cfg.lowrank:
        raise ValueError("faiss.QINCo has no low-rank (QINCo-LR) variant")
    if cfg.nlist:
        raise ValueError("to_faiss exports plain QINCo only, not IVF-QINCo")
    if cfg.variant != "qinco1" or codec.shift is not None:
        raise ValueError("faiss.QINCo is QINCo v1 only (no QINCo2 steps, no mean shift)")
    p = {k: v for k, v in codec.params.items()}
    q = faiss.QINCo(cfg.d, cfg.K, cfg.L, cfg.M, cfg.h)
    q.codebook0.from_array(_f32(p["codebook0"]))
    for m in range(1, cfg.M):
        sp, step = p[f"step_{m}"], q.get_step(m - 1)
        step.codebook.from_array(_f32(p[f"step_{m}"]["codebook"]))
        step.MLPconcat.from_array(_f32(np.asarray(sp["concat"]["kernel"]).T), _f32(sp["concat"]["bias"]))
        for l in range(cfg.L):
            block, bp = step.get_residual_block(l), sp[f"block_{l}"]
            block.linear1.from_array(_f32(np.asarray(bp["up"]["kernel"]).T))
            block.linear2.from_array(_f32(np.asarray(bp["down"]["kernel"]).T))
    return q


def faiss_encode(q, x_scaled: np.ndarray) -> np.ndarray:
    """Greedy codes from a faiss.QINCo (int32)."""
    import faiss

    return q.encode(faiss.Tensor2D(_f32(x_scaled))).numpy()


def faiss_decode(q, codes: np.ndarray) -> np.ndarray:
    """Scaled-domain reconstruction from a faiss.QINCo."""
    import faiss

    return q.decode(faiss.Int32Tensor2D(np.ascontiguousarray(codes, dtype=np.int32))).numpy()


def knn(xq: np.ndarray, xb, k: int, block: int = 131072) -> tuple[np.ndarray, np.ndarray]:
    """Exact L2 k-NN of xq in xb, reading xb (a memmap is fine) in blocks of rows; (D, I) as faiss.knn."""
    search = BlockedKnn(xq, k)
    for i0 in range(0, xb.shape[0], block):
        search.add(i0, xb[i0 : i0 + block])
    return search.result()


class BlockedKnn:
    """Exact L2 k-NN of queries over a database that arrives block by block (only the heap is kept)."""

    def __init__(self, xq: np.ndarray, k: int):
        import faiss

        self.xq, self.k = _f32(xq), int(k)
        self.heap = faiss.ResultHeap(self.xq.shape[0], self.k)

    def add(self, start: int, xblk) -> None:
        """Database rows start .. start + len(xblk) - 1."""
        import faiss

        xblk = _f32(xblk)
        D, I = faiss.knn(self.xq, xblk, min(self.k, xblk.shape[0]))
        self.heap.add_result(D, I + start)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self.heap.finalize()
        return self.heap.D, self.heap.I
