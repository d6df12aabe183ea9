"""Vector files: memory-mapped readers and chunked writers (.fvecs .ivecs .bvecs .fbin .u8bin .i8bin .ibin .npy)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from qinco_jax import checks
from qinco_jax.checks import QincoInputError

_VECS = {".fvecs": np.dtype("<f4"), ".ivecs": np.dtype("<i4"), ".bvecs": np.dtype("u1")}
_BIN = {".fbin": np.dtype("<f4"), ".u8bin": np.dtype("u1"), ".i8bin": np.dtype("i1"), ".ibin": np.dtype("<i4")}
FORMATS = (*_VECS, *_BIN, ".npy")
_WRITE_CHUNK = 65536
_HEADER_CHUNK = 1 << 20  # rows whose headers are checked per read



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
    for start in range(0, n, _HEADER_CHUNK):  # every row's header, a chunk at a time
        dims = np.ascontiguousarray(raw[start : start + _HEADER_CHUNK, :4]).view("<i4").ravel()
        bad = np.flatnonzero(dims != d)
        if bad.size:
            i = int(bad[0])
            raise QincoInputError(f"{path}: row {start + i} declares dimension {int(dims[i])}, row 0 declares {d}")
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
