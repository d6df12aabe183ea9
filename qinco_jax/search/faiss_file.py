"""index.faiss as untrusted input: its records are walked here, field by field, before faiss reads it.

faiss's reader trusts the file: an on-disk inverted-lists record names a data file anywhere, which faiss opens
and memory-maps (a truncated target kills the process with SIGBUS at the first search), and any index type
loads. So only what this project writes is accepted: an IndexResidualQuantizer ("IxRq"), or an
IndexIVFResidualQuantizer ("IwRQ") over an IndexFlatL2 ("IxF2") or IndexHNSWFlat ("IHNf") coarse quantizer,
with in-memory inverted lists ("ilar"), L2 metric, every record inside the file and the file ending where the
last record ends. The walk reads headers and sizes only (seeks over the data), so it costs little; the
sha256 of the file comes from one streamed pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import stat
import struct

import numpy as np

from qinco_jax.checks import QincoInputError
from qinco_jax.search.index import unpack_codes

MAX_FAISS_BYTES = 1 << 40
METRIC_L2 = 1
# AdditiveQuantizer::Search_type_t values whose records carry extra vectors
ST_CQINT = (6, 7)  # ST_norm_cqint8, ST_norm_cqint4: a flat index of norm levels
ST_2X4 = (8, 9)  # ST_norm_lsq2x4, ST_norm_rq2x4: also norm tables
WRITTEN = {"IxRq": "IndexResidualQuantizer", "IwRQ": "IndexIVFResidualQuantizer", "IxF2": "IndexFlatL2",
           "IHNf": "IndexHNSWFlat"}


@dataclasses.dataclass
class FaissHeader:
    """What the walk found: the top index type, d, ntotal, metric, nlist (0: flat), M, nbits, code_size, the
    quantizer type (IVF) and the byte ranges of the inverted lists (IVF) or packed codes (flat)."""

    kind: str
    d: int
    ntotal: int
    metric: int
    nlist: int
    M: int
    nbits: tuple
    code_size: int
    quantizer: str | None = None
    list_sizes: list | None = None  # IVF: vectors per list
    data_offset: int = 0  # IVF: where the lists' codes and ids start; flat: where the packed codes start


class _Walker:
    def __init__(self, f, size: int, name: str):
        self.f, self.size, self.name, self.pos = f, size, name, 0

    def fail(self, msg: str):
        raise QincoInputError(f"{self.name}: {msg} (at byte {self.pos:,}); rebuild the index with "
                              "`eval/search.py build`")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            self.fail(f"a record runs past the end of the file ({self.size:,} bytes): truncated or not a "
                      "faiss index")
        self.f.seek(self.pos)
        b = self.f.read(n)
        self.pos += n
        return b

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            self.fail(f"a record of {n:,} bytes runs past the end of the file ({self.size:,} bytes)")
        self.pos += n

    def one(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def fourcc(self) -> str:
        return self.take(4).decode("latin-1")

    def vector(self, itemsize: int) -> int:
        """Skip a size-prefixed vector; its length."""
        n = self.one("Q")
        if n > self.size // itemsize:
            self.fail(f"a vector of {n:,} items does not fit in the file")
        self.skip(n * itemsize)
        return n

    def read_vector(self, fmt: str, max_items: int = 1 << 20) -> list:
        n = self.one("Q")
        if n > max_items or n * struct.calcsize(fmt) > self.size:
            self.fail(f"a vector of {n:,} items where at most {max_items:,} are expected")
        return list(struct.unpack(f"<{n}{fmt}", self.take(n * struct.calcsize(fmt))))

    def header(self) -> tuple[int, int, int]:
        d, ntotal = self.one("i"), self.one("q")
        self.skip(16 + 1)  # two unused int64, is_trained
        metric = self.one("i")
        if metric > 1:
            self.skip(4)
        if not 0 < d <= 1 << 16 or ntotal < 0:
            self.fail(f"implausible header (d={d}, ntotal={ntotal})")
        return d, ntotal, metric

    def residual_quantizer(self) -> tuple[int, int, tuple]:
        d, M = self.one("Q"), self.one("Q")
        nbits = tuple(self.read_vector("Q", 1 << 12))
        self.skip(1)  # is_trained
        self.vector(4)  # codebooks
        search_type = self.one("i")
        self.skip(8)  # norm_min, norm_max
        if search_type in ST_CQINT + ST_2X4:
            self.vector(4)  # qnorm codes (a flat index of 1-D levels, counted in floats)
        if search_type in ST_2X4:
            self.vector(4)
        self.skip(8)  # train_type, max_beam_size
        return d, M, nbits

    def quantizer(self, d: int, storage: bool = False) -> tuple[str, int]:
        kind = self.fourcc()
        if kind == "IxF2":
            qd, n, metric = self.header()
            if self.vector(4) != n * qd:  # the stored vectors, counted in floats
                self.fail(f"a flat index of {n:,} vectors whose data is not {n:,} x {qd} floats")
        elif kind == "IHNf" and not storage:
            qd, n, metric = self.header()
            for itemsize in (8, 4, 4, 8, 4):  # assign_probas, cum_nneighbor_per_level, levels, offsets, neighbors
                self.vector(itemsize)
            self.skip(5 * 4)  # entry_point, max_level, efConstruction, efSearch, upper_beam
            skind, sn = self.quantizer(d, storage=True)
            if sn != n:
                self.fail(f"the HNSW coarse quantizer's storage holds {sn} vectors, the graph {n}")
        else:
            self.fail(f"the coarse quantizer{' storage' if storage else ''} is {_name(kind)}; this project writes "
                      "IndexFlatL2" + ("" if storage else " or IndexHNSWFlat"))
        if qd != d or metric != METRIC_L2:
            self.fail(f"the coarse quantizer has d={qd}, metric {metric}; the index d={d}, L2")
        return kind, n


def _name(fourcc: str) -> str:
    return WRITTEN.get(fourcc, f"a faiss record {fourcc!r}")


def read_bytes(path) -> bytes:
    """The bytes of index.faiss: a regular file (a FIFO cannot block), within MAX_FAISS_BYTES."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise QincoInputError(f"{path}: cannot read the faiss index: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise QincoInputError(f"{path}: the faiss index is not a regular file")
        if st.st_size > MAX_FAISS_BYTES:
            raise QincoInputError(f"{path}: {st.st_size:,} bytes, over the {MAX_FAISS_BYTES:,} of an index")
        raw = f.read(st.st_size)
        if len(raw) != st.st_size or f.read(1):
            raise QincoInputError(f"{path}: the faiss index changed while it was read")
        return raw


def sha256_bytes(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def read_header(path, raw: bytes | None = None) -> FaissHeader:
    """Walk index.faiss (its bytes `raw`, else read from path; see the module doc); a QincoInputError naming
    the file for anything this project does not write."""
    path = os.fspath(path)
    raw = read_bytes(path) if raw is None else raw
    with io.BytesIO(raw) as f:
        w = _Walker(f, len(raw), path)
        kind = w.fourcc()
        if kind not in ("IxRq", "IwRQ"):
            w.fail(f"holds {_name(kind)}; this project writes IndexResidualQuantizer or "
                   "IndexIVFResidualQuantizer")
        d, ntotal, metric = w.header()
        if kind == "IxRq":
            rd, M, nbits = w.residual_quantizer()
            code_size = w.one("Q")
            n = w.one("Q")
            data_offset = w.pos
            if n != ntotal * code_size:
                w.fail(f"{n:,} code bytes for {ntotal:,} vectors of {code_size} bytes")
            w.skip(n)
            out = FaissHeader(kind, d, ntotal, metric, 0, M, nbits, code_size, data_offset=data_offset)
        else:
            nlist, _ = w.one("Q"), w.one("Q")
            qkind, qn = w.quantizer(d)
            if qn != nlist:
                w.fail(f"the coarse quantizer holds {qn:,} centroids for {nlist:,} lists")
            if w.one("B") != 0:
                w.fail("the index keeps a direct map, which this project never writes")
            if w.vector(8):
                w.fail("the index keeps a direct map, which this project never writes")
            code_size = w.one("Q")
            rd, M, nbits = w.residual_quantizer()
            w.skip(1 + 4)  # by_residual, use_precomputed_table
            lists = w.fourcc()
            if lists != "ilar":
                what = "on-disk inverted lists (a data file named inside)" if lists == "ilod" else repr(lists)
                w.fail(f"holds {what}; only in-memory inverted lists ('ilar') are accepted")
            ln, lcs = w.one("Q"), w.one("Q")
            if (ln, lcs) != (nlist, code_size):
                w.fail(f"the inverted lists have nlist={ln}, code_size={lcs}; the index {nlist}, {code_size}")
            list_type = w.fourcc()
            if list_type == "full":
                sizes = w.read_vector("Q", max(nlist, 1))
                if len(sizes) != nlist:
                    w.fail(f"{len(sizes):,} list sizes for {nlist:,} lists")
            elif list_type == "sprs":
                pairs = w.read_vector("Q", 2 * max(nlist, 1))
                sizes = [0] * nlist
                for i in range(0, len(pairs) - 1, 2):
                    if pairs[i] >= nlist:
                        w.fail(f"a list id {pairs[i]:,} out of range [0, {nlist:,})")
                    sizes[pairs[i]] = pairs[i + 1]
            else:
                w.fail(f"unknown inverted-list layout {list_type!r}")
            if sum(sizes) != ntotal:
                w.fail(f"the inverted lists hold {sum(sizes):,} vectors, the header says {ntotal:,}")
            data_offset = w.pos
            w.skip(ntotal * (code_size + 8))
            out = FaissHeader(kind, d, ntotal, metric, nlist, M, nbits, code_size, qkind, sizes, data_offset)
        if w.pos != w.size:
            w.fail(f"{w.size - w.pos:,} bytes follow the last record")
        if rd != d or metric != METRIC_L2:
            w.fail(f"the quantizer has d={rd}, metric {metric}; the index d={d}, L2")
    return out


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(os.fspath(path), "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def check_codes(raw: bytes, h: FaissHeader, db_codes: np.ndarray, path, chunk: int = 1 << 20) -> None:
    """The codes stored in the index (bytes `raw`, walked into `h`) must be the database codes: every id once,
    in its row's list, with its row's step codes (IVF); the rows in order (flat)."""
    nbits = h.nbits[0]
    used = (h.M * nbits + 7) // 8

    def compare(packed, rows, lists):
        ref = np.asarray(db_codes[rows] if rows is not None else db_codes[lists], np.int64)
        steps = unpack_codes(packed[:, :used], h.M, nbits)
        ok = np.array_equal(steps, ref[:, -h.M:]) and (rows is None or np.array_equal(ref[:, 0], lists))
        if not ok:
            raise QincoInputError(f"{path}: the codes stored in the faiss index are not the folder's database "
                                  "codes (an index over other vectors?); rebuild it with `eval/search.py build`")

    buf = np.frombuffer(raw, np.uint8)
    if not h.nlist:
        for s in range(0, h.ntotal, chunk):
            e = min(h.ntotal, s + chunk)
            compare(buf[h.data_offset + s * h.code_size: h.data_offset + e * h.code_size].reshape(-1, h.code_size),
                    None, np.arange(s, e))
        return
    seen = np.zeros(h.ntotal, bool)
    off, batch = h.data_offset, []
    sizes = list(h.list_sizes) + [0]
    for lst, n in enumerate(sizes):
        if n:
            codes = buf[off: off + n * h.code_size].reshape(n, h.code_size)
            ids = buf[off + n * h.code_size: off + n * (h.code_size + 8)].view("<i8")
            off += n * (h.code_size + 8)
            if ids.min() < 0 or ids.max() >= h.ntotal or seen[ids].any() or len(np.unique(ids)) != n:
                raise QincoInputError(f"{path}: list {lst} of the faiss index holds ids outside [0, {h.ntotal:,}) "
                                      "or ids held twice")
            seen[ids] = True
            batch.append((codes, ids, np.full(n, lst, np.int64)))
        if batch and (lst == len(sizes) - 1 or sum(len(b[1]) for b in batch) >= chunk):
            compare(np.concatenate([b[0] for b in batch]), np.concatenate([b[1] for b in batch]),
                    np.concatenate([b[2] for b in batch]))
            batch = []


def check_hnsw(quantizer, path) -> None:
    """An HNSW coarse quantizer's graph must be well formed (faiss follows its links without bounds checks)."""
    import faiss

    hnsw = quantizer.hnsw
    n = quantizer.ntotal
    levels = faiss.vector_to_array(hnsw.levels).astype(np.int64)
    offsets = faiss.vector_to_array(hnsw.offsets).astype(np.int64)
    cum = faiss.vector_to_array(hnsw.cum_nneighbor_per_level).astype(np.int64)
    neighbors = faiss.vector_to_array(hnsw.neighbors).astype(np.int64)
    ok = (levels.shape == (n,) and offsets.shape == (n + 1,) and n > 0 and levels.min() >= 1
          and levels.max() < len(cum) and offsets[0] == 0 and np.array_equal(np.diff(offsets), cum[levels])
          and offsets[-1] == len(neighbors) and (neighbors.size == 0 or (neighbors.min() >= -1 and neighbors.max() < n))
          and 0 <= hnsw.entry_point < n and hnsw.max_level == levels.max() - 1
          and levels[hnsw.entry_point] - 1 == hnsw.max_level)
    if not ok:
        raise QincoInputError(f"{path}: the HNSW coarse quantizer's graph is malformed (levels, offsets or links "
                              "out of range); rebuild the index with `eval/search.py build`")
