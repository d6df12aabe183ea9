"""Index folders: the faiss index, the additive tables, an optional pairwise decoder, the database codes and
index.json (naming the codec by its fingerprint) in one folder, written by save_index and read back as a Pipeline
for the codec they were built with.

An index folder is untrusted input, like a checkpoint: index.json goes through the bounded JSON reader and a
schema; every member is a regular file inside the folder (no link leads out); index.faiss is walked record by
record before faiss reads it (faiss_file), its sha256 must equal index.json's, and its d, M, nbits, nlist,
ntotal, metric, codebooks, coarse centroids and stored codes must be the codec's, the tables' and the database
codes'; tables.npy and pairwise.npz are checked from their headers before they are read. Paths that index.json
records (model, db, train) are relative to the folder and followed only when they stay inside it.
"""

from __future__ import annotations

import os

import numpy as np

from qinco_jax.checks import QincoInputError
from qinco_jax.files import open_regular, read_bounded_json, write_json
from qinco_jax.schema import BOOL, DICT, FLOAT, INT, NONE, STR, Field, check
from qinco_jax.search import faiss_file
from qinco_jax.search.common import fingerprint, ivf_centroids, nlist_of, require_flat, require_ivf
from qinco_jax.search.index import NORMS
from qinco_jax.search.pairwise import PairwiseDecoder
from qinco_jax.search.pipeline import Pipeline
from qinco_jax.search.store import open_codes

INDEX_FORMAT = "qinco_jax.search_index/1"
INDEX_META = "index.json"
INDEX_FAISS = "index.faiss"
TABLES = "tables.npy"
PAIRWISE = "pairwise.npz"
DB_CODES = "db_codes"
MAX_ROWS = 1 << 40

_HEX64 = Field((STR,), max_len=64)
_PATH = Field((STR, NONE), required=False)
META_SCHEMA = {
    "format": Field((STR,), choices=(INDEX_FORMAT,)), "fingerprint": _HEX64, "faiss_sha256": _HEX64,
    "config": Field((DICT,)), "nlist": Field((INT,), 0, 1 << 24), "ntotal": Field((INT,), 0, MAX_ROWS),
    "pairwise": Field((BOOL,)), "code_bytes": Field((INT,), 1, 1 << 16, required=False),
    "model": _PATH, "model_source": _PATH, "db": _PATH, "train": _PATH, "nt": Field((INT,), 0, MAX_ROWS, required=False),
    "nb": Field((INT,), 0, MAX_ROWS, required=False), "norm": Field((STR,), choices=NORMS, required=False),
    "hnsw": Field((INT,), 0, 1 << 12, required=False), "times": Field((DICT,), required=False),
    "additive_mse_train": Field((FLOAT,), required=False),
    "pairwise_tables": Field((INT,), 0, 1 << 16, required=False),
    "pairwise_mse_train": Field((FLOAT, NONE), required=False),
    "pairwise_tables_kept": Field((INT,), 0, 1 << 16, required=False),
    "mse_db_first": Field((DICT,), required=False),
}


def relative_path(index_dir, path) -> str:
    """path as index.json records it: relative to the index folder (it may lead out; see folder_path)."""
    return os.path.relpath(os.path.abspath(os.fspath(path)), os.path.abspath(os.fspath(index_dir)))


def folder_path(index_dir, rel, what: str, flag: str | None = None) -> str:
    """The absolute path of a member or recorded path `rel` of an index folder, which must stay inside it
    (after links); a QincoInputError otherwise, naming the flag that supplies the path instead."""
    root = os.path.realpath(os.fspath(index_dir))
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\x00" in rel:
        where = f"{rel!r}" if isinstance(rel, str) else "no path"
    else:
        full = os.path.realpath(os.path.join(root, rel))
        if os.path.commonpath([root, full]) == root and full != root:
            return full
        where = f"{rel!r}, outside the index folder"
    fix = f"; pass {flag} PATH to name it" if flag else ""
    raise QincoInputError(f"{index_dir}: index.json names the {what} as {where}, which is not followed{fix}")


def save_index(out_dir, codec, index, tables: np.ndarray, *, pairwise=None, info: dict | None = None) -> str:
    """Write the faiss index, the tables, an optional pairwise decoder and index.json (with the codec's
    fingerprint and the sha256 of index.faiss) into out_dir; the database codes are expected in
    out_dir/db_codes (encode_database). Paths in `info` (model, db, train) should be relative_path()s."""
    import faiss

    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    cfg = codec.config
    tmp = os.path.join(out_dir, INDEX_FAISS + ".tmp")
    faiss.write_index(index, tmp)
    digest = faiss_file.sha256_file(tmp)
    os.replace(tmp, os.path.join(out_dir, INDEX_FAISS))
    np.save(os.path.join(out_dir, TABLES), np.asarray(tables, np.float32))
    if pairwise is not None:
        pairwise.save(os.path.join(out_dir, PAIRWISE))
    elif os.path.exists(os.path.join(out_dir, PAIRWISE)):
        os.unlink(os.path.join(out_dir, PAIRWISE))
    meta = {"format": INDEX_FORMAT, "fingerprint": fingerprint(codec), "config": cfg.to_dict(),
            "nlist": nlist_of(codec), "ntotal": int(index.ntotal), "pairwise": pairwise is not None,
            "code_bytes": int(index.code_size), "faiss_sha256": digest, **(info or {})}
    write_json(os.path.join(out_dir, INDEX_META), meta)
    return out_dir


def read_index_meta(index_dir) -> dict:
    """The index.json of an index folder, checked to be one (bounded read, then the schema)."""
    path = os.path.join(os.fspath(index_dir), INDEX_META)
    if not os.path.lexists(path):
        state = ""
        if any(os.path.exists(os.path.join(os.fspath(index_dir), sub)) for sub in (DB_CODES, "train_codes")):
            state = (" but it holds database codes: the build was interrupted before the index was written; run "
                     "the same `eval/search.py build` command again to resume it")
        raise QincoInputError(f"{index_dir} is not a search index folder (no {INDEX_META}{state}; build one with "
                              "`eval/search.py build`)" if not state else
                              f"{index_dir} is not a finished search index folder (no {INDEX_META}{state})")
    meta = read_bounded_json(folder_path(index_dir, INDEX_META, "index metadata"), "search index", max_bytes=1 << 20)
    if meta.get("format") != INDEX_FORMAT:
        raise QincoInputError(f"{index_dir}: not a search index folder (format {str(meta.get('format'))[:40]!r})")
    if "faiss_sha256" not in meta:
        raise QincoInputError(f"{index_dir}: index.json has no checksum of {INDEX_FAISS} (an index built before "
                              "checksums were kept); run `eval/search.py build` again to rewrite it (the encoded "
                              "codes are kept)")
    return check(meta, META_SCHEMA, f"search index {path}")


def _load_tables(path: str, codec) -> np.ndarray:
    cfg = codec.config
    want = (cfg.M, cfg.K, cfg.d)
    with os.fdopen(open_regular(path, "tables"), "rb") as f:
        try:
            if np.lib.format.read_magic(f) != (1, 0):  # what np.save writes; 2.0 headers may claim 4 GB
                raise ValueError("unsupported .npy version")
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=10000)
        except (ValueError, OSError, SyntaxError) as e:
            raise QincoInputError(f"{path}: not an .npy file ({e})") from None
        if shape != want or dtype != np.dtype("<f4") or fortran:
            raise QincoInputError(f"{path}: a {dtype} array of shape {shape}; the codec's tables are float32 {want}")
        raw = f.read(int(np.prod(want)) * 4 + 1)
    if len(raw) != int(np.prod(want)) * 4:
        raise QincoInputError(f"{path}: {len(raw):,} data bytes, the header's shape needs {int(np.prod(want)) * 4:,}")
    tables = np.frombuffer(raw, np.float32).reshape(want).copy()
    if not np.isfinite(tables).all():
        raise QincoInputError(f"{path}: the tables hold NaN or inf")
    return tables


def load_faiss(path: str, codec, tables: np.ndarray, db_codes: np.ndarray, sha256: str):
    """The faiss index of an index folder, checked (see the module doc) before and after faiss reads it."""
    import faiss

    cfg = codec.config
    raw = faiss_file.read_bytes(path)
    if faiss_file.sha256_bytes(raw) != sha256:
        raise QincoInputError(f"{path}: the file's sha256 differs from the one index.json recorded at build time "
                              "(the file was changed or damaged); rebuild the index with `eval/search.py build`")
    h = faiss_file.read_header(path, raw)
    nbits = int(round(np.log2(cfg.K)))
    got = (h.kind == "IwRQ", h.d, h.M, tuple(h.nbits), h.nlist, h.ntotal)
    want = (bool(nlist_of(codec)), cfg.d, cfg.M, (nbits,) * cfg.M, nlist_of(codec), db_codes.shape[0])
    if got != want:
        names = ("IVF", "d", "M", "nbits", "nlist", "ntotal")
        diff = ", ".join(f"{n} {g} (expected {w})" for n, g, w in zip(names, got, want) if g != w)
        raise QincoInputError(f"{path}: the faiss index does not match the codec and its database codes: {diff}")
    try:
        index = faiss.deserialize_index(np.frombuffer(raw, np.uint8))
    except RuntimeError as e:
        raise QincoInputError(f"{path}: faiss cannot read the index: {str(e)[:300]}") from None
    if not np.array_equal(faiss.vector_to_array(index.rq.codebooks).reshape(tables.shape), tables):
        raise QincoInputError(f"{path}: the faiss index's codebooks are not the folder's {TABLES}")
    if h.nlist:
        q = faiss.downcast_index(index.quantizer)
        if h.quantizer == "IHNf":
            faiss_file.check_hnsw(q, path)
        if not np.array_equal(q.reconstruct_n(0, h.nlist), ivf_centroids(codec)):
            raise QincoInputError(f"{path}: the coarse quantizer's centroids are not the codec's IVF centroids")
    faiss_file.check_codes(raw, h, db_codes, path)
    return index


def load_pipeline(index_dir, codec) -> Pipeline:
    """A Pipeline from an index folder written by save_index, for the codec it was built with.

    An index built with another codec (fingerprint), unfinished database codes, or any member that fails its
    checks (see the module doc) is a clear error.
    """
    index_dir = os.path.abspath(os.fspath(index_dir))
    meta = read_index_meta(index_dir)
    if meta["nlist"] and not nlist_of(codec):
        require_ivf(codec, f"the IVF index {index_dir} (nlist={meta['nlist']})")
    if not meta["nlist"] and nlist_of(codec):
        require_flat(codec, f"the flat index {index_dir}")
    if meta["fingerprint"] != fingerprint(codec):
        raise QincoInputError(
            f"{index_dir} was built with another model (codec fingerprint {meta['fingerprint'][:12]}, this "
            f"model's {fingerprint(codec)[:12]}; built from {str(meta.get('model', 'an unknown path'))[:200]})")
    db_codes = open_codes(folder_path(index_dir, DB_CODES, "database codes"), codec)
    if db_codes.shape[0] != meta["ntotal"]:
        raise QincoInputError(f"{index_dir}: index.json says {meta['ntotal']:,} vectors, the codes hold "
                              f"{db_codes.shape[0]:,}")
    tables = _load_tables(folder_path(index_dir, TABLES, "tables"), codec)
    index = load_faiss(folder_path(index_dir, INDEX_FAISS, "faiss index"), codec, tables, db_codes,
                       meta["faiss_sha256"])
    pairwise = None
    if meta["pairwise"]:
        pairwise = PairwiseDecoder.load(folder_path(index_dir, PAIRWISE, "pairwise decoder"), codec)
    return Pipeline(codec, index, tables, db_codes, pairwise)
