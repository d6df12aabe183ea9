"""The codes store: a database encoded by a codec into a memory-mapped `codes.npy`, in resumable parts, one
contiguous slice per process, with a manifest that names the codec and a done marker per process."""

from __future__ import annotations

import io
import os

import jax
import numpy as np

import qinco_jax as qj
from qinco_jax import checks
from qinco_jax.checks import QincoInputError
from qinco_jax.files import read_bounded_json, write_json
from qinco_jax.progress import Progress
from qinco_jax.search.common import code_dtype, fingerprint, nlist_of, num_codes

CODES_FORMAT = "qinco_jax.codes/1"
CODES_FILE = "codes.npy"
MANIFEST = "manifest.json"
DEFAULT_PART = 65536


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
    """The done marker of process r of R: the rows of its slice finished so far."""
    return os.path.join(out_dir, f"done.p{r}of{R}.json")


def _rows_done(path: str) -> int:
    return read_bounded_json(path, "codes progress")["rows_done"]


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
        old = read_bounded_json(mpath, "codes folder")
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
    done = _rows_done(ppath) if os.path.exists(ppath) else lo
    if not lo <= done <= hi:
        raise QincoInputError(f"{ppath} records {done} rows done, outside this process's slice [{lo}, {hi})")
    with Progress(hi - lo, desc=f"encode p{r}", enabled=progress, initial=done - lo) as bar:  # rate: new rows only
        for start in range(done, hi, part_size):
            stop = min(hi, start + part_size)
            codes[start:stop] = qj.encode(codec, x[start:stop], batch_size=batch_size)
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
    manifest = read_bounded_json(os.path.join(out_dir, MANIFEST), "codes folder")
    if manifest.get("format") != CODES_FORMAT:
        raise QincoInputError(f"{out_dir}: not a codes folder (format {manifest.get('format')!r})")
    n, R, done = manifest["n"], manifest["process_count"], 0
    for r in range(R):
        lo, hi = process_slice(n, r, R)
        p = _progress_path(out_dir, r, R)
        done += (_rows_done(p) - lo) if os.path.exists(p) else 0
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
