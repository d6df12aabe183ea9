"""Search over QINCo codes: least-squares additive tables, resumable database encoding, faiss indexes that hold
the QINCo codes, and the search pipeline (additive shortlist -> optional pairwise decoder -> QINCo re-rank).

The pipeline, for a codec with an IVF step (`cfg.nlist > 0`, codes (n, 1 + M), column 0 the list id):

1. `lstsq_tables(codes_xt, xt, K, centroids)`: additive tables T (M, K, d) minimising
   ||x - c[list] - sum_m T_m[i_m]||^2 over training vectors (normal equations accumulated chunk by chunk).
2. `encode_database(codec, xb, dir)`: codes of the database in a memory-mapped file, in resumable parts,
   one contiguous slice per process.
3. `new_index(tables, centroids, train_norms=...)` then `add_codes(index, tables, codes)`: a faiss
   IndexIVFResidualQuantizer whose codebooks are T, whose coarse quantizer holds the IVF centroids and whose
   inverted lists receive the QINCo codes as they are (no faiss encoding), with the norms of the additive
   reconstruction.
4. `search(pipeline, xq, nprobe=..., nshort=...)`: IVF probe with look-up-table distances gives the top nshort
   with their codes; an optional pairwise additive decoder narrows them; QINCo decodes the survivors and an
   exact L2 re-rank gives the top k.

Codecs without IVF get the flat variant: an additive-quantizer scan over all codes for the shortlist.
Everything works in raw units (the codec's scale is applied by qj.encode / qj.decode).

Modules, each importing only those before it:
  common    codec kind (IVF / flat), code columns and dtype, IVF centroids, split_codes, fingerprint
  tables    least-squares additive tables, additive decode / norms / distances, targets
  store     the resumable codes store (encode_database, codes_status, open_codes)
  index     the faiss index over QINCo codes (new_index, add_codes, faiss code layouts)
  pairwise  the pairwise additive decoder (PairwiseDecoder, train_pairwise, ivf_subcodes)
  pipeline  Pipeline, search: shortlist, pairwise stage, QINCo re-rank
  faiss_file  index.faiss as untrusted input: its records walked before faiss reads it, its codes checked
  folder    index folders (save_index, read_index_meta, load_pipeline, folder_path)
This package only re-exports their public names.
"""

from qinco_jax.search.common import (code_dtype, fingerprint, ivf_centroids, nlist_of, num_codes, require_flat,
                                     require_ivf)
from qinco_jax.search.folder import (DB_CODES, INDEX_FAISS, INDEX_FORMAT, INDEX_META, PAIRWISE, TABLES,
                                     folder_path, load_pipeline, read_index_meta, relative_path, save_index)
from qinco_jax.search.index import NORMS, add_codes, decode_listnos, new_index, pack_codes, unpack_codes
from qinco_jax.search.pairwise import SHRINKS, PairwiseDecoder, ivf_subcodes, train_pairwise
from qinco_jax.search.pipeline import RERANK_BUDGET, Pipeline, SearchResult, search
from qinco_jax.search.store import (CODES_FILE, CODES_FORMAT, DEFAULT_PART, MANIFEST, codes_status,
                                    encode_database, open_codes, process_slice)
from qinco_jax.search.tables import (LSTSQ_CHUNK, additive_decode, additive_distances, additive_norms,
                                     lstsq_tables, sum_rows_by_label, targets)

__all__ = [
    "CODES_FILE",
    "CODES_FORMAT",
    "DB_CODES",
    "DEFAULT_PART",
    "INDEX_FAISS",
    "INDEX_FORMAT",
    "INDEX_META",
    "LSTSQ_CHUNK",
    "MANIFEST",
    "NORMS",
    "PAIRWISE",
    "RERANK_BUDGET",
    "SHRINKS",
    "TABLES",
    "PairwiseDecoder",
    "Pipeline",
    "SearchResult",
    "add_codes",
    "additive_decode",
    "additive_distances",
    "additive_norms",
    "code_dtype",
    "codes_status",
    "decode_listnos",
    "encode_database",
    "fingerprint",
    "folder_path",
    "ivf_centroids",
    "ivf_subcodes",
    "load_pipeline",
    "lstsq_tables",
    "new_index",
    "nlist_of",
    "num_codes",
    "open_codes",
    "pack_codes",
    "process_slice",
    "read_index_meta",
    "relative_path",
    "require_flat",
    "require_ivf",
    "save_index",
    "search",
    "sum_rows_by_label",
    "targets",
    "train_pairwise",
    "unpack_codes",
]
