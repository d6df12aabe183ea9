"""The shortlist scan with one look-up table per query: inverted lists in CSR form and a jitted scan over them.

With x̂ = c + r̂, r̂ = Σ_m T_m[i_m]:  ||q − x̂||² = ||q − c||² + (||r̂||² + 2⟨c, r̂⟩) − 2 Σ_m ⟨q, T_m[i_m]⟩.
||q − c||² is the coarse search's distance (a per-list scalar), ||r̂||² + 2⟨c, r̂⟩ = ||x̂||² − ||c||² is stored per
vector (the "term"), and ⟨q, T_m[k]⟩ is one (M·K)-entry table per query: one matmul for a batch of queries,
whatever lists they probe (faiss's IVF additive scanner computes a table for each probed list instead). A flat
codec is one list with c = 0: ||q||² is the scalar and ||x̂||² the term.

The term is stored as float32, or as one byte per vector on a per-list uniform grid (lo, step).

Per query batch: the queries are sorted by the number of codes they scan and cut into sub-batches of QB; each
sub-batch is padded to a length from a fixed geometric ladder (`bucket`), so that jit compiles once per length.
Inside jit, the probed lists of a query are laid end to end in one candidate range: for candidate j, the probe p
it falls in (a running sum of marks at the probes' starts) gives its row in the CSR codes; the M look-ups,
the term and the per-list scalar give its distance, and lax.top_k the nshort nearest with their ids and full
codes (list id first for IVF). The step codes are read packed, four uint8 (two uint16) codes to a uint32 word:
one gather per word instead of one per code (30% less time per code on CPU). Everything runs on JAX's default
device (an accelerator when there is one).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from qinco_jax.checks import QincoInputError
from qinco_jax.files import open_regular, read_npz
from qinco_jax.search.codes import steps_dtype
from qinco_jax.search.common import split_codes
from qinco_jax.search.faiss_file import sha256_file
from qinco_jax.search.tables import additive_decode

SCAN_LISTS = "scan_lists.npz"
SCAN_FORMAT = 1
TERMS = ("float32", "uint8")
QB = 64  # queries per jitted sub-batch; half as many when they scan more than LONG codes each (measured faster:
LONG = 1024  # eval/bench_scan.py, README)
MAX_K = 65536
# on a CPU the sub-batches are dispatched from this many threads, alternately, each waiting for its sub-batch
# before the next, so that the scans run side by side on the cores (XLA runs one scan on about one core):
# 10-35% less time on 2 cores at nprobe 1 to 64 than one thread dispatching them all
STREAMS = 2


def bucket(n: int, lo: int = 128) -> int:
    """The padded candidate length for n candidates: a geometric ladder (x1.25, multiples of 16) from lo."""
    b = lo
    while b < n:
        b = int(b * 1.25) // 16 * 16 + 16
    return b


def code_store_dtype(K: int) -> np.dtype:
    """The codes store's step-code type (uint8 for K <= 256, uint16 up to 65,536); a clear error beyond."""
    if not 1 <= K <= MAX_K:
        raise QincoInputError(f"the scan stores codes of at most 16 bits: K must be in [1, {MAX_K}], got K={K}")
    return steps_dtype(K)


@dataclasses.dataclass
class ScanLists:
    """Inverted lists in CSR form: the rows of list l are offsets[l]:offsets[l + 1].

    codes (n, M) uint8/uint16 step codes, ids (n,) int64 database ids, term (n,) float32 ||x̂||² − ||c||²
    (or uint8 on the per-list grid term_lo + term_step * byte), K the codebook size.
    """

    offsets: np.ndarray
    codes: np.ndarray
    ids: np.ndarray
    term: np.ndarray
    K: int
    term_lo: np.ndarray | None = None
    term_step: np.ndarray | None = None

    @property
    def nlist(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def term_float(self) -> np.ndarray:
        """(n,) float32 term as the scan sees it (dequantized)."""
        if self.term.dtype == np.float32:
            return self.term
        lists = np.repeat(np.arange(self.nlist), self.counts)
        return (self.term_lo[lists] + self.term_step[lists] * self.term.astype(np.float32)).astype(np.float32)


def _quantize_terms(term: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nlist = offsets.shape[0] - 1
    lo, step = np.zeros(nlist, np.float32), np.ones(nlist, np.float32)
    q = np.zeros(term.shape[0], np.uint8)
    for l in range(nlist):
        t = term[offsets[l]:offsets[l + 1]]
        if t.size == 0:
            continue
        lo[l] = t.min()
        step[l] = max(float(t.max() - lo[l]) / 255.0, 1e-30)
        q[offsets[l]:offsets[l + 1]] = np.clip(np.rint((t - lo[l]) / step[l]), 0, 255).astype(np.uint8)
    return q, lo, step


def build_lists(codes, tables: np.ndarray, centroids: np.ndarray | None = None, *, term: str = "float32",
                chunk: int = 65536) -> ScanLists:
    """CSR lists of the database codes (n, M), or (n, 1 + M) with the list id first when centroids is given;
    ids are row numbers. term: "float32" or "uint8" (per-list uniform grid)."""
    if term not in TERMS:
        raise QincoInputError(f"unknown term encoding {term!r}; choose from {', '.join(TERMS)}")
    tables = np.asarray(tables, np.float32)
    M, K, _ = tables.shape
    dt = code_store_dtype(K)
    n = codes.shape[0]
    want = M + (centroids is not None)
    if codes.ndim != 2 or codes.shape[1] != want:
        raise QincoInputError(f"codes must be (n, {want}) for these tables (M={M}"
                              f"{', list id first' if centroids is not None else ''}), got shape {codes.shape}")
    nlist = 1 if centroids is None else centroids.shape[0]
    # a counting sort in two passes over chunks: memory is the output (n x (M code bytes + 12)) and one chunk
    counts = np.zeros(nlist, np.int64)
    for i in range(0, n, chunk):
        _, l = split_codes(np.asarray(codes[i:i + chunk]), K, centroids)
        counts += np.bincount(l, minlength=nlist) if l is not None else min(chunk, n - i)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    steps, ids, tval = np.empty((n, M), dt), np.empty(n, np.int64), np.empty(n, np.float32)
    cursor = offsets[:-1].copy()
    for i in range(0, n, chunk):
        c, l = split_codes(np.asarray(codes[i:i + chunk]), K, centroids)
        r = additive_decode(tables, c).astype(np.float64)
        t = np.einsum("nd,nd->n", r, r)
        if l is None:
            l = np.zeros(c.shape[0], np.int64)
        else:
            t += 2 * np.einsum("nd,nd->n", np.asarray(centroids, np.float64)[l], r)
        order = np.argsort(l, kind="stable")  # rows keep their database order within each list
        ls = l[order]
        pos = cursor[ls] + np.arange(ls.shape[0]) - np.searchsorted(ls, ls, side="left")
        steps[pos], ids[pos], tval[pos] = c[order], i + order, t[order]
        cursor += np.bincount(l, minlength=nlist)
    out = ScanLists(offsets, steps, ids, tval, K)
    if term == "uint8":
        out.term, out.term_lo, out.term_step = _quantize_terms(out.term, offsets)
    return out


def save_lists(path, lists: ScanLists) -> None:
    arrays = dict(format=np.int64(SCAN_FORMAT), offsets=lists.offsets, codes=lists.codes, ids=lists.ids,
                  term=lists.term, K=np.int64(lists.K))
    if lists.term_lo is not None:
        arrays.update(term_lo=lists.term_lo, term_step=lists.term_step)
    path = os.fspath(path)
    with open(path + ".tmp", "wb") as f:
        np.savez(f, **arrays)
    os.replace(path + ".tmp", path)


def load_lists(path, *, n: int, M: int, K: int, nlist: int, sha256: str | None = None) -> ScanLists:
    """The lists saved by save_lists, checked against what the index says they hold (n vectors, M codes of K
    words, nlist lists; 1 for a flat index): the file's sha256 (when given), then every entry from the
    archive's headers before anything is inflated (read_npz), then the offsets, ids, codes and term."""
    path = os.fspath(path)
    fix = "rebuild the index with `eval/search.py build`"
    what = "scan lists"
    fd = open_regular(path, what)
    os.close(fd)
    if sha256 is not None and sha256_file(path) != sha256:
        raise QincoInputError(f"{path}: the file's sha256 differs from the one index.json recorded at build time; {fix}")
    members = {"format": ("<i8", 0), "offsets": ("<i8", 1), "codes": (code_store_dtype(K), 2), "ids": ("<i8", 1),
               "term": ("<f4", 1), "K": ("<i8", 0), "term_lo": ("<f4", 1), "term_step": ("<f4", 1)}
    members["term"] = (_term_dtype(path), 1)  # float32 or uint8, as the header says
    budget = 2 * (n * (M * np.dtype(code_store_dtype(K)).itemsize + 12) + 16 * (nlist + 1)) + 65536  # what a build writes, twice
    a = read_npz(path, what, members, ("format", "offsets", "codes", "ids", "term", "K"), max_bytes=budget)
    if int(a["format"]) != SCAN_FORMAT:
        raise QincoInputError(f"{path}: scan lists format {int(a['format'])}, this version reads {SCAN_FORMAT}; {fix}")
    off, codes, ids, term = a["offsets"], a["codes"], a["ids"], a["term"]
    bad = []
    if int(a["K"]) != K:
        bad.append(f"K={int(a['K'])}, the index K={K}")
    if codes.shape != (n, M):
        bad.append(f"codes {codes.shape}, the index wants ({n}, {M})")
    if off.shape != (nlist + 1,):
        bad.append(f"offsets {off.shape}, the index has {nlist} lists")
    elif off[0] != 0 or off[-1] != n or (np.diff(off) < 0).any():
        bad.append(f"offsets must rise from 0 to n={n} (got {off[0]} .. {off[-1]}, monotone: "
                   f"{bool((np.diff(off) >= 0).all())})")
    if ids.shape != (n,) or (n and (ids.min() < 0 or ids.max() >= n)):
        bad.append(f"ids must be ({n},) in [0, {n})")
    elif np.bincount(ids, minlength=n).max(initial=1) != 1:
        bad.append("ids must name every database vector once")
    if term.shape != (n,) or not np.isfinite(term.astype(np.float32)).all():
        bad.append(f"term {term.dtype} {term.shape}, want ({n},) finite values")
    elif term.dtype == np.uint8 and not ("term_lo" in a and a["term_lo"].shape == (nlist,)
                                         and a.get("term_step", np.empty(0)).shape == (nlist,)
                                         and np.isfinite(a["term_lo"]).all() and np.isfinite(a["term_step"]).all()):
        bad.append("a uint8 term needs finite term_lo and term_step of one value per list")
    if not bad and codes.size and int(codes.max()) >= K:
        bad.append(f"codes up to {int(codes.max())}, K={K}")
    if bad:
        raise QincoInputError(f"{path}: the scan lists do not match the index: {'; '.join(bad)}; {fix}")
    return ScanLists(off, codes, ids, term, K, a.get("term_lo"), a.get("term_step"))


def _term_dtype(path: str) -> str:
    """The dtype of the archive's term entry, read from its .npy header (only float32 or uint8 pass)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z, z.open("term.npy") as f:
            np.lib.format.read_magic(f)
            got = np.lib.format.read_array_header_1_0(f, max_header_size=10000)[2]
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile, SyntaxError) as e:
        raise QincoInputError(f"scan lists: {path}: unreadable term entry ({str(e)[:200]})") from None
    return "<f4" if got == np.float32 else "|u1"


def check_lists(lists: ScanLists, db_codes, tables: np.ndarray, centroids: np.ndarray | None, path: str,
                sample: int = 1024, seed: int = 0, chunk: int = 1 << 20) -> None:
    """The lists hold exactly the database codes (every vector once, in its own list, with its step codes), and
    the stored term equals the one the tables give on a random sample of vectors; a QincoInputError otherwise."""
    fix = "rebuild the index with `eval/search.py build`"
    n = lists.ids.shape[0]
    own = np.repeat(np.arange(lists.offsets.shape[0] - 1), np.diff(lists.offsets))
    for i in range(0, n, chunk):  # in row chunks: the database codes are memory-mapped parts
        ids = lists.ids[i:i + chunk]
        order = np.argsort(ids)
        steps, listno = split_codes(np.asarray(db_codes[ids[order]]), lists.K, centroids)
        if not np.array_equal(steps, lists.codes[i:i + chunk][order]) or (
                listno is not None and not np.array_equal(listno, own[i:i + chunk][order])):
            raise QincoInputError(f"{path}: the scan lists' codes differ from the database codes; {fix}")
    if n:
        rows = np.random.default_rng(seed).choice(n, min(sample, n), replace=False)
        r = additive_decode(np.asarray(tables, np.float32), lists.codes[rows]).astype(np.float64)
        want = np.einsum("nd,nd->n", r, r)
        if centroids is not None:
            want += 2 * np.einsum("nd,nd->n", np.asarray(centroids, np.float64)[own[rows]], r)
        got = lists.term[rows].astype(np.float64)
        if lists.term.dtype == np.uint8:
            got = lists.term_lo[own[rows]] + got * lists.term_step[own[rows]]
            tol = 0.51 * lists.term_step[own[rows]] + 1e-5 * (np.abs(want) + 1.0)
        else:
            tol = 1e-5 * (np.abs(want) + 1.0)
        wrong = int((~(np.abs(got - want) <= tol)).sum())
        if wrong:
            raise QincoInputError(f"{path}: the scan lists' stored term differs from the tables' on {wrong} of "
                                  f"{rows.size} sampled vectors; {fix}")


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """(n, M) uint8/uint16 step codes as (n, ceil(M / per)) uint32 words, per = 4 (uint8) or 2 (uint16), little
    end first: the scan reads one word for several codes (30% less time per code than a gather per code)."""
    codes = np.ascontiguousarray(codes)
    n, M = codes.shape
    per = 4 // codes.dtype.itemsize
    W = -(-M // per)
    padded = np.zeros((n, W * per), codes.dtype)
    padded[:, :M] = codes
    return padded.view("<u4").reshape(n, W)


def _code(words, m: int, per: int):
    """Step code m (...,) int32 of packed words (..., W) uint32 (jnp)."""
    bits = 32 // per
    return ((words[..., m // per] >> (bits * (m % per))) & ((1 << bits) - 1)).astype(jnp.int32)


@functools.lru_cache(maxsize=256)
def _kernel(S: int, nshort: int, quant: bool, ivf: bool, M: int, per: int):
    """Scan QB queries over S padded candidates, M codes packed per uint32 words:
    (dist (QB, nshort), ids, full codes (QB, nshort, ncol) int32)."""

    def run(xq, Iq, Dq, step_q, T2, words, term, offsets, counts, ids):
        nq, P = Iq.shape
        K = T2.shape[0] // M
        ln = counts[Iq]
        cum = jnp.cumsum(ln, axis=1)
        start = cum - ln
        j = jnp.arange(S, dtype=jnp.int32)
        # p: the probe each padded position belongs to, the number of probes after the first that start at or
        # before it: a +1 at each probe's start (empty lists add theirs at the same place), summed along
        marks = jnp.zeros((nq, S + 1), jnp.int32).at[jnp.arange(nq)[:, None], jnp.minimum(start[:, 1:], S)].add(1)
        p = jnp.minimum(jnp.cumsum(marks[:, :S], axis=1), P - 1)
        valid = j[None, :] < cum[:, -1:]
        # the row in the CSR arrays: the position plus its probe's (list offset - start in the padded row)
        rows = jnp.where(valid, j[None, :] + jnp.take_along_axis(offsets[Iq] - start, p, 1), 0)
        lut = jnp.dot(xq, T2.T, precision=jax.lax.Precision.HIGHEST).reshape(nq, M, K)
        w = words[rows]  # (nq, S, W) uint32: `per` codes to a word
        acc = 0.0
        for m in range(M):
            acc = acc + jnp.take_along_axis(lut[:, m, :], _code(w, m, per), axis=1)
        t = term[rows]
        if quant:
            t = t.astype(jnp.float32) * jnp.take_along_axis(step_q, p, 1)
        dist = jnp.where(valid, jnp.take_along_axis(Dq, p, 1) + t - 2 * acc, jnp.inf)
        neg, i = jax.lax.top_k(-dist, nshort)
        sel = jnp.take_along_axis(rows, i, 1)
        ok = jnp.isfinite(neg)
        ws = words[sel]
        full = jnp.stack([_code(ws, m, per) for m in range(M)], -1)
        if ivf:
            lst = jnp.take_along_axis(Iq, jnp.take_along_axis(p, i, 1), 1)
            full = jnp.concatenate([lst[..., None], full], axis=-1)
        return -neg, jnp.where(ok, ids[sel], -1), jnp.where(ok[..., None], full, 0)

    return jax.jit(run)


class Scanner:
    """The device-resident lists and tables of one index, and the scan over them."""

    def __init__(self, lists: ScanLists, tables: np.ndarray, ivf: bool, device=None):
        tables = np.asarray(tables, np.float32)
        M, K, d = tables.shape
        if lists.codes.shape[1] != M or lists.K != K:
            raise QincoInputError(f"scan lists of {lists.codes.shape[1]} codes of K={lists.K} words do not match "
                                  f"the tables (M={M}, K={K})")
        self.lists, self.ivf, self.M, self.K, self.d = lists, ivf, M, K, d
        self.quant = lists.term.dtype == np.uint8
        device = device or jax.devices()[0]
        self.on_cpu, self._pool = device.platform == "cpu", None
        put = functools.partial(jax.device_put, device=device)
        # one extra, empty list at the end: the probes a coarse search leaves unfilled (id -1) read it
        self.counts_np = np.append(lists.counts, 0).astype(np.int32)
        self.T2 = put(tables.reshape(M * K, d))
        self.per = 4 // lists.codes.dtype.itemsize  # codes per uint32 word
        self.words, self.term = put(pack_codes(lists.codes)), put(lists.term)
        self.ids = put(lists.ids.astype(np.int32 if lists.ids.shape[0] < 2**31 else np.int64))
        self.offsets = put(np.append(lists.offsets[:-1], 0).astype(np.int32))
        self.counts = put(self.counts_np)

    def coarse_inputs(self, Iq: np.ndarray, Dq: np.ndarray):
        """(list ids int32, per-list scalar with the term's offset folded in, term step, codes per probe)."""
        Iq = np.asarray(Iq)
        Iq32 = np.where(Iq < 0, self.lists.nlist, Iq).astype(np.int32)
        Dq = np.where(Iq < 0, 0, Dq)
        if self.quant:
            lo, st = np.append(self.lists.term_lo, 0), np.append(self.lists.term_step, 1)
            Dq, step = Dq + lo[Iq32], st[Iq32]
        else:
            step = np.ones(Dq.shape, np.float32)
        return Iq32, np.asarray(Dq, np.float32), np.asarray(step, np.float32), self.counts_np[Iq32]

    def scan(self, xq: np.ndarray, Iq: np.ndarray, Dq: np.ndarray, nshort: int, qb: int | None = None) -> list:
        """Dispatch the scan of the queries xq (nq, d) with their coarse results Iq, Dq (nq, nprobe).

        Returns the sub-batches [(rows, n, (dist, ids, codes))], not waited for on an accelerator (on a CPU
        they are done, see STREAMS): rows (qb,) the query rows of
        the sub-batch (its first n distinct, the rest repeating the last to fill it), and device arrays of
        qb rows: the nshort nearest distances, database ids (-1 past the candidates) and full codes (int32,
        the list id first for IVF)."""
        Iq32, Dq, step, counts = self.coarse_inputs(Iq, Dq)
        tot = counts.sum(1)
        order = np.argsort(tot, kind="stable")
        qb = qb or (QB if tot.size == 0 or tot.mean() <= LONG else QB // 2)
        jobs = []
        for s in range(0, len(order), qb):
            sel = order[s:s + qb]
            rows = np.concatenate([sel, np.repeat(sel[-1:], qb - len(sel))]) if len(sel) < qb else sel
            jobs.append((rows, len(sel), max(bucket(int(tot[rows].max())), bucket(nshort))))

        def dispatch(part):
            out = []
            for rows, n, S in part:
                fn = _kernel(S, nshort, self.quant, self.ivf, self.M, self.per)
                res = fn(xq[rows], Iq32[rows], Dq[rows], step[rows], self.T2, self.words, self.term, self.offsets,
                         self.counts, self.ids)
                out.append((rows, n, jax.block_until_ready(res) if self.on_cpu else res))
            return out

        if len(jobs) < 2 or STREAMS < 2 or not self.on_cpu:  # an accelerator queues them without threads
            return dispatch(jobs)
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(STREAMS, thread_name_prefix="qinco-scan")
        done = [f.result() for f in [self._pool.submit(dispatch, jobs[i::STREAMS]) for i in range(STREAMS)]]
        out = [None] * len(jobs)
        for i, part in enumerate(done):
            out[i::STREAMS] = part
        return out
