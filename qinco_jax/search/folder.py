"""Index folders: the faiss index, the additive tables, an optional pairwise decoder, the database codes and
index.json (naming the codec by its fingerprint) in one folder, written by save_index and read back as a Pipeline
for the codec they were built with."""

from __future__ import annotations

import os

import numpy as np

from qinco_jax.checks import QincoInputError
from qinco_jax.files import read_bounded_json, write_json
from qinco_jax.search.common import fingerprint, nlist_of, require_flat, require_ivf
from qinco_jax.search.pairwise import PairwiseDecoder
from qinco_jax.search.pipeline import Pipeline
from qinco_jax.search.scan import SCAN_LISTS, load_lists
from qinco_jax.search.store import open_codes

INDEX_FORMAT = "qinco_jax.search_index/1"
INDEX_META = "index.json"
INDEX_FAISS = "index.faiss"
TABLES = "tables.npy"
PAIRWISE = "pairwise.npz"
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
    meta = read_bounded_json(path, "search index")
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
    sl = os.path.join(index_dir, SCAN_LISTS)  # folders built before the scan lists: derived at first search
    lists = (load_lists(sl, n=db_codes.shape[0], M=tables.shape[0], K=tables.shape[1], nlist=max(meta["nlist"], 1))
             if os.path.exists(sl) else None)
    return Pipeline(codec, index, tables, db_codes, pairwise, lists)
