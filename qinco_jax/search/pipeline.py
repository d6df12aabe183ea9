"""The search pipeline: the coarse search (faiss), the additive shortlist (the jitted scan with one look-up
table per query, or faiss's IVF additive scanner), an optional pairwise stage that narrows it, and the QINCo
decode and exact L2 re-rank of the survivors (jitted, on JAX's default device).

Queries run in batches: the scan, decode and re-rank of a batch are dispatched without waiting (JAX runs them
asynchronously), so the coarse search and the shortlist of batch b + 1 overlap the decode of batch b; the
results of batch b are fetched once batch b + 1 is dispatched."""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from qinco_jax import checks
from qinco_jax.checks import QincoInputError
from qinco_jax.search.common import nlist_of, require_flat, require_ivf
from qinco_jax.search.index import decode_listnos, unpack_codes
from qinco_jax.search.rerank import Reranker
from qinco_jax.search.scan import LONG, QB, Scanner, ScanLists, build_lists

# decoded candidates held at once by the re-rank (vectors); bounds memory whatever nq x nshort
RERANK_BUDGET = 131072
SCANS = ("jax", "faiss")
MAX_BATCH = 8 * QB  # queries per batch by default: small batches give the stages more to overlap
# candidates per decode call at least: the scan's sub-batches are joined up to this (on 2 CPU cores a call of 320
# candidates ran at 30-40% of the matmul rate, one of 3,200 at 70-80%)
MIN_DECODE = 8192


def _groups(parts: list, min_cands: int) -> list[list]:
    """Consecutive scan sub-batches, joined so that each group holds at least min_cands candidates (the last
    group may hold fewer); every sub-batch has the same shape."""
    if not parts:
        return []
    per = max(1, parts[0][2][1].shape[0] * parts[0][2][1].shape[1])
    g = max(1, -(-min_cands // per))
    return [parts[i:i + g] for i in range(0, len(parts), g)]


def _joined(group: list):
    """(query rows, ids, codes) of a group of sub-batches, concatenated along the queries."""
    if len(group) == 1:
        rows, _, (_, ids, codes) = group[0]
        return rows, ids, codes
    rows = np.concatenate([rows for rows, _, _ in group])
    ids = jnp.concatenate([jnp.asarray(ids) for _, _, (_, ids, _) in group])
    codes = jnp.concatenate([jnp.asarray(codes) for _, _, (_, _, codes) in group])
    return rows, ids, codes


def _split(ranked: list, sizes: list[int], qb: int) -> list:
    """Per sub-batch (D, I) from the per-group results (each sub-batch holds qb query rows)."""
    out = []
    for (D, I), size in zip(ranked, sizes):
        if size == 1:
            out.append((D, I))
        else:
            out.extend((D[j * qb:(j + 1) * qb], I[j * qb:(j + 1) * qb]) for j in range(size))
    return out


@dataclasses.dataclass
class Pipeline:
    """What a search needs: the codec (for the re-rank), the faiss index over its codes and the tables.

    For a flat codec the shortlist's codes are read from `db_codes` (the (n, M) code matrix, e.g. a memmap);
    for an IVF codec they come back from faiss with the shortlist. `lists` are the CSR lists of the jitted
    scan (derived from db_codes and the tables when not given). `coarse` (e.g. an HNSW index over the same
    centroids, in the same order) replaces the index's own coarse quantizer in the jitted scan's coarse search.
    """

    codec: object
    index: object
    tables: np.ndarray
    db_codes: np.ndarray | None = None
    pairwise: object | None = None
    lists: ScanLists | None = None
    coarse: object | None = None  # a faiss index over the IVF centroids for the jitted scan's coarse search

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
        if self.lists is not None and (self.lists.nlist != max(self.nlist, 1) or self.lists.K != K
                                       or self.lists.codes.shape[1] != M
                                       or self.lists.codes.shape[0] != self.index.ntotal):
            raise QincoInputError(f"the scan lists ({self.lists.nlist} lists, {self.lists.codes.shape} codes of "
                                  f"K={self.lists.K}) do not match the index ({max(self.nlist, 1)} lists, "
                                  f"{self.index.ntotal} vectors, M={M}, K={K})")
        self._scanner = self._reranker = None

    @property
    def scanner(self) -> Scanner:
        """The jitted scan over the lists (built on first use; the lists derived from db_codes if not given)."""
        if self._scanner is None:
            if self.lists is None:
                if self.db_codes is None:
                    raise QincoInputError("the jitted scan needs the database codes (db_codes) or scan lists")
                cent = np.asarray(self.codec.ivf_centroids, np.float32) if self.ivf else None
                self.lists = build_lists(self.db_codes, self.tables, cent)
            self._scanner = Scanner(self.lists, self.tables, self.ivf)
        return self._scanner

    @property
    def reranker(self) -> Reranker:
        if self._reranker is None:
            self._reranker = Reranker(self.codec)
        return self._reranker

    def with_coarse(self, coarse) -> "Pipeline":
        """The same pipeline with another coarse quantizer over the IVF centroids (e.g. HNSW), sharing the
        device copies of the scan lists and the codec."""
        other = dataclasses.replace(self, coarse=coarse)
        other._scanner, other._reranker = self.scanner, self.reranker
        return other


@dataclasses.dataclass
class SearchResult:
    """Top-k after the re-rank (D, I), the additive shortlist before it (I_short, in shortlist order) and the
    seconds spent in each stage (coarse, shortlist, pairwise, decode, rerank; None for the stages not timed
    apart: without `staged`, only the coarse search and the pairwise stage, which run on the host) and in all
    (total)."""

    D: np.ndarray
    I: np.ndarray
    I_short: np.ndarray
    times: dict


def _check_queries(p: Pipeline, xq) -> np.ndarray:
    xq = checks.vectors(xq, p.codec.config.d, "queries")
    checks.finite_chunk(np.asarray(xq), 0, "queries")
    return np.ascontiguousarray(xq, np.float32)


def _shortlist(p: Pipeline, xq: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(additive distances (b, n), ids (b, n), full codes (b, n, num_codes) int32) of faiss's additive
    shortlist; invalid entries id -1."""
    M, K, _ = p.tables.shape
    nbits = int(round(math.log2(K)))
    if p.ivf:
        D, I, raw = p.index.search_and_return_codes(xq, n, include_listnos=True)
        cc = p.index.coarse_code_size()
        lists = decode_listnos(raw[..., :cc]) % p.nlist  # -1 results carry garbage list bytes
        steps = unpack_codes(raw[..., cc:], M, nbits)
        codes = np.concatenate([lists[..., None].astype(np.int32), steps], axis=-1)
    else:
        D, I = p.index.search(xq, n)
        rows = np.where(I >= 0, I, 0)
        uniq, inv = np.unique(rows.ravel(), return_inverse=True)
        codes = np.asarray(p.db_codes[uniq], np.int32)[inv].reshape(I.shape + (-1,))
    codes[I < 0] = 0
    return D, I, codes


def _l2(xq: np.ndarray, x_BND: np.ndarray) -> np.ndarray:
    diff = x_BND - xq[:, None, :]
    return np.einsum("bnd,bnd->bn", diff, diff)



def _coarse(p: Pipeline, xq: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """(list ids, per-list scalar) (nq, nprobe): the coarse search's ||q - c||^2 (IVF), ||q||^2 in one list
    (flat)."""
    if p.ivf:
        D, I = (p.index.quantizer if p.coarse is None else p.coarse).search(xq, nprobe)
        return I, D
    return np.zeros((xq.shape[0], 1), np.int64), np.einsum("nd,nd->n", xq, xq)[:, None]


def _faiss_parts(p: Pipeline, xq: np.ndarray, n: int) -> list:
    """faiss's shortlist as the scan's sub-batches [(rows, n, (dist, ids, codes))] (host arrays)."""
    D, I, codes = _shortlist(p, xq, n)
    out = []
    for s in range(0, xq.shape[0], QB):
        sel = np.arange(s, min(s + QB, xq.shape[0]))
        rows = np.concatenate([sel, np.repeat(sel[-1:], QB - len(sel))])
        out.append((rows, len(sel), (D[rows], I[rows], codes[rows])))
    return out


def _narrow(p: Pipeline, q: np.ndarray, ids, codes, nshort: int):
    """The pairwise stage: (distances, ids, codes) of the nshort of the shortlist nearest by the pairwise
    decoder (host)."""
    ids, codes = np.asarray(ids), np.asarray(codes)
    xp = p.pairwise.decode(codes.reshape(-1, codes.shape[-1])).reshape(codes.shape[:2] + (-1,))
    d = np.where(ids < 0, np.inf, _l2(q, xp))
    order = np.argsort(d, axis=1, kind="stable")[:, :nshort]
    return (np.take_along_axis(d, order, 1), np.take_along_axis(ids, order, 1),
            np.take_along_axis(codes, order[..., None], 1))


def search(p: Pipeline, xq, *, k: int = 100, nshort: int = 100, nprobe: int = 1, pairwise_factor: int = 1,
           ef_search: int | None = None, batch_size: int | None = None, scan: str = "jax",
           staged: bool = False, rerank: bool = True) -> SearchResult:
    """Search the queries: coarse search, additive shortlist of nshort, optional pairwise stage, QINCo re-rank,
    top k.

    Args:
      p: the pipeline.
      xq: (nq, d) queries in raw units.
      k: results per query after the re-rank.
      nshort: candidates that QINCo decodes and re-ranks per query.
      nprobe: inverted lists visited (IVF: 1 .. nlist; flat: ignored, but must be >= 1).
      pairwise_factor: with a pairwise decoder, the additive stage returns pairwise_factor * nshort candidates,
        which the pairwise decoder narrows to nshort (1: no pairwise stage).
      ef_search: efSearch of an HNSW coarse quantizer (the index's or p.coarse).
      batch_size: queries per batch (default: at most 512, and as many as keep nshort * batch decoded vectors
        within RERANK_BUDGET).
      scan: "jax", the jitted scan with one look-up table per query (scan.py), or "faiss", faiss's own scanner
        (IVF: a look-up table per probed list).
      staged: wait for each stage before the next, so that each is timed apart (no overlap; slower).
      rerank: False for the shortlist alone (D, I are its first k, by additive distance).
    """
    xq = _check_queries(p, xq)
    k, nshort = checks.batch_size(k, "k"), checks.batch_size(nshort, "nshort")
    nprobe = checks.batch_size(nprobe, "nprobe")
    pairwise_factor = checks.batch_size(pairwise_factor, "pairwise_factor")
    if scan not in SCANS:
        raise QincoInputError(f"unknown scan {scan!r}; choose from {', '.join(SCANS)}")
    if pairwise_factor > 1 and p.pairwise is None:
        raise QincoInputError("pairwise_factor > 1 needs a pipeline with a pairwise decoder")
    if p.ivf:
        import faiss

        if nprobe > p.nlist:
            raise QincoInputError(f"nprobe={nprobe} is larger than the index's number of lists nlist={p.nlist}")
        p.index.nprobe = nprobe
        for q in (p.index.quantizer, p.coarse):
            q = None if q is None else faiss.downcast_index(q)
            if ef_search is not None and hasattr(q, "hnsw"):
                q.hnsw.efSearch = int(ef_search)
    nfirst = nshort * pairwise_factor
    bs = batch_size or max(1, min(MAX_BATCH, RERANK_BUDGET // nfirst))
    bs = checks.batch_size(bs, "batch_size")
    rr = p.reranker
    scanner = p.scanner if scan == "jax" else None
    nq = xq.shape[0]
    D_out = np.full((nq, k), np.inf, np.float32)
    I_out = np.full((nq, k), -1, np.int64)
    I_short = np.full((nq, nshort), -1, np.int64)
    times = dict(coarse=0.0, shortlist=0.0, pairwise=0.0, decode=0.0, rerank=0.0)
    wait = jax.block_until_ready if staged else (lambda a: a)
    pending: list = []

    def collect(b0, parts):
        for rows, n, ids_s, (D, I) in parts:
            r = b0 + rows[:n]
            I_short[r, :ids_s.shape[1]] = np.asarray(ids_s)[:n, :nshort]
            D, I = np.asarray(D)[:n, :k], np.asarray(I)[:n, :k]
            D_out[r, :D.shape[1]], I_out[r, :I.shape[1]] = D, I

    # one sub-batch size for the whole search (from the expected codes per query), so that the scan, the decode
    # and the rank compile for one shape family, whatever each batch's mix of lists
    if scanner is not None:
        lists = scanner.lists
        qb = QB if min(nprobe, lists.nlist) * lists.ids.shape[0] / lists.nlist <= LONG else QB // 2
    t_all = time.perf_counter()
    for b0 in range(0, nq, bs):
        q = xq[b0:b0 + bs]
        t0 = time.perf_counter()
        if scanner is not None:
            Iq, Dq = _coarse(p, q, nprobe)
            t1 = time.perf_counter()
            times["coarse"] += t1 - t0
            parts = wait(scanner.scan(q, Iq, Dq, nfirst, qb))
        else:
            t1 = t0
            parts = _faiss_parts(p, q, nfirst)
        t2 = time.perf_counter()
        times["shortlist"] += t2 - t1
        if pairwise_factor > 1:
            parts = [(rows, n, _narrow(p, q[rows], ids, codes, nshort))
                     for rows, n, (_, ids, codes) in parts]
            times["pairwise"] += time.perf_counter() - t2
        t3 = time.perf_counter()
        if rerank:
            groups = _groups(parts, MIN_DECODE)  # the decode runs on at least MIN_DECODE candidates a call
            joined = [_joined(g) for g in groups]
            xhat = wait([rr.decode(codes) for _, _, codes in joined])
            t4 = time.perf_counter()
            ranked = wait([rr.rank(q[rows], x, ids, k) for (rows, ids, _), x in zip(joined, xhat)])
            ranked = _split(ranked, [len(g) for g in groups], len(parts[0][0]) if parts else 0)
        else:
            t4 = t3
            ranked = [(d, ids) for _, _, (d, ids, _) in parts]
        times["decode"] += t4 - t3
        times["rerank"] += time.perf_counter() - t4
        done = [(rows, n, ids, r) for (rows, n, (_, ids, _)), r in zip(parts, ranked)]
        if pending:  # batch b is fetched once batch b + 1 is on its way
            collect(*pending.pop())
        pending.append((b0, done))
    if pending:
        collect(*pending.pop())
    times["total"] = time.perf_counter() - t_all
    if not staged:
        times.update(shortlist=None if scanner is not None else times["shortlist"], decode=None, rerank=None)
        if pairwise_factor == 1:
            times["pairwise"] = None
    return SearchResult(D_out, I_out, I_short, times)
