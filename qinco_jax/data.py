"""Vector files (memory-mapped), the paper's datasets, synthetic demo data and epoch batches."""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from qinco_jax import checks
from qinco_jax.checks import QincoInputError

_VECS = {".fvecs": np.dtype("<f4"), ".ivecs": np.dtype("<i4"), ".bvecs": np.dtype("u1")}
_BIN = {".fbin": np.dtype("<f4"), ".u8bin": np.dtype("u1"), ".i8bin": np.dtype("i1"), ".ibin": np.dtype("<i4")}
FORMATS = (*_VECS, *_BIN, ".npy")
_WRITE_CHUNK = 65536
_DIM_SAMPLE = 1024


# ----------------------------------------------------------------------------- file formats


def _ext(path: Path) -> str:
    """Lower-case extension, ignoring big-ann-benchmarks' '.crop_nb_N' suffix of cropped downloads."""
    return Path(re.sub(r"\.crop_nb_\d+$", "", path.name.lower())).suffix


def _open_size(path: Path) -> int:
    """Size in bytes of a readable regular file; clear errors otherwise."""
    if not path.exists():
        raise QincoInputError(f"no such file: {path}")
    if not path.is_file():
        raise QincoInputError(f"not a regular file: {path}")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise QincoInputError(f"cannot read {path}: {e.strerror}") from None
    return path.stat().st_size


def _bad_size(path: Path, expected: int, actual: int, why: str) -> QincoInputError:
    """The error for a file whose size disagrees with its header."""
    state = "truncated" if actual < expected else "longer than its header says"
    return QincoInputError(f"{path} is {state}: {why} gives {expected:,} bytes, the file has {actual:,}")


def _read_vecs(path: Path, dtype: np.dtype, mmap: bool) -> np.ndarray:
    """texmex .fvecs/.ivecs/.bvecs: each row is an int32 d, then d values; a strided (n, d) view."""
    size = _open_size(path)
    if size < 4:
        raise QincoInputError(f"{path} is empty or truncated ({size} bytes), not a valid {_ext(path)} file")
    d = int(np.fromfile(path, dtype="<i4", count=1)[0])
    row = 4 + d * dtype.itemsize
    if d <= 0 or d > 1 << 24:
        raise QincoInputError(f"{path}: first row declares dimension {d}; not a valid {_ext(path)} file")
    if size % row:
        n = size // row + 1
        raise _bad_size(path, n * row, size, f"{n:,} rows of d={d} ({row} bytes each)")
    n = size // row
    raw = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, row))
    idx = np.unique(np.linspace(0, n - 1, min(n, _DIM_SAMPLE)).astype(np.int64))
    dims = np.ascontiguousarray(raw[idx, :4]).view("<i4").ravel()
    if (dims != d).any():
        i = int(idx[np.flatnonzero(dims != d)[0]])
        raise QincoInputError(f"{path}: row {i} declares dimension {int(dims[dims != d][0])}, row 0 declares {d}")
    if dtype.itemsize == 1:
        x = raw[:, 4:]
    else:
        x = np.memmap(path, dtype=dtype, mode="r", shape=(n, d + 1))[:, 1:]
    return x if mmap else np.array(x)


def _read_bin(path: Path, dtype: np.dtype, mmap: bool) -> np.ndarray:
    """big-ann-benchmarks .fbin/.u8bin/.i8bin/.ibin: uint32 n, uint32 d, then n*d values."""
    size = _open_size(path)
    if size < 8:
        raise _bad_size(path, 8, size, "the (n, d) header")
    n, d = (int(v) for v in np.fromfile(path, dtype="<u4", count=2))
    expected = 8 + n * d * dtype.itemsize
    if size != expected:
        raise _bad_size(path, expected, size, f"header n={n:,}, d={d}")
    if n == 0 or d == 0:
        raise QincoInputError(f"{path} holds no vectors (header n={n}, d={d})")
    x = np.memmap(path, dtype=dtype, mode="r", offset=8, shape=(n, d))
    return x if mmap else np.array(x)


def _read_npy(path: Path, mmap: bool) -> np.ndarray:
    """A 2-D .npy matrix of reals (float16 allowed)."""
    size = _open_size(path)
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read_header(f)
            offset = f.tell()
    except ValueError as e:
        raise QincoInputError(f"{path} is not a valid .npy file: {e}") from None
    if len(shape) != 2 or dtype.kind not in "uif":
        raise QincoInputError(f"{path} must hold a 2-D real matrix (n, d), got shape {shape}, dtype {dtype}")
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if size != expected:
        raise _bad_size(path, expected, size, f"shape {shape}, dtype {dtype}")
    if 0 in shape:
        raise QincoInputError(f"{path} holds no vectors (shape {shape})")
    return np.load(path, mmap_mode="r" if mmap else None)


def read_vectors(path: str | os.PathLike, *, mmap: bool = True) -> np.ndarray:
    """Read an (n, d) matrix from .fvecs/.bvecs/.ivecs/.fbin/.u8bin/.i8bin/.ibin/.npy (memory-mapped)."""
    path = Path(path)
    ext = _ext(path)
    if ext in _VECS:
        return _read_vecs(path, _VECS[ext], mmap)
    if ext in _BIN:
        return _read_bin(path, _BIN[ext], mmap)
    if ext == ".npy":
        return _read_npy(path, mmap)
    raise QincoInputError(f"{path}: unknown vector file extension {ext!r}; supported: {', '.join(FORMATS)}")


def read_groundtruth(path: str | os.PathLike) -> np.ndarray:
    """Ground-truth ids (nq, k): .ivecs/.ibin/.npy, or a big-ann-benchmarks knn result (ids then distances)."""
    path = Path(path)
    if _ext(path) in (".ibin", ".bin", ""):
        size = _open_size(path)
        n, k = (int(v) for v in np.fromfile(path, dtype="<u4", count=2)) if size >= 8 else (0, 0)
        if n and k and size == 8 + 8 * n * k:
            return np.memmap(path, dtype="<i4", mode="r", offset=8, shape=(n, k))
        return _read_bin(path, _BIN[".ibin"], True)
    gt = read_vectors(path)
    if gt.dtype.kind not in "iu":
        raise QincoInputError(f"{path}: ground truth must hold integer ids, got dtype {gt.dtype}")
    return gt


def _cast(c: np.ndarray, dtype: np.dtype, path: Path) -> np.ndarray:
    """Cast a chunk for writing; integer formats refuse values they cannot hold exactly."""
    if dtype.kind in "iu" and c.dtype != dtype:
        info = np.iinfo(dtype)
        lo, hi = c.min(), c.max()
        exact = c.dtype.kind != "f" or np.array_equal(c, np.round(c))
        if not (exact and lo >= info.min and hi <= info.max):
            raise QincoInputError(f"cannot write {c.dtype} values in [{lo}, {hi}] exactly as {dtype} to {path}")
    return np.ascontiguousarray(c, dtype=dtype)


def write_vectors(path: str | os.PathLike, x: np.ndarray) -> None:
    """Write an (n, d) matrix as .fvecs/.ivecs/.bvecs/.fbin/.u8bin/.i8bin/.ibin/.npy, in chunks."""
    path, x = Path(path), checks.vectors(x, None, "x")
    ext, (n, d) = _ext(path), x.shape
    if ext == ".npy":
        out = np.lib.format.open_memmap(path, mode="w+", dtype=x.dtype, shape=x.shape)
        for i in range(0, n, _WRITE_CHUNK):
            out[i : i + _WRITE_CHUNK] = x[i : i + _WRITE_CHUNK]
        out.flush()
        return
    if ext not in _VECS and ext not in _BIN:
        raise QincoInputError(f"{path}: cannot write extension {ext!r}; supported: {', '.join(FORMATS)}")
    dtype = _VECS.get(ext, _BIN.get(ext))
    with open(path, "wb") as f:
        if ext in _BIN:
            f.write(np.array([n, d], dtype="<u4").tobytes())
        for i in range(0, n, _WRITE_CHUNK):
            c = _cast(x[i : i + _WRITE_CHUNK], dtype, path)
            if ext in _VECS:
                rows = np.empty((len(c), 4 + c[0].nbytes), np.uint8)
                rows[:, :4] = np.array([d], "<i4").view(np.uint8)
                rows[:, 4:] = c.view(np.uint8).reshape(len(c), -1)
                c = rows
            f.write(c.tobytes())


# ----------------------------------------------------------------------------- datasets


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Train / validation / database / query vectors and ground-truth ids, in faiss vocabulary."""

    # Arrays keep their file dtype (uint8, float16, ...) and are usually memmap slices; iter_chunks gives float32.

    name: str
    xt: np.ndarray
    xval: np.ndarray
    xb: np.ndarray | None = None
    xq: np.ndarray | None = None
    gt: np.ndarray | None = None

    @property
    def d(self) -> int:
        """Vector dimension."""
        return int(self.xt.shape[1])

    def __repr__(self) -> str:
        """Shapes only: the arrays may be large memmaps."""
        arrays = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "name"]
        return f"Dataset({self.name!r}, " + ", ".join(f"{k}={None if v is None else v.shape}" for k, v in arrays) + ")"


class _File(NamedTuple):
    """A candidate file, relative to the data folder."""

    rel: str
    skip: int = 0  # leading rows that belong to another role (the database) and are not used


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
        # big-ann-benchmarks ships no FB_ssnpp training file: train on the database after its first 1M rows.
        (_File("fb_ssnpp/training_set10010k.npy"), _File("FB_ssnpp/FB_ssnpp_database.u8bin", _M)),
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


def dataset_names() -> list[str]:
    """Names accepted by load_dataset (case-insensitive; FB_ssnpp1M and Contriever1M also work)."""
    return list(_SETS)


def _locate(root: Path, name: str, role: str, required: bool = True) -> tuple[Path, int] | None:
    """First existing candidate file of a role, or an error listing every path looked for."""
    spec = _SETS[name]
    for f in getattr(spec, role):
        if (root / f.rel).is_file():
            return root / f.rel, f.skip
    looked = "\n  ".join(str(root / f.rel) for f in getattr(spec, role))
    msg = (f"{name}: no {role} file found. Looked for:\n  {looked}\n"
           f"Data folder: {root} (argument data_dir, else $QINCO_DATA_DIR, else ./data). "
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
    nb: int | None = None,
) -> Dataset:
    """A paper dataset from its QINCo, texmex or big-ann-benchmarks files; nb < 1M drops the 1M ground truth."""
    key = _ALIASES.get(str(name).lower())
    if key is None:
        raise QincoInputError(f"unknown dataset {name!r}; known: {', '.join(_SETS)} (or use load_files)")
    spec, root = _SETS[key], Path(data_dir or os.environ.get("QINCO_DATA_DIR") or "data").absolute()
    (pt, skip), (pb, _), (pq, _) = (_locate(root, key, role) for role in ("train", "db", "queries"))
    src = f"{pt} (after the {skip:,} database rows)" if skip else str(pt)
    xt, xval = _split(read_vectors(pt)[skip:], nt, spec.nval if nval is None else nval, src)
    xb_all = read_vectors(pb)
    # A base shorter than spec.nb is taken whole; the gt id check below catches one cut short of its gt.
    xb = _limit(xb_all, min(spec.nb, xb_all.shape[0]) if nb is None else nb, str(pb))
    xq = read_vectors(pq)
    _same_d([(str(pt), xt), (str(pb), xb), (str(pq), xq)])
    gt = None
    if nb is None or nb >= spec.nb:  # the ground truth is computed on the first spec.nb database rows
        found = _locate(root, key, "gt", required=False)
        gt = None if found is None else _groundtruth(read_groundtruth(found[0]), xq, xb, str(found[0]))
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


# ----------------------------------------------------------------------------- synthetic data


def _synthetic_map(d: int, seed: int) -> dict[str, np.ndarray]:
    """Parameters of the distribution: a cluster mixture in a q-dim latent space and a random MLP lift to d."""
    rng = np.random.default_rng([seed, 0x51C0])
    q, C, h = min(d, 8), 48, 4 * d
    return dict(
        centers=rng.normal(size=(C, q)) * 1.5,
        scales=np.exp(rng.uniform(np.log(0.1), np.log(0.8), size=C)),  # clusters of very different spread
        shapes=rng.normal(size=(C, q, q)) / np.sqrt(q),  # and different anisotropic covariances
        weights=rng.dirichlet(np.full(C, 1.0)),
        w1=rng.normal(size=(q, h)) / np.sqrt(q), b1=rng.normal(size=h) * 0.5,
        w2=rng.normal(size=(h, d)) * (2.0 / np.sqrt(h)), b2=rng.normal(size=d) * 0.5,
    )


def _synthetic_draw(p: dict[str, np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    """n i.i.d. points: latent cluster sample, curved by tanh, lifted to d, made non-negative by softplus."""
    c = rng.choice(len(p["weights"]), size=n, p=p["weights"])
    eps = rng.normal(size=(n, p["centers"].shape[1]))
    z = p["centers"][c] + p["scales"][c, None] * np.einsum("nq,nqr->nr", eps, p["shapes"][c])
    u = np.tanh(z @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    u += 0.05 * rng.normal(size=u.shape)
    return (16.0 * np.logaddexp(0.0, u)).astype(np.float32)


def _knn_ids(xq: np.ndarray, xb: np.ndarray, k: int) -> np.ndarray:
    """Exact L2 k-NN ids (nq, k) int64 of xq in xb."""
    from qinco_jax import faiss_ops

    return faiss_ops.knn(xq, xb, k)[1].astype(np.int64)


def synthetic(
    d: int = 32, nt: int = 20_000, nval: int = 2_000, nb: int = 20_000, nq: int = 1_000, seed: int = 0
) -> Dataset:
    """Deterministic structured demo data (float32, non-negative) with exact ground truth (k = min(100, nb))."""
    if d < 1 or nt < 1 or min(nval, nb, nq, seed) < 0:
        raise QincoInputError(f"synthetic needs d, nt >= 1 and nval, nb, nq, seed >= 0; got {d=}, {nt=}, {nval=}, "
                              f"{nb=}, {nq=}, {seed=}")
    p = _synthetic_map(d, seed)
    sizes = (nt, nval, nb, nq)
    xt, xval, xb, xq = (_synthetic_draw(p, n, np.random.default_rng([seed, i + 1])) for i, n in enumerate(sizes))
    xb, xq = (x if len(x) else None for x in (xb, xq))
    gt = None if xb is None or xq is None else _knn_ids(xq, xb, min(100, nb))
    return Dataset("synthetic", xt, xval, xb, xq, gt)


# ----------------------------------------------------------------------------- streaming


def batches(n: int, batch_size: int, seed: int, epoch: int) -> Iterator[np.ndarray]:
    """Index batches of one epoch: a permutation that is a pure function of (seed, epoch); last batch partial."""
    bs = checks.batch_size(batch_size)
    if n < 0 or seed < 0 or epoch < 0:
        raise QincoInputError(f"batches needs n, seed, epoch >= 0; got n={n}, seed={seed}, epoch={epoch}")
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return (perm[i : i + bs] for i in range(0, n, bs))


def iter_chunks(x: np.ndarray, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start, float32 rows) pairs covering x, so a memmap is read chunk by chunk."""
    chunk = checks.batch_size(chunk, "chunk")
    return ((i, np.ascontiguousarray(x[i : i + chunk], dtype=np.float32)) for i in range(0, x.shape[0], chunk))


def check_finite(x: np.ndarray, what: str = "x", chunk: int = 65536) -> None:
    """Raise QincoInputError naming the first row with NaN or inf; reads x chunk by chunk."""
    chunk = checks.batch_size(chunk, "chunk")
    if x.dtype.kind != "f":
        return
    for i in range(0, x.shape[0], chunk):
        checks.finite_chunk(np.asarray(x[i : i + chunk]), i, what)
