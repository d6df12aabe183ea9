"""Bytes per vector of a search index folder, measured from the files `eval/search.py build` wrote, beside faiss's
IVF-PQ and IVF-RQ (with a 1-byte quantized norm) of the same nlist, M and bits per code.

    python eval/index_bytes.py runs/devsift_ivf/index

Rows: the codes store (db_codes/: step codes and list ids, without the .npy headers), the codes store as the
earlier one-file format wrote it (every column at the list-id width), the faiss index over the QINCo codes
(in memory: code + quantized norm + 8-byte id per vector, the list implicit; on disk: index.faiss over ntotal,
which adds the coarse quantizer and list sizes), and the faiss baselines: code_size in the inverted lists plus
the 8-byte id, and sa_code_size (a standalone code: the list id in its coarse-code bytes, then the code).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

if __package__ in (None, ""):  # `python eval/index_bytes.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval import report  # noqa: E402
from qinco_jax import search as S  # noqa: E402
from qinco_jax.search.codes import part_path  # noqa: E402

ID_BYTES = 8  # faiss's idx_t in the inverted lists


def measure(index_dir: str) -> list[dict]:
    import faiss

    store = os.path.join(index_dir, S.DB_CODES)
    st = S.codes_status(store)
    s, n = st["manifest"], st["n"]
    data = 0
    for r in range(s["process_count"]):
        for what in ("steps.npy", "lists.npy") if s["nlist"] else ("steps.npy",):
            with open(part_path(store, r, s["process_count"], what), "rb") as f:
                np.lib.format.read_magic(f)
                np.lib.format.read_array_header_1_0(f)
                data += os.fstat(f.fileno()).st_size - f.tell()
    steps = np.dtype(s["steps_dtype"]).itemsize * s["M"]
    lists = data / n - steps
    # the earlier format stored every column at the width of the widest (the codec's code_dtype)
    old_width = max(np.dtype(s["steps_dtype"]).itemsize, np.dtype(s["lists_dtype"] or "u1").itemsize)
    M, nlist = s["M"], s["nlist"]
    nbits = int(round(np.log2(s["K"])))
    index = faiss.read_index(os.path.join(index_dir, S.INDEX_FAISS))
    rows = [
        {"what": "codes store db_codes/ (step codes + list id)", "codes": steps, "norm": 0, "list": lists, "ids": 0,
         "total": data / n},
        {"what": "codes store, earlier one-file format", "codes": old_width * M, "norm": 0,
         "list": old_width if nlist else 0, "ids": 0, "total": old_width * (M + (nlist > 0))},
        {"what": "faiss index over the QINCo codes, in memory", "codes": (M * nbits + 7) // 8,
         "norm": index.code_size - (M * nbits + 7) // 8, "list": 0, "ids": ID_BYTES if nlist else 0,
         "total": index.code_size + (ID_BYTES if nlist else 0)},
        {"what": "index.faiss on disk / ntotal", "total": os.path.getsize(os.path.join(index_dir, S.INDEX_FAISS))
         / index.ntotal},
    ]
    ivf_prefix = f"IVF{nlist}," if nlist else ""
    for name in (f"{ivf_prefix}PQ{M}x{nbits}", f"{ivf_prefix}RQ{M}x{nbits}_Nqint8"):
        b = faiss.index_factory(index.d, name)
        ivf = faiss.extract_index_ivf(b) if nlist else b
        code = (M * nbits + 7) // 8
        rows.append({"what": f"faiss {name}, in memory", "codes": code, "norm": ivf.code_size - code, "list": 0,
                     "ids": ID_BYTES if nlist else 0, "total": ivf.code_size + (ID_BYTES if nlist else 0)})
        rows.append({"what": f"faiss {name}, sa_code_size + id", "codes": code, "norm": ivf.code_size - code,
                     "list": b.sa_code_size() - ivf.code_size, "ids": ID_BYTES, "total": b.sa_code_size() + ID_BYTES})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("index", help="index folder from `eval/search.py build`")
    args = ap.parse_args(argv)
    rows = measure(args.index)
    print(report.format_table(rows, ("what", "codes", "norm", "list", "ids", "total")))


if __name__ == "__main__":
    main()
