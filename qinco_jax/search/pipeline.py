"""The search pipeline: the additive shortlist from the faiss index (with the candidates' codes), an optional
pairwise stage that narrows it, and the QINCo decode and exact L2 re-rank of the survivors."""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

import qinco_jax as qj
from qinco_jax import checks
from qinco_jax.checks import QincoInputError
from qinco_jax.search.common import nlist_of, require_flat, require_ivf
from qinco_jax.search.index import decode_listnos, unpack_codes

# decoded candidates held at once by the re-rank (vectors); bounds memory whatever nq x nshort
RERANK_BUDGET = 131072


@dataclasses.dataclass
class Pipeline:
    """What a search needs: the codec (for the re-rank), the faiss index over its codes and the tables.

    For a flat codec the shortlist's codes are read from `db_codes` (the (n, M) code matrix, e.g. a memmap);
    for an IVF codec they come back from faiss with the shortlist.
    """

    codec: object
    index: object
    tables: np.ndarray
    db_codes: np.ndarray | None = None
    pairwise: object | None = None

    @property
    def ivf(self) -> bool:
        return hasattr(self.index, "invlists")

    @property
    def nlist(self) -> int:
        return int(self.index.nlist) if self.ivf else 0

    def __post_init__(self):
        M, K, d = self.tables.shape
        cfg = self.codec.config
        if self.ivf:
            require_ivf(self.codec, "an IVF index")
            if self.nlist != nlist_of(self.codec):
                raise QincoInputError(f"the index has {self.nlist} lists, the codec {nlist_of(self.codec)}")
        else:
            require_flat(self.codec, "a flat (non-IVF) index")
            if self.db_codes is None:
                raise QincoInputError("a flat pipeline needs the database codes (db_codes)")
        if (M, K, d) != (cfg.M, cfg.K, cfg.d):
            raise QincoInputError(f"tables {self.tables.shape} do not match the codec (M={cfg.M}, K={cfg.K}, "
                                  f"d={cfg.d})")


@dataclasses.dataclass
class SearchResult:
    """Top-k after the re-rank (D, I), the additive shortlist before it (I_short, in shortlist order) and the
    seconds spent in each stage (shortlist, pairwise, decode, rerank, total)."""

    D: np.ndarray
    I: np.ndarray
    I_short: np.ndarray
    times: dict


def _check_queries(p: Pipeline, xq) -> np.ndarray:
    xq = checks.vectors(xq, p.codec.config.d, "queries")
    checks.finite_chunk(np.asarray(xq), 0, "queries")
    return np.ascontiguousarray(xq, np.float32)


def _shortlist(p: Pipeline, xq: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids (b, n), full codes (b, n, num_codes) int32) of the additive shortlist; invalid entries id -1."""
    M, K, _ = p.tables.shape
    nbits = int(round(math.log2(K)))
    if p.ivf:
        _, I, raw = p.index.search_and_return_codes(xq, n, include_listnos=True)
        cc = p.index.coarse_code_size()
        lists = decode_listnos(raw[..., :cc]) % p.nlist  # -1 results carry garbage list bytes
        steps = unpack_codes(raw[..., cc:], M, nbits)
        codes = np.concatenate([lists[..., None].astype(np.int32), steps], axis=-1)
    else:
        _, I = p.index.search(xq, n)
        rows = np.where(I >= 0, I, 0)
        uniq, inv = np.unique(rows.ravel(), return_inverse=True)
        codes = np.asarray(p.db_codes[uniq], np.int32)[inv].reshape(I.shape + (-1,))
    codes[I < 0] = 0
    return I, codes


def _l2(xq: np.ndarray, x_BND: np.ndarray) -> np.ndarray:
    diff = x_BND - xq[:, None, :]
    return np.einsum("bnd,bnd->bn", diff, diff)


def _top(D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by D (invalid ids last), keep k columns (padding with -1 / inf)."""
    D = np.where(I < 0, np.inf, D)
    order = np.argsort(D, axis=1, kind="stable")[:, :k]
    D, I = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
    if I.shape[1] < k:
        pad = k - I.shape[1]
        D = np.pad(D, ((0, 0), (0, pad)), constant_values=np.inf)
        I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)
    return D, I


def search(p: Pipeline, xq, *, k: int = 100, nshort: int = 100, nprobe: int = 1, pairwise_factor: int = 1,
           ef_search: int | None = None, batch_size: int | None = None) -> SearchResult:
    """Search the queries: additive shortlist of nshort, optional pairwise stage, QINCo re-rank, top k.

    Args:
      p: the pipeline.
      xq: (nq, d) queries in raw units.
      k: results per query after the re-rank.
      nshort: candidates that QINCo decodes and re-ranks per query.
      nprobe: inverted lists visited (IVF only; at most nlist).
      pairwise_factor: with a pairwise decoder, the additive stage returns pairwise_factor * nshort candidates,
        which the pairwise decoder narrows to nshort (1: no pairwise stage).
      ef_search: efSearch of an HNSW coarse quantizer.
      batch_size: queries per batch (default: as many as keep nshort * batch decoded vectors within
        RERANK_BUDGET).
    """
    import faiss

    xq = _check_queries(p, xq)
    k, nshort = checks.batch_size(k, "k"), checks.batch_size(nshort, "nshort")
    pairwise_factor = checks.batch_size(pairwise_factor, "pairwise_factor")
    if pairwise_factor > 1 and p.pairwise is None:
        raise QincoInputError("pairwise_factor > 1 needs a pipeline with a pairwise decoder")
    if p.ivf:
        nprobe = checks.batch_size(nprobe, "nprobe")
        if nprobe > p.nlist:
            raise QincoInputError(f"nprobe={nprobe} is larger than the index's number of lists nlist={p.nlist}")
        p.index.nprobe = nprobe
        q = faiss.downcast_index(p.index.quantizer)
        if ef_search is not None and hasattr(q, "hnsw"):
            q.hnsw.efSearch = int(ef_search)
    nfirst = nshort * pairwise_factor
    bs = batch_size or max(1, RERANK_BUDGET // nfirst)
    nq = xq.shape[0]
    D_out = np.empty((nq, k), np.float32)
    I_out = np.empty((nq, k), np.int64)
    I_short = np.empty((nq, nshort), np.int64)
    times = dict(shortlist=0.0, pairwise=0.0, decode=0.0, rerank=0.0)
    t_all = time.perf_counter()
    for b0 in range(0, nq, bs):
        q = xq[b0:b0 + bs]
        t0 = time.perf_counter()
        I, codes = _shortlist(p, q, nfirst)
        t1 = time.perf_counter()
        times["shortlist"] += t1 - t0
        if pairwise_factor > 1:
            xp = p.pairwise.decode(codes.reshape(-1, codes.shape[-1])).reshape(codes.shape[:2] + (-1,))
            dp = np.where(I < 0, np.inf, _l2(q, xp))
            order = np.argsort(dp, axis=1, kind="stable")[:, :nshort]
            I, codes = np.take_along_axis(I, order, 1), np.take_along_axis(codes, order[..., None], 1)
            times["pairwise"] += time.perf_counter() - t1
        I_short[b0:b0 + len(q)] = _top(np.zeros(I.shape), I, nshort)[1] if I.shape[1] < nshort else I[:, :nshort]
        t2 = time.perf_counter()
        flat = codes.reshape(-1, codes.shape[-1])
        xhat = qj.decode(p.codec, flat).reshape(codes.shape[:2] + (-1,))
        t3 = time.perf_counter()
        D, I = _top(_l2(q, xhat), I, k)
        D_out[b0:b0 + len(q)], I_out[b0:b0 + len(q)] = D, I
        times["decode"] += t3 - t2
        times["rerank"] += time.perf_counter() - t3
    times["total"] = time.perf_counter() - t_all
    return SearchResult(D_out, I_out, I_short, times)
