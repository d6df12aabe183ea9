"""The faiss index over QINCo codes: an additive-quantizer index whose codebooks are the least-squares tables,
whose norm quantizer is trained on the stored norms, and whose lists receive the QINCo codes as they are (no
faiss encoding); faiss's packed code and coarse-code layouts, both ways."""

from __future__ import annotations

import math

import numpy as np

from qinco_jax import checks
from qinco_jax.checks import QincoInputError
from qinco_jax.progress import Progress
from qinco_jax.search.common import split_codes
from qinco_jax.search.tables import additive_norms

NORMS = ("float", "qint8", "qint4", "cqint8", "cqint4")


def _search_type(norm: str):
    import faiss

    if norm not in NORMS:
        raise QincoInputError(f"unknown norm encoding {norm!r}; choose from {', '.join(NORMS)}")
    return getattr(faiss.AdditiveQuantizer, f"ST_norm_{norm}")


def _set_tables(aq, tables: np.ndarray) -> None:
    import faiss

    faiss.copy_array_to_vector(np.ascontiguousarray(tables, np.float32).ravel(), aq.codebooks)
    aq.is_trained = True


def _train_norm(aq, norms: np.ndarray) -> None:
    import faiss

    norms = np.ascontiguousarray(norms, np.float32)
    aq.train_norm(norms.shape[0], faiss.swig_ptr(norms))


def pack_codes(aq, codes: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """(n, aq.code_size) uint8: faiss's packed form of our (n, M) codes with the given squared norms."""
    import faiss

    c = np.ascontiguousarray(codes, np.int32)
    norms = np.ascontiguousarray(norms, np.float32)
    packed = np.zeros((c.shape[0], aq.code_size), np.uint8)
    aq.pack_codes(c.shape[0], faiss.swig_ptr(c), faiss.swig_ptr(packed), -1, faiss.swig_ptr(norms), None)
    return packed


def unpack_codes(packed: np.ndarray, M: int, nbits: int) -> np.ndarray:
    """(n, M) int32 codes from faiss's little-endian bitstrings (the leading M * nbits bits of each row)."""
    packed = np.asarray(packed, np.uint8)
    if nbits == 8:
        return packed[..., :M].astype(np.int32)
    bits = np.unpackbits(packed, axis=-1, bitorder="little")[..., : M * nbits]
    bits = bits.reshape(bits.shape[:-1] + (M, nbits)).astype(np.int32)
    return (bits << np.arange(nbits, dtype=np.int32)).sum(-1)


def decode_listnos(coarse: np.ndarray) -> np.ndarray:
    """List ids from faiss's little-endian coarse-code bytes (..., coarse_code_size) as int64."""
    coarse = np.asarray(coarse, np.uint8).astype(np.int64)
    return (coarse << (8 * np.arange(coarse.shape[-1], dtype=np.int64))).sum(-1)


def new_index(tables: np.ndarray, centroids: np.ndarray | None = None, *, norm: str = "qint8",
              train_norms: np.ndarray | None = None, hnsw: int = 0, ef_construction: int = 40):
    """An empty, trained faiss index whose additive codebooks are `tables` (M, K, d).

    centroids None: an IndexResidualQuantizer (flat additive scan). Otherwise an IndexIVFResidualQuantizer over
    the residuals to the given centroids (nlist, d), its coarse quantizer an IndexFlatL2 (or, with hnsw > 0,
    an IndexHNSWFlat with that many links) holding exactly these centroids. The norm quantizer (for the
    'qint*'/'cqint*' norm encodings) is trained on `train_norms`: the squared norms of the additive
    reconstructions of training vectors, which is the quantity stored for each database vector.
    """
    import faiss

    tables = np.asarray(tables, np.float32)
    if tables.ndim != 3:
        raise QincoInputError(f"tables must be (M, K, d), got shape {tables.shape}")
    M, K, d = tables.shape
    nbits = int(round(math.log2(K)))
    if 1 << nbits != K:
        raise QincoInputError(f"faiss additive quantizers need K to be a power of two, got K={K}")
    st = _search_type(norm)
    if centroids is None:
        index = faiss.IndexResidualQuantizer(d, M, nbits, faiss.METRIC_L2, st)
    else:
        centroids = np.ascontiguousarray(checks.vectors(centroids, d, "IVF centroids"), np.float32)
        nlist = centroids.shape[0]
        if hnsw:
            quantizer = faiss.IndexHNSWFlat(d, int(hnsw))
            quantizer.hnsw.efConstruction = int(ef_construction)
        else:
            quantizer = faiss.IndexFlatL2(d)
        quantizer.add(centroids)
        index = faiss.IndexIVFResidualQuantizer(quantizer, d, nlist, M, nbits, faiss.METRIC_L2, st)
        quantizer.this.disown()
        index.own_fields = True
    aq = index.rq
    _set_tables(aq, tables)
    if norm != "float":
        if train_norms is None or len(train_norms) == 0:
            raise QincoInputError(f"norm encoding {norm!r} needs train_norms to train the norm quantizer")
        _train_norm(aq, train_norms)
    index.is_trained = True
    return index


def add_codes(index, tables: np.ndarray, codes, *, start_id: int = 0, chunk: int = 65536,
              progress: bool = False) -> None:
    """Add QINCo codes to an index from `new_index` as they are: no faiss encoding.

    IVF: codes (n, 1 + M), column 0 the list id; each chunk is sorted by list and appended to the inverted
    lists with `add_entries`. Flat: codes (n, M), appended with `add_sa_codes`. The stored norm of each
    vector is the squared norm of its additive reconstruction sum_m T_m[i_m] (the residual's for IVF).
    Ids are start_id + row.
    """
    import faiss

    ivf = hasattr(index, "invlists")
    aq, (M, K, _) = index.rq, tables.shape
    n = codes.shape[0]
    want = M + 1 if ivf else M
    if codes.ndim != 2 or codes.shape[1] != want:
        raise QincoInputError(f"codes for this {'IVF' if ivf else 'flat'} index must have {want} columns "
                              f"({'list id + ' if ivf else ''}M={M} step codes), got shape {codes.shape}")
    with Progress(n, desc="add", enabled=progress) as bar:
        for i in range(0, n, chunk):
            c = np.asarray(codes[i:i + chunk])
            if ivf:
                steps, lists = split_codes(c, K, np.zeros((index.nlist, 1)))
            else:
                steps, lists = checks.codes(c, K, M), None
            packed = pack_codes(aq, steps, additive_norms(tables, steps))
            ids = np.arange(start_id + i, start_id + i + c.shape[0], dtype=np.int64)
            if not ivf:
                index.add_sa_codes(packed)
            else:
                order = np.argsort(lists, kind="stable")
                lists, packed, ids = lists[order], np.ascontiguousarray(packed[order]), ids[order]
                bounds = np.flatnonzero(np.diff(lists)) + 1
                for s, e in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(lists)]])):
                    index.invlists.add_entries(int(lists[s]), int(e - s), faiss.swig_ptr(ids[s:e]),
                                               faiss.swig_ptr(packed[s:e]))
                index.ntotal += c.shape[0]
            bar.update(c.shape[0])
