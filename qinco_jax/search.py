"""Search over QINCo codes: least-squares additive tables, resumable database encoding, faiss indexes that hold
the QINCo codes, and the search pipeline (additive shortlist -> optional pairwise decoder -> QINCo re-rank).

The pipeline, for a codec with an IVF step (`cfg.nlist > 0`, codes (n, 1 + M), column 0 the list id):

1. `lstsq_tables(codes_xt, xt, K, centroids)`: additive tables T (M, K, d) minimising
   ||x - c[list] - sum_m T_m[i_m]||^2 over training vectors (normal equations accumulated chunk by chunk).
2. `encode_database(codec, xb, dir)`: codes of the database in a memory-mapped file, in resumable parts,
   one contiguous slice per process.
3. `build_index(tables, codes, centroids=...)`: a faiss IndexIVFResidualQuantizer whose codebooks are T,
   whose coarse quantizer holds the IVF centroids and whose inverted lists receive the QINCo codes as they
   are (no faiss encoding), with the norms of the additive reconstruction.
4. `search(pipeline, xq, nprobe=..., nshort=...)`: IVF probe with look-up-table distances gives the top nshort
   with their codes; an optional pairwise additive decoder narrows them; QINCo decodes the survivors and an
   exact L2 re-rank gives the top k.

Codecs without IVF get the flat variant: an additive-quantizer scan over all codes for the shortlist.
Everything works in raw units (the codec's scale is applied by qj.encode / qj.decode).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import time

import jax
import numpy as np

from qinco_jax import checks, codec as codec_mod
from qinco_jax.checks import QincoInputError
from qinco_jax.files import read_json, write_json
from qinco_jax.progress import Progress

CODES_FORMAT = "qinco_jax.codes/1"
INDEX_FORMAT = "qinco_jax.search_index/1"
CODES_FILE = "codes.npy"
MANIFEST = "manifest.json"
NORMS = ("float", "qint8", "qint4", "cqint8", "cqint4")
DEFAULT_PART = 65536
LSTSQ_CHUNK = 16384
# decoded candidates held at once by the re-rank (vectors); bounds memory whatever nq x nshort
RERANK_BUDGET = 131072


# ----------------------------------------------------------------------------- codec helpers


def nlist_of(codec) -> int:
    """Number of IVF lists of a codec (0 for a plain QINCo codec)."""
    return int(getattr(codec.config, "nlist", 0) or 0)


def num_codes(cfg) -> int:
    """Columns of a full code matrix: M, plus one (the list id) for IVF."""
    return int(getattr(cfg, "num_codes", cfg.M))


def code_dtype(cfg) -> np.dtype:
    return np.dtype(cfg.code_dtype)


def ivf_centroids(codec) -> np.ndarray | None:
    """(nlist, d) float32 IVF centroids in raw units, None for a plain codec."""
    if not nlist_of(codec):
        return None
    return np.asarray(codec.ivf_centroids, np.float32)


def fingerprint(codec) -> str:
    """sha256 (hex) of a codec's architecture, normalisation and parameter values: names the model an index was
    built with."""
    h = hashlib.sha256()
    # fields at their default are left out, so that a new config field with a default keeps old fingerprints
    defaults = {f.name: f.default for f in dataclasses.fields(codec.config)}
    arch = {k: v for k, v in codec.config.to_dict().items() if defaults.get(k, dataclasses.MISSING) != v}
    h.update(json.dumps(arch, sort_keys=True).encode())
    h.update(repr(float(codec.scale)).encode())
    shift = getattr(getattr(codec, "norm", None), "shift", None)
    if shift is not None:  # QINCo2's per-dimension mean (v1 codecs have none: their fingerprint is unchanged)
        h.update(b"shift" + np.ascontiguousarray(np.asarray(shift, np.float32)).tobytes())
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(codec.params))[0]
    for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
        a = np.ascontiguousarray(np.asarray(leaf, np.float32))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def require_ivf(codec, what: str) -> None:
    """A clear error when a pipeline that needs an IVF codec is given a plain one."""
    if not nlist_of(codec):
        raise QincoInputError(f"{what} needs an IVF-QINCo codec (trained with --ivf), but this codec has no IVF "
                              f"step (M={codec.config.M}, nlist=0); use the flat pipeline for it")


def require_flat(codec, what: str) -> None:
    """A clear error when a pipeline that needs a plain (flat) codec is given an IVF one."""
    if nlist_of(codec):
        raise QincoInputError(f"{what} needs a plain QINCo codec without IVF, but this codec has an IVF step "
                              f"(nlist={nlist_of(codec)}); use the IVF pipeline for it")


# ----------------------------------------------------------------------------- least-squares additive tables


def _split_codes(codes: np.ndarray, K: int, centroids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(step codes (n, M), list ids (n,) or None) of a code matrix, range-checked."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.dtype.kind not in "ui":
        raise QincoInputError(f"codes must be a 2-D integer matrix, got shape {codes.shape}, dtype {codes.dtype}")
    if centroids is None:
        return checks.codes(codes, K, codes.shape[1]), None
    if codes.shape[1] < 2:
        raise QincoInputError(f"IVF codes need a list-id column and at least one step code, got shape {codes.shape}")
    lists = codes[:, 0].astype(np.int64)
    if lists.size and (lists.min() < 0 or lists.max() >= centroids.shape[0]):
        raise QincoInputError(f"list ids out of range [0, {centroids.shape[0]}): min {lists.min()}, max {lists.max()}")
    return checks.codes(codes[:, 1:], K, codes.shape[1] - 1), lists


def targets(x: np.ndarray, lists: np.ndarray | None, centroids: np.ndarray | None) -> np.ndarray:
    """What the additive tables reconstruct: x (flat) or the residual x - c[list] (IVF), float64."""
    x = np.asarray(x, np.float64)
    return x if lists is None else x - centroids[lists]


def sum_rows_by_label(labels: np.ndarray, x: np.ndarray, nlabels: int,
                      dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """(sums (nlabels, d), counts (nlabels,)) of the rows of x grouped by integer label (sort + reduceat)."""
    labels = np.asarray(labels, np.int64)
    counts = np.bincount(labels, minlength=nlabels)
    sums = np.zeros((nlabels, x.shape[1]), dtype)
    if labels.size:
        order = np.argsort(labels, kind="stable")
        present = np.flatnonzero(counts)
        starts = np.concatenate([[0], np.cumsum(counts[present])[:-1]])
        sums[present] = np.add.reduceat(np.asarray(x, dtype)[order], starts, axis=0)
    return sums, counts


def lstsq_tables(codes, x, K: int, *, centroids=None, chunk: int = LSTSQ_CHUNK, rtol: float = 1e-10,
                 progress: bool = False) -> np.ndarray:
    """Additive codebooks fitted by least squares to QINCo codes (spec v1 §4.1).

    Minimises sum_i ||t_i - sum_m T_m[codes[i, m]]||^2 with t = x (flat) or t = x - centroids[codes[:, 0]]
    (IVF: column 0 holds list ids, the tables use the other columns). The normal equations
    G T = B (G = one-hot Gram, (M K, M K); B = one-hot^T t, (M K, d)) are accumulated chunk by chunk from pair
    counts and row sums, never as an n x M K matrix, and solved in float64 for the minimal-norm solution,
    like np.linalg.lstsq on the one-hot matrix: codewords no vector uses come out as exact zeros, and the
    shifts between tables that leave every reconstruction unchanged are resolved to the smallest norm.

    Args:
      codes: (n, M) codes, or (n, 1 + M) with list ids in column 0 when centroids is given.
      x: (n, d) vectors in raw units (a memmap is read chunk by chunk).
      K: codebook size.
      centroids: (nlist, d) IVF centroids in raw units, or None.
      rtol: eigenvalues of G below rtol * max are treated as zero.

    Returns:
      (M, K, d) float32 tables.
    """
    x = checks.vectors(x, None, "training vectors")
    if centroids is not None:
        centroids = np.asarray(checks.vectors(centroids, x.shape[1], "IVF centroids"), np.float64)
    codes = np.asarray(codes) if not isinstance(codes, np.ndarray) else codes
    if codes.ndim != 2 or codes.shape[0] != x.shape[0]:
        raise QincoInputError(f"codes {codes.shape} and vectors {x.shape} must have one row per vector")
    n, d = x.shape
    M = codes.shape[1] - (centroids is not None)
    MK = M * K
    gram = np.zeros(MK * MK, np.int64)
    rhs = np.zeros((MK, d), np.float64)
    offsets = (np.arange(M) * K)[None, :]
    chunk = checks.batch_size(chunk, "chunk")
    with Progress(n, desc="lstsq", enabled=progress) as bar:
        for i in range(0, n, chunk):
            c, lists = _split_codes(codes[i:i + chunk], K, centroids)
            checks.finite_chunk(np.asarray(x[i:i + chunk]), i, "training vectors")
            t = targets(x[i:i + chunk], lists, centroids)
            flat = c.astype(np.int64) + offsets  # (b, M) column in the one-hot matrix
            gram += np.bincount((flat[:, :, None] * MK + flat[:, None, :]).ravel(), minlength=MK * MK)
            rhs += sum_rows_by_label(flat.ravel(), np.repeat(t, M, axis=0), MK)[0]
            bar.update(t.shape[0])
    gram = gram.reshape(MK, MK)
    used = np.flatnonzero(np.diag(gram) > 0)
    G = gram[np.ix_(used, used)].astype(np.float64)
    w, V = np.linalg.eigh(G)
    keep = w > rtol * max(w.max(initial=0.0), 1.0)
    T = np.zeros((MK, d), np.float64)
    T[used] = V[:, keep] @ ((V[:, keep].T @ rhs[used]) / w[keep][:, None])
    return T.reshape(M, K, d).astype(np.float32)


def additive_decode(tables: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """sum_m tables[m, codes[:, m]]: (n, d) float32 additive reconstruction of (n, M) codes."""
    codes = np.asarray(codes)
    out = np.zeros((codes.shape[0], tables.shape[2]), np.float32)
    for m in range(codes.shape[1]):
        out += tables[m][codes[:, m]]
    return out


def additive_norms(tables: np.ndarray, codes: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """(n,) float32 squared norms of the additive reconstructions of (n, M) codes, chunk by chunk."""
    out = np.empty(codes.shape[0], np.float32)
    for i in range(0, codes.shape[0], chunk):
        r = additive_decode(tables, np.asarray(codes[i:i + chunk]))
        out[i:i + r.shape[0]] = np.einsum("nd,nd->n", r, r)
    return out


# ----------------------------------------------------------------------------- resumable database encoding


def _npy_header(dtype: np.dtype, shape: tuple) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def _open_shared_npy(path: str, dtype: np.dtype, shape: tuple) -> np.memmap:
    """A writable memmap of a .npy file that every process may create or open at once: the header bytes and
    the file size are the same whoever writes them, and the file is only ever grown, so nobody's finished rows
    are lost."""
    header = _npy_header(dtype, shape)
    size = len(header) + int(np.prod(shape)) * dtype.itemsize
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, header, 0)
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return np.memmap(path, dtype=dtype, mode="r+", offset=len(header), shape=tuple(shape))


def process_slice(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """The contiguous rows [lo, hi) that process process_index of process_count encodes."""
    return n * process_index // process_count, n * (process_index + 1) // process_count


def _progress_path(out_dir: str, r: int, R: int) -> str:
    return os.path.join(out_dir, f"done.p{r}of{R}.json")


def encode_database(codec, x, out_dir, *, part_size: int = DEFAULT_PART, process_index: int | None = None,
                    process_count: int | None = None, batch_size: int | None = None,
                    progress: bool = False) -> str:
    """Encode x with the codec into `out_dir/codes.npy` (memory-mapped), in parts; resumable.

    Process `process_index` of `process_count` (default: jax's) encodes the contiguous rows
    process_slice(n, r, R), part by part. After each part its codes are flushed to disk and
    `done.p{r}of{R}.json` records the rows finished, so a killed build that is called again with the same
    arguments continues from the last finished part. `manifest.json` names the codec (fingerprint), the
    database size and the partition; calling again with another codec, database size, part size or process
    count on the same folder is an error. Read the result with `open_codes` (which refuses an unfinished build).

    Returns the folder's absolute path.
    """
    cfg = codec.config
    x = checks.vectors(x, cfg.d, "database vectors")
    part_size = checks.batch_size(part_size, "part_size")
    R = jax.process_count() if process_count is None else int(process_count)
    r = jax.process_index() if process_index is None else int(process_index)
    if R < 1 or not 0 <= r < R:
        raise QincoInputError(f"process_index must be in [0, process_count), got {r} of {R}")
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    n, ncol = x.shape[0], num_codes(cfg)
    dtype = code_dtype(cfg)
    manifest = {"format": CODES_FORMAT, "n": n, "num_codes": ncol, "dtype": dtype.str, "part_size": part_size,
                "process_count": R, "fingerprint": fingerprint(codec), "nlist": nlist_of(codec), "K": cfg.K,
                "M": cfg.M}
    mpath = os.path.join(out_dir, MANIFEST)
    if os.path.exists(mpath):
        old = read_json(mpath, "codes folder")
        diff = sorted(k for k in manifest if old.get(k) != manifest[k])
        if diff:
            what = "; ".join(f"{k}: {str(old.get(k))[:12]!r} there, {str(manifest[k])[:12]!r} now" for k in diff)
            other = "made with another codec" if "fingerprint" in diff else "with other settings"
            raise QincoInputError(f"{out_dir} holds a codes build {other} ({what}); use another folder or delete it")
    else:
        write_json(mpath, manifest)
    codes = _open_shared_npy(os.path.join(out_dir, CODES_FILE), dtype, (n, ncol))
    lo, hi = process_slice(n, r, R)
    ppath = _progress_path(out_dir, r, R)
    done = read_json(ppath, "codes progress")["rows_done"] if os.path.exists(ppath) else lo
    if not lo <= done <= hi:
        raise QincoInputError(f"{ppath} records {done} rows done, outside this process's slice [{lo}, {hi})")
    with Progress(hi - lo, desc=f"encode p{r}", enabled=progress) as bar:
        bar.update(done - lo)
        for start in range(done, hi, part_size):
            stop = min(hi, start + part_size)
            codes[start:stop] = codec_mod.encode(codec, x[start:stop], batch_size=batch_size)
            codes.flush()
            write_json(ppath, {"rows_done": stop, "lo": lo, "hi": hi})
            bar.update(stop - start)
    if done == lo and hi == lo:
        write_json(ppath, {"rows_done": hi, "lo": lo, "hi": hi})
    del codes
    return out_dir


def codes_status(out_dir) -> dict:
    """{'n': rows, 'done': rows finished by all processes, 'complete': bool, 'manifest': ...} of a codes folder."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    manifest = read_json(os.path.join(out_dir, MANIFEST), "codes folder")
    if manifest.get("format") != CODES_FORMAT:
        raise QincoInputError(f"{out_dir}: not a codes folder (format {manifest.get('format')!r})")
    n, R, done = manifest["n"], manifest["process_count"], 0
    for r in range(R):
        lo, hi = process_slice(n, r, R)
        p = _progress_path(out_dir, r, R)
        done += (read_json(p, "codes progress")["rows_done"] - lo) if os.path.exists(p) else 0
    return {"n": n, "done": done, "complete": done == n, "manifest": manifest}


def open_codes(out_dir, codec=None) -> np.ndarray:
    """The (n, num_codes) codes of a finished `encode_database` folder, memory-mapped read-only.

    An unfinished build (killed, or some process not done) is an error, as is a codec other than the one the
    codes were made with (when codec is given).
    """
    st = codes_status(out_dir)
    m = st["manifest"]
    if not st["complete"]:
        raise QincoInputError(
            f"{out_dir}: the database encoding is unfinished ({st['done']:,} of {st['n']:,} rows encoded; "
            "the build was interrupted): run encode_database / `eval/search.py build` again with the same "
            "arguments to resume it")
    if codec is not None and fingerprint(codec) != m["fingerprint"]:
        raise QincoInputError(f"{out_dir}: these codes were made with another codec (fingerprint "
                              f"{m['fingerprint'][:12]}, this codec {fingerprint(codec)[:12]})")
    codes = np.load(os.path.join(os.fspath(out_dir), CODES_FILE), mmap_mode="r")
    if codes.shape != (m["n"], m["num_codes"]):
        raise QincoInputError(f"{out_dir}: {CODES_FILE} has shape {codes.shape}, the manifest says "
                              f"({m['n']}, {m['num_codes']})")
    return codes


# ----------------------------------------------------------------------------- faiss index over the codes


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
                steps, lists = _split_codes(c, K, np.zeros((index.nlist, 1)))
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


def decode_listnos(coarse: np.ndarray) -> np.ndarray:
    """List ids from faiss's little-endian coarse-code bytes (..., coarse_code_size) as int64."""
    coarse = np.asarray(coarse, np.uint8).astype(np.int64)
    return (coarse << (8 * np.arange(coarse.shape[-1], dtype=np.int64))).sum(-1)


def additive_distances(tables: np.ndarray, xq: np.ndarray, codes: np.ndarray,
                       centroids: np.ndarray | None = None) -> np.ndarray:
    """Brute-force reference: ||q - (c[list] + sum_m T_m[i_m])||^2 for each query and each of its candidate code
    rows (nq, k, M (+1)); float64."""
    xq = np.asarray(xq, np.float64)
    nq, k = codes.shape[:2]
    flat = codes.reshape(nq * k, -1)
    if centroids is not None:
        rec = np.asarray(centroids, np.float64)[flat[:, 0]] + additive_decode(tables, flat[:, 1:])
    else:
        rec = additive_decode(tables, flat).astype(np.float64)
    diff = xq[:, None, :] - rec.reshape(nq, k, -1)
    return np.einsum("qkd,qkd->qk", diff, diff)


# ----------------------------------------------------------------------------- pairwise additive decoder

PAIRWISE = "pairwise.npz"


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
    def load(cls, path) -> "PairwiseDecoder":
        with np.load(os.fspath(path), allow_pickle=False) as z:
            return cls(**{k: z[k] for k in z.files})


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


SHRINKS = (0.5, 2.0, 8.0, 32.0)


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
    steps, lists = _split_codes(np.asarray(codes), K, centroids)
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


# ----------------------------------------------------------------------------- search pipeline


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
        xhat = codec_mod.decode(p.codec, flat).reshape(codes.shape[:2] + (-1,))
        t3 = time.perf_counter()
        D, I = _top(_l2(q, xhat), I, k)
        D_out[b0:b0 + len(q)], I_out[b0:b0 + len(q)] = D, I
        times["decode"] += t3 - t2
        times["rerank"] += time.perf_counter() - t3
    times["total"] = time.perf_counter() - t_all
    return SearchResult(D_out, I_out, I_short, times)


# ----------------------------------------------------------------------------- index folders

INDEX_META = "index.json"
INDEX_FAISS = "index.faiss"
TABLES = "tables.npy"
DB_CODES = "db_codes"


def save_index(out_dir, codec, index, tables: np.ndarray, *, pairwise=None, info: dict | None = None) -> str:
    """Write the faiss index, the tables, an optional pairwise decoder and index.json (with the codec's
    fingerprint) into out_dir; the database codes are expected in out_dir/db_codes (encode_database)."""
    import faiss

    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    cfg = codec.config
    faiss.write_index(index, os.path.join(out_dir, INDEX_FAISS + ".tmp"))
    os.replace(os.path.join(out_dir, INDEX_FAISS + ".tmp"), os.path.join(out_dir, INDEX_FAISS))
    np.save(os.path.join(out_dir, TABLES), np.asarray(tables, np.float32))
    if pairwise is not None:
        pairwise.save(os.path.join(out_dir, PAIRWISE))
    elif os.path.exists(os.path.join(out_dir, PAIRWISE)):
        os.unlink(os.path.join(out_dir, PAIRWISE))
    meta = {"format": INDEX_FORMAT, "fingerprint": fingerprint(codec), "config": cfg.to_dict(),
            "nlist": nlist_of(codec), "ntotal": int(index.ntotal), "pairwise": pairwise is not None,
            **(info or {})}
    write_json(os.path.join(out_dir, INDEX_META), meta)
    return out_dir


def read_index_meta(index_dir) -> dict:
    """The index.json of an index folder (checked to be one)."""
    path = os.path.join(os.fspath(index_dir), INDEX_META)
    if not os.path.exists(path):
        raise QincoInputError(f"{index_dir} is not a search index folder (no {INDEX_META}; build one with "
                              "`eval/search.py build`)")
    meta = read_json(path, "search index")
    if meta.get("format") != INDEX_FORMAT:
        raise QincoInputError(f"{index_dir}: not a search index folder (format {meta.get('format')!r})")
    return meta


def load_pipeline(index_dir, codec) -> Pipeline:
    """A Pipeline from an index folder written by save_index, for the codec it was built with.

    An index built with another codec (fingerprint), or unfinished database codes, is a clear error.
    """
    import faiss

    index_dir = os.path.abspath(os.fspath(index_dir))
    meta = read_index_meta(index_dir)
    if meta["nlist"] and not nlist_of(codec):
        require_ivf(codec, f"the IVF index {index_dir} (nlist={meta['nlist']})")
    if not meta["nlist"] and nlist_of(codec):
        require_flat(codec, f"the flat index {index_dir}")
    if meta["fingerprint"] != fingerprint(codec):
        raise QincoInputError(
            f"{index_dir} was built with another model (codec fingerprint {meta['fingerprint'][:12]}, this "
            f"model's {fingerprint(codec)[:12]}; built from {meta.get('model', 'an unknown path')})")
    db_codes = open_codes(os.path.join(index_dir, DB_CODES), codec)
    index = faiss.read_index(os.path.join(index_dir, INDEX_FAISS))
    if index.ntotal != db_codes.shape[0]:
        raise QincoInputError(f"{index_dir}: the faiss index holds {index.ntotal:,} vectors, the codes "
                              f"{db_codes.shape[0]:,}")
    tables = np.load(os.path.join(index_dir, TABLES))
    pw = os.path.join(index_dir, PAIRWISE)
    pairwise = PairwiseDecoder.load(pw) if os.path.exists(pw) else None
    return Pipeline(codec, index, tables, db_codes, pairwise)
