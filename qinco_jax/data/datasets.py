"""The paper's datasets (where their files live, their splits) and epoch batches."""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from qinco_jax import checks
from qinco_jax.checks import QincoInputError
from qinco_jax.data.formats import read_groundtruth, read_vectors



@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Train / validation / database / query vectors and ground-truth ids, in faiss vocabulary."""

    # Arrays keep their file dtype (uint8, float16, ...) and are usually memmap slices.

    name: str
    xt: np.ndarray | None  # None when only the evaluation files were read
    xval: np.ndarray | None
    xb: np.ndarray | None = None
    xq: np.ndarray | None = None
    gt: np.ndarray | None = None

    @property
    def d(self) -> int:
        """Vector dimension."""
        return int(next(x for x in (self.xt, self.xb, self.xq) if x is not None).shape[1])

    def __repr__(self) -> str:
        """Shapes only: the arrays may be large memmaps."""
        arrays = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "name"]
        return f"Dataset({self.name!r}, " + ", ".join(f"{k}={None if v is None else v.shape}" for k, v in arrays) + ")"


class _File(NamedTuple):
    """A candidate file, relative to the data folder."""

    rel: str


class _Spec(NamedTuple):
    """Where a named dataset may live, its split default and its nominal database size."""

    train: tuple[_File, ...]
    db: tuple[_File, ...]
    queries: tuple[_File, ...]
    gt: tuple[_File, ...]
    nval: int
    nb: int
    source: tuple[str, ...]


def _fs(*rels: str) -> tuple[_File, ...]:
    """Candidate files that are used from their first row."""
    return tuple(_File(r) for r in rels)


_QINCO = "https://dl.fbaipublicfiles.com/QINCo/datasets/"
_QINCO_SH = "see qinco_v1/data/<set>/download_data.sh in github.com/facebookresearch/Qinco"
_TEXMEX = "ftp://ftp.irisa.fr/local/texmex/corpus/"
_BIGANN = "https://big-ann-benchmarks.com, files listed in github.com/harsha-simhadri/big-ann-benchmarks"
_M = 1_000_000
_SETS = {
    "bigann1M": _Spec(
        _fs("bigann/bigann_learn.bvecs", "bigann/bigann_learn_10M10k.bvecs", "bigann/learn.100M.u8bin"),
        _fs("bigann/bigann_base.bvecs", "bigann/base.1B.u8bin", "bigann/base.1B.u8bin.crop_nb_1000000"),
        _fs("bigann/bigann_query.bvecs", "bigann/query.public.10K.u8bin"),
        _fs("bigann/gnd/idx_1M.ivecs"), 10_000, _M,
        (f"{_TEXMEX} (bigann_*)", f"{_QINCO} ({_QINCO_SH}; -small: 10M training prefix, 1M base)", _BIGANN)),
    "deep1M": _Spec(
        _fs("deep1b/learn.fvecs", "deep1b/learn10M10k.fvecs", "deep1b/learn.350M.fbin"),
        _fs("deep1b/base.fvecs", "deep1b/base.1B.fbin", "deep1b/base.1B.fbin.crop_nb_1000000"),
        _fs("deep1b/deep1B_queries.fvecs", "deep1b/query.public.10K.fbin"),
        _fs("deep1b/deep1M_groundtruth.ivecs"), 10_000, _M, (f"{_QINCO}deep1b/ ({_QINCO_SH})", _BIGANN)),
    "fb_ssnpp": _Spec(
        # big-ann-benchmarks ships no FB_ssnpp training file (its database rows are not a training set):
        # the training vectors must be the QINCo download's training_set10010k.npy.
        _fs("fb_ssnpp/training_set10010k.npy"),
        _fs("fb_ssnpp/database1M.npy", "FB_ssnpp/FB_ssnpp_database.u8bin",
            "FB_ssnpp/FB_ssnpp_database.u8bin.crop_nb_1000000"),
        _fs("fb_ssnpp/queries.npy", "FB_ssnpp/FB_ssnpp_public_queries.u8bin"),
        _fs("fb_ssnpp/ground_truth1M.npy"), 10_000, _M, (f"{_QINCO} ({_QINCO_SH})", _BIGANN)),
    "contriever1M": _Spec(
        _fs("contriever/training_set.npy"), _fs("contriever/database1M.npy"), _fs("contriever/queries.npy"),
        _fs("contriever/ground_truth1M.npy"), 10_000, _M, (f"{_QINCO}ContrieverEmb/ ({_QINCO_SH})",)),
    "sift1M": _Spec(
        _fs("sift/sift_learn.fvecs", "sift1M/sift_learn.fvecs"), _fs("sift/sift_base.fvecs", "sift1M/sift_base.fvecs"),
        _fs("sift/sift_query.fvecs", "sift1M/sift_query.fvecs"),
        _fs("sift/sift_groundtruth.ivecs", "sift1M/sift_groundtruth.ivecs"), 5_000, _M, (f"{_TEXMEX}sift.tar.gz",)),
}
_ALIASES = {**{k.lower(): k for k in _SETS}, "fb_ssnpp1m": "fb_ssnpp"}


def _locate(root: Path, name: str, role: str, required: bool = True) -> Path | None:
    """First existing candidate file of a role, or an error listing every path looked for."""
    spec = _SETS[name]
    for f in getattr(spec, role):
        if (root / f.rel).is_file():
            return root / f.rel
    looked = "\n  ".join(str(root / f.rel) for f in getattr(spec, role))
    msg = (f"{name}: no {role} file found. Looked for:\n  {looked}\n"
           f"Data folder: {root} (--data-dir or the data_dir argument, else $QINCO_DATA_DIR, else ./data). "
           "The data comes from:\n  " + "\n  ".join(spec.source))
    if required:
        raise QincoInputError(msg)
    warnings.warn(f"{msg}\nContinuing without ground truth (gt=None).", stacklevel=3)
    return None


def _split(x: np.ndarray, nt: int | None, nval: int, src: str) -> tuple[np.ndarray, np.ndarray]:
    """xt = the first nt rows, xval = the next nval (the last nval of the first nt + nval)."""
    n = x.shape[0]
    if nval < 0 or (nt is not None and nt < 1):
        raise QincoInputError(f"need nt >= 1 and nval >= 0, got nt={nt}, nval={nval}")
    want = f"nt + nval = {nt:,} + {nval:,} = {nt + nval:,}" if nt is not None else f"nval + 1 = {nval + 1:,}"
    nt = n - nval if nt is None else nt
    if nt < 1 or nt + nval > n:
        raise QincoInputError(f"{src} holds {n:,} training vectors, fewer than {want}")
    return x[:nt], x[nt : nt + nval]


def _limit(x: np.ndarray, nb: int, src: str) -> np.ndarray:
    """The first nb database rows."""
    if nb < 1 or nb > x.shape[0]:
        raise QincoInputError(f"nb={nb:,} is out of range: {src} holds {x.shape[0]:,} database vectors")
    return x[:nb]


def _same_d(named: list[tuple[str, np.ndarray | None]]) -> None:
    """Every given matrix has the dimension of the first."""
    named = [(s, x) for s, x in named if x is not None]
    (s0, x0), *rest = named
    for s, x in rest:
        if x.shape[1] != x0.shape[1]:
            raise QincoInputError(f"dimension mismatch: {s0} has d={x0.shape[1]}, {s} has d={x.shape[1]}")


def check_groundtruth(gt: np.ndarray, nb: int, what: str = "gt") -> np.ndarray:
    """Check that ground-truth ids are integers in [0, nb); returns gt."""
    a = np.asarray(gt)
    if a.ndim != 2 or a.dtype.kind not in "iu" or a.size == 0:
        raise QincoInputError(f"{what} must be a non-empty (nq, k) integer matrix, got {a.shape} {a.dtype}")
    lo, hi = int(a.min()), int(a.max())
    if lo < 0:
        raise QincoInputError(f"{what} holds negative ids (min {lo}); ids must be in [0, nb={nb:,})")
    if hi >= nb:
        raise QincoInputError(
            f"{what} refers to database id {hi:,} but the database holds only {nb:,} vectors: fewer db vectors "
            "than the ground truth was computed on"
        )
    return gt


def _groundtruth(gt: np.ndarray, xq: np.ndarray | None, xb: np.ndarray | None, src: str) -> np.ndarray:
    """Check gt against the queries (one row each) and the database (ids in range)."""
    if xq is None:
        raise QincoInputError(f"ground truth {src} given without queries")
    if gt.shape[0] != xq.shape[0]:
        raise QincoInputError(f"ground truth {src} has {gt.shape[0]:,} rows but there are {xq.shape[0]:,} queries")
    return gt if xb is None else check_groundtruth(gt, xb.shape[0], f"ground truth {src}")


def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None, *, nt: int | None = None, nval: int | None = None,
    nb: int | None = None, train: bool = True,
) -> Dataset:
    """A paper dataset from its QINCo, texmex or big-ann-benchmarks files; nb < 1M drops the 1M ground truth.

    train=False reads only the database, the queries and the ground truth (xt and xval are None):
    evaluating a trained codec does not need the training file.
    """
    key = _ALIASES.get(str(name).lower())
    if key is None:
        raise QincoInputError(f"unknown dataset {name!r}; known: {', '.join(_SETS)} (or your own files: --train, or load_files)")
    spec, root = _SETS[key], Path(data_dir or os.environ.get("QINCO_DATA_DIR") or "data").absolute()
    pt = _locate(root, key, "train") if train else None
    pb, pq = (_locate(root, key, role) for role in ("db", "queries"))
    xt = xval = None
    if train:
        xt, xval = _split(read_vectors(pt), nt, spec.nval if nval is None else nval, str(pt))
    xb_all = read_vectors(pb)
    # A base shorter than spec.nb is taken whole; the gt id check below catches one cut short of its gt.
    xb = _limit(xb_all, min(spec.nb, xb_all.shape[0]) if nb is None else nb, str(pb))
    xq = read_vectors(pq)
    _same_d([(str(pt), xt), (str(pb), xb), (str(pq), xq)])
    gt = None
    if nb is None or nb >= spec.nb:  # the ground truth is computed on the first spec.nb database rows
        found = _locate(root, key, "gt", required=False)
        gt = None if found is None else _groundtruth(read_groundtruth(found), xq, xb, str(found))
    return Dataset(key, xt, xval, xb, xq, gt)


def load_files(
    train: str | os.PathLike, db: str | os.PathLike | None = None, queries: str | os.PathLike | None = None,
    gt: str | os.PathLike | None = None, *, nt: int | None = None, nval: int = 10_000, nb: int | None = None,
) -> Dataset:
    """A Dataset from user files in any supported format (xt/xval split from `train`)."""
    if nb is not None and db is None:
        raise QincoInputError(f"nb={nb} given without a database file")
    xt, xval = _split(read_vectors(train), nt, nval, str(train))
    xb = None if db is None else read_vectors(db)
    xb = xb if xb is None or nb is None else _limit(xb, nb, str(db))
    xq = None if queries is None else read_vectors(queries)
    _same_d([(str(train), xt), (str(db), xb), (str(queries), xq)])
    ids = None if gt is None else _groundtruth(read_groundtruth(gt), xq, xb, str(gt))
    return Dataset(Path(train).stem, xt, xval, xb, xq, ids)




def batches(n: int, batch_size: int, seed: int, epoch: int) -> Iterator[np.ndarray]:
    """Index batches of one epoch: a permutation that is a pure function of (seed, epoch); last batch partial."""
    bs = checks.batch_size(batch_size)
    if n < 0 or seed < 0 or epoch < 0:
        raise QincoInputError(f"batches needs n, seed, epoch >= 0; got n={n}, seed={seed}, epoch={epoch}")
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return (perm[i : i + bs] for i in range(0, n, bs))


def sample_rows(x: np.ndarray, n: int, seed: int = 0, chunk: int = 65536) -> np.ndarray:
    """At most n rows of x as a new float32 array: all of them when x has no more, else a fixed
    random subset (of seed) read in file order, chunk by chunk (a memmap is never converted whole)."""
    n = checks.batch_size(n, "sample size")
    total = x.shape[0]
    rows = np.arange(total) if total <= n else np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
    out = np.empty((len(rows), x.shape[1]), np.float32)
    for i in range(0, len(rows), chunk):
        r = rows[i : i + chunk]
        out[i : i + len(r)] = x[r[0] : r[-1] + 1] if total <= n else x[r]
    return out


def streamed_max(x: np.ndarray, chunk: int = 65536) -> float:
    """The maximum entry of x, read chunk by chunk."""
    return max(float(np.max(x[i : i + chunk])) for i in range(0, x.shape[0], chunk))

