"""Tampered index folders against load_pipeline: index.json, recorded paths, index.faiss, tables.npy and
pairwise.npz, each copy changed in one way as an attacker (or a damaged disk) would.

One small IVF index folder (HNSW coarse quantizer, pairwise decoder) is built once; every case copies it,
changes one thing, and must get a QincoInputError within the time and memory budgets of
tests/test_fuzz_loaders.py. Cases that change index.faiss and also rewrite index.json's checksum stand for an
attacker who knows the format: the checks behind the checksum must catch them too.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile

import jax
import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax import codec as codec_mod
from qinco_jax import search as S
from qinco_jax.checks import QincoInputError
from qinco_jax.search import faiss_file

from test_fuzz_loaders import within_budget

CFG = qj.QincoConfig(d=16, K=16, M=3, L=1, h=16, nlist=8)


def _vectors(codec, n, seed):
    rng = np.random.default_rng(seed)
    codes = np.concatenate([rng.integers(0, CFG.nlist, (n, 1)), rng.integers(0, CFG.K, (n, CFG.M))], 1)
    x = qj.decode(codec, codes)
    return (x + rng.normal(scale=0.3 * codec.scale, size=x.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    params = dict(jax.device_get(codec_mod.init_params(CFG, jax.random.key(0))))
    params["codebook0"] = np.asarray(params["codebook0"]) * 4
    codec = qj.Codec(CFG, params, 4.0)
    xt, xb = _vectors(codec, 800, 1), _vectors(codec, 300, 2)
    root = tmp_path_factory.mktemp("fuzz_index")
    d = root / "idx"
    ct = qj.encode(codec, xt)
    cent = S.ivf_centroids(codec)
    tables = S.lstsq_tables(ct, xt, CFG.K, centroids=cent)
    db = S.open_codes(S.encode_database(codec, xb, d / S.DB_CODES, part_size=128), codec)
    index = S.new_index(tables, cent, norm="qint8", train_norms=S.additive_norms(tables, ct[:, 1:]), hnsw=4)
    S.add_codes(index, tables, db)
    pw = S.train_pairwise(ct, xt, CFG.K, 2, centroids=cent, base=tables, n_sub=1)
    S.save_index(d, codec, index, tables, pairwise=pw, info={"model": "codec", "db": "../db.fvecs"})
    S.load_pipeline(d, codec)  # the untouched folder loads
    (root / "outside.bin").write_bytes(b"secret" * 100)
    return {"codec": codec, "dir": d, "root": root, "tables": tables, "db": np.asarray(db), "xb": xb, "xt": xt,
            "cent": cent}


def _copy(built, tmp_path):
    out = tmp_path / "idx"
    shutil.copytree(built["dir"], out)
    return out


def _meta(d):
    return json.loads((d / S.INDEX_META).read_text())


def _write_meta(d, meta):
    (d / S.INDEX_META).write_text(json.dumps(meta))


def _set_faiss(d, raw: bytes, checksum=True):
    """Replace index.faiss; with checksum, index.json records the new file's sha256 (an informed attacker)."""
    (d / S.INDEX_FAISS).write_bytes(raw)
    if checksum:
        meta = _meta(d)
        meta["faiss_sha256"] = faiss_file.sha256_bytes(raw)
        _write_meta(d, meta)


def _faiss_bytes(index) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def _refused(built, d, match):
    return within_budget(S.load_pipeline, d, built["codec"], error=QincoInputError, match=match)


# ----------------------------------------------------------------------------- index.json


META_CASES = {
    "a list": ([1, 2], "expected an object"),
    "missing nlist": ("del nlist", "'nlist' is missing"),
    "ntotal a string": (("ntotal", "300"), "'ntotal' must be int"),
    "ntotal a bool": (("ntotal", True), "'ntotal' must be int"),
    "nlist huge": (("nlist", 10 ** 30), "outside"),
    "ntotal negative": (("ntotal", -1), "outside"),
    "pairwise an int": (("pairwise", 1), "'pairwise' must be bool"),
    "fingerprint a dict": (("fingerprint", {}), "'fingerprint' must be str"),
    "other fingerprint": (("fingerprint", "0" * 64), "another model"),
    "no checksum": ("del faiss_sha256", "no checksum"),
    "other format": (("format", "x"), "not a search index"),
    "ntotal off by one": (("ntotal", 301), "index.json says 301"),
    "norm unknown": (("norm", "qint3"), "'norm'"),
}


@pytest.mark.parametrize("case", sorted(META_CASES))
def test_tampered_index_json(built, tmp_path, case):
    change, match = META_CASES[case]
    d = _copy(built, tmp_path)
    meta = _meta(d)
    if isinstance(change, list):
        meta = change
    elif isinstance(change, str):
        del meta[change.split()[1]]
    else:
        meta[change[0]] = change[1]
    _write_meta(d, meta)
    _refused(built, d, match)


def test_index_json_not_json_deep_or_big(built, tmp_path):
    d = _copy(built, tmp_path)
    (d / S.INDEX_META).write_bytes(os.urandom(4000))
    _refused(built, d, "cannot read")
    (d / S.INDEX_META).write_text("[" * 100_000 + "]" * 100_000)
    _refused(built, d, "nests more than|cannot read")
    (d / S.INDEX_META).write_text(json.dumps({"pad": "x" * (2 << 20)}))
    _refused(built, d, "over the")


def test_index_json_fifo_and_link_out(built, tmp_path):
    d = _copy(built, tmp_path)
    os.unlink(d / S.INDEX_META)
    os.mkfifo(d / S.INDEX_META)  # used to block forever in open
    _refused(built, d, "not a regular file")
    os.unlink(d / S.INDEX_META)
    outside = tmp_path / "elsewhere.json"
    outside.write_text((built["dir"] / S.INDEX_META).read_text())
    os.symlink(outside, d / S.INDEX_META)
    _refused(built, d, "outside the index folder")


@pytest.mark.parametrize("rel", ["/etc/passwd", "../../outside.bin", "../idx/../../x", "", "codec/../.."])
def test_recorded_paths_stay_inside(built, rel):
    with pytest.raises(QincoInputError, match="not followed; pass --model"):
        S.folder_path(built["dir"], rel, "model", "--model")
    assert S.folder_path(built["dir"], "codec", "model", "--model") == os.path.realpath(built["dir"] / "codec")


@pytest.mark.parametrize("member", [S.INDEX_FAISS, S.TABLES, S.PAIRWISE])
def test_member_linked_out_of_the_folder(built, tmp_path, member):
    d = _copy(built, tmp_path)
    shutil.copy(d / member, tmp_path / member)
    os.unlink(d / member)
    os.symlink(tmp_path / member, d / member)
    _refused(built, d, "outside the index folder")
    os.unlink(d / member)
    os.mkfifo(d / member)
    _refused(built, d, "not a regular file")


# ----------------------------------------------------------------------------- index.faiss


def test_faiss_truncated_flipped_padded(built, tmp_path):
    d = _copy(built, tmp_path)
    raw = (d / S.INDEX_FAISS).read_bytes()
    for cut in (0, 3, 40, len(raw) // 2, len(raw) - 1):
        _set_faiss(d, raw[:cut])
        _refused(built, d, "past the end|truncated|runs past")
    _set_faiss(d, raw + b"\0" * 8)
    _refused(built, d, "follow the last record")
    flipped = bytearray(raw)
    flipped[len(raw) // 2: len(raw) // 2 + 8] = bytes(255 - b for b in flipped[len(raw) // 2: len(raw) // 2 + 8])
    _set_faiss(d, bytes(flipped), checksum=False)
    _refused(built, d, "sha256")
    (d / S.INDEX_FAISS).unlink()
    os.mkfifo(d / S.INDEX_FAISS)
    _refused(built, d, "not a regular file")


def test_faiss_flipped_codes_with_a_new_checksum(built, tmp_path):
    d = _copy(built, tmp_path)
    raw = bytearray((d / S.INDEX_FAISS).read_bytes())
    h = faiss_file.read_header(d / S.INDEX_FAISS)
    raw[h.data_offset] ^= 0x0F  # the first code byte of the first non-empty list
    _set_faiss(d, bytes(raw))
    _refused(built, d, "not the folder's database codes")
    raw = bytearray((built["dir"] / S.INDEX_FAISS).read_bytes())
    n0 = next(n for n in h.list_sizes if n)
    raw[h.data_offset + n0 * h.code_size: h.data_offset + n0 * h.code_size + 8] = (10 ** 9).to_bytes(8, "little")
    _set_faiss(d, bytes(raw))  # an id out of range
    _refused(built, d, "ids outside")


def test_faiss_huge_vector_size(built, tmp_path):
    d = _copy(built, tmp_path)
    raw = bytearray((d / S.INDEX_FAISS).read_bytes())
    # the HNSW quantizer's assign_probas vector size, right after the two headers
    at = 4 + 33 + 16 + 4 + 33
    raw[at: at + 8] = (1 << 60).to_bytes(8, "little")
    _set_faiss(d, bytes(raw))
    _refused(built, d, "does not fit|past the end")


def _other_index(built, kind):
    import faiss

    tables, cent, db = built["tables"], built["cent"], built["db"]
    if kind == "ivfflat":
        q = faiss.IndexFlatL2(CFG.d)
        idx = faiss.IndexIVFFlat(q, CFG.d, CFG.nlist)
        idx.train(cent)
        idx.add(built["xb"])
        q.this.disown()
        return idx
    if kind == "other M":
        t2 = np.concatenate([tables, tables[:1]])
        idx = S.new_index(t2, cent, norm="float")
        S.add_codes(idx, t2, np.concatenate([db, db[:, 1:2]], 1))
        return idx
    if kind == "other nlist":
        idx = S.new_index(tables, np.concatenate([cent, cent[:1] + 1]), norm="float")
        S.add_codes(idx, tables, db)
        return idx
    if kind == "other d":
        return S.new_index(tables[:, :, :8], cent[:, :8], norm="float")
    if kind == "other vectors":
        idx = S.new_index(tables, cent, norm="float")
        S.add_codes(idx, tables, db[::-1].copy())  # same codes, other ids
        return idx
    if kind == "other tables":
        idx = S.new_index(tables * 1.5, cent, norm="float")
        S.add_codes(idx, tables * 1.5, db)
        return idx
    if kind == "other centroids":
        idx = S.new_index(tables, cent + 0.5, norm="float")
        S.add_codes(idx, tables, db)
        return idx
    if kind == "flat":
        idx = S.new_index(tables, None, norm="float")
        S.add_codes(idx, tables, db[:, 1:])
        return idx
    if kind == "inner product":
        idx = faiss.IndexIVFResidualQuantizer(faiss.IndexFlatIP(CFG.d), CFG.d, CFG.nlist, CFG.M, 4,
                                              faiss.METRIC_INNER_PRODUCT)
        idx.quantizer.this.disown()
        return idx
    raise ValueError(kind)


@pytest.mark.parametrize("kind,match", [
    ("ivfflat", "IndexIVFFlat|a faiss record"), ("other M", "M 4"), ("other nlist", "nlist 9"),
    ("other d", "d 8"), ("other vectors", "not the folder's database codes"), ("other tables", "codebooks"),
    ("other centroids", "centroids"), ("flat", "IVF False"), ("inner product", "metric|IndexFlatL2")])
def test_faiss_other_index(built, tmp_path, kind, match):
    d = _copy(built, tmp_path)
    _set_faiss(d, _faiss_bytes(_other_index(built, kind)))
    _refused(built, d, match)


def test_faiss_on_disk_lists_pointing_outside(built, tmp_path):
    """faiss would open and memory-map the named data file (truncated: SIGBUS at the first search)."""
    import faiss

    d = _copy(built, tmp_path)
    index = faiss.read_index(str(d / S.INDEX_FAISS))
    lists_file = tmp_path / "lists.ondisk"
    od = faiss.OnDiskInvertedLists(index.nlist, index.code_size, str(lists_file))
    for lst in range(index.nlist):
        n = index.invlists.list_size(lst)
        if n:
            od.add_entries(lst, n, index.invlists.get_ids(lst), index.invlists.get_codes(lst))
    index.replace_invlists(od, True)
    od.this.disown()
    raw = _faiss_bytes(index)
    del index
    os.truncate(lists_file, 16)
    _set_faiss(d, raw)
    _refused(built, d, "on-disk inverted lists")


def test_faiss_malformed_hnsw_graph(built, tmp_path):
    import faiss

    d = _copy(built, tmp_path)
    index = faiss.read_index(str(d / S.INDEX_FAISS))
    q = faiss.downcast_index(index.quantizer)
    nb = faiss.vector_to_array(q.hnsw.neighbors)
    nb[0] = 10 ** 6
    faiss.copy_array_to_vector(nb, q.hnsw.neighbors)
    _set_faiss(d, _faiss_bytes(index))
    _refused(built, d, "HNSW")


# ----------------------------------------------------------------------------- tables.npy, pairwise.npz


def test_tables_tampered(built, tmp_path):
    d = _copy(built, tmp_path)
    for bad, match in ((built["tables"].astype(np.float64), "float64"), (built["tables"][:2], "shape"),
                       (np.array([{}], object), "object|shape"), (built["tables"] * np.inf, "NaN or inf")):
        np.save(d / S.TABLES, bad, allow_pickle=True)
        _refused(built, d, match)
    (d / S.TABLES).write_bytes(b"\x93NUMPY" + os.urandom(200))
    _refused(built, d, "not an .npy|tables")


def _pairwise(d):
    with np.load(d / S.PAIRWISE) as z:
        return {k: z[k] for k in z.files}


PAIRWISE_CASES = {
    "extra member": (lambda a: {**a, "evil": np.zeros(3)}, "entries"),
    "missing offsets": (lambda a: {k: v for k, v in a.items() if k != "offsets"}, "entries"),
    "tables float64": (lambda a: {**a, "tables": a["tables"].astype(np.float64)}, "float64"),
    "object pairs": (lambda a: {**a, "pairs": np.array([[None, 1]], object)}, "object"),
    "negative offsets": (lambda a: {**a, "offsets": a["offsets"] - a["offsets"][1]}, "offsets"),
    "pair out of range": (lambda a: {**a, "pairs": a["pairs"] + 50}, "pairs outside"),
    "sub-codes out of range": (lambda a: {**a, "ivf_subcodes": a["ivf_subcodes"] + 1000}, "sub-codes"),
    "nan tables": (lambda a: {**a, "tables": a["tables"] * np.nan}, "NaN"),
    "other centroids": (lambda a: {**a, "centroids": a["centroids"] + 1}, "centroids"),
    "wrong d": (lambda a: {**a, "tables": a["tables"][:, :8]}, "tables"),
}


@pytest.mark.parametrize("case", sorted(PAIRWISE_CASES))
def test_pairwise_tampered(built, tmp_path, case):
    change, match = PAIRWISE_CASES[case]
    d = _copy(built, tmp_path)
    np.savez(d / S.PAIRWISE, **change(_pairwise(d)))
    _refused(built, d, match)


def test_pairwise_decompression_bomb(built, tmp_path):
    """A 2.9 MB archive once inflated to 2.8 GB before any check."""
    d = _copy(built, tmp_path)
    a = _pairwise(d)
    rows = 1 << 22  # 256 MiB of float32 zeros at d=16, deflated to a few hundred KB
    with zipfile.ZipFile(d / S.PAIRWISE, "w", zipfile.ZIP_DEFLATED) as z:
        for k, v in a.items():
            if k != "tables":
                with z.open(k + ".npy", "w") as f:
                    np.lib.format.write_array(f, v)
        with z.open("tables.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (rows, 16)})
            chunk = bytes(1 << 22)
            for _ in range(rows * 64 // len(chunk)):
                f.write(chunk)
    assert (d / S.PAIRWISE).stat().st_size < 1 << 20
    _refused(built, d, "budget|tables")
    # the header says a small array but the entry declares more: refused before inflating
    with zipfile.ZipFile(d / S.PAIRWISE, "w", zipfile.ZIP_DEFLATED) as z:
        for k, v in a.items():
            with z.open(k + ".npy", "w") as f:
                np.lib.format.write_array(f, v)
                if k == "tables":
                    f.write(bytes(1 << 24))
    _refused(built, d, "declares")
    (d / S.PAIRWISE).write_bytes(os.urandom(3000))
    _refused(built, d, "not an .npz")
