"""The files of a codes store and their reader: per-process parts of compact step codes and list ids, a done
marker per process and, once every process is done, a manifest. Every JSON file is read within a size cap and
checked field by field; every array file's header and size are checked before it is mapped.

A folder written by encode_database (process r of R encodes the rows process_slice(n, r, R)):

  part.r{r}of{R}.steps.npy   (rows, M) step codes: uint8 for K <= 256, uint16 up to 65,536
  part.r{r}of{R}.lists.npy   (rows,) IVF list ids: the narrowest unsigned type that holds nlist - 1 (IVF only)
  part.r{r}of{R}.json        the done marker: the build's settings, the slice [lo, hi) and rows_done
  manifest.json              the settings, written by process 0 once every marker reports its slice done
"""

from __future__ import annotations

import os
import re
import stat

import numpy as np

from qinco_jax.checks import QincoInputError, short
from qinco_jax.files import open_regular, read_bounded_json
from qinco_jax.schema import INT, NONE, STR, Field, check
from qinco_jax.search.common import fingerprint, nlist_of

CODES_FORMAT = "qinco_jax.codes/2"
PART_FORMAT = "qinco_jax.codes_part/2"
OLD_FORMAT = "qinco_jax.codes/1"  # one codes.npy, every column at the list-id width
MANIFEST = "manifest.json"
MAX_PROCESSES = 1 << 16
MAX_ROWS = 1 << 48
MAX_ENTRIES = 4 * MAX_PROCESSES + 64  # files a codes folder may hold (3 per process, the manifest, leftovers)
MAX_HEADER = 4096  # bytes of a part's .npy header (ours are 128)
_MARKER = re.compile(r"part\.r(\d{1,6})of(\d{1,6})\.json")
_HEX64 = re.compile(r"[0-9a-f]{64}")
SETTINGS = ("n", "M", "K", "nlist", "part_size", "process_count", "fingerprint", "steps_dtype", "lists_dtype")


def steps_dtype(K: int) -> np.dtype:
    """The narrowest unsigned type that holds the step codes 0 .. K - 1."""
    return np.dtype(np.uint8 if K <= 256 else np.uint16 if K <= 65536 else np.uint32)


def lists_dtype(nlist: int) -> np.dtype | None:
    """The narrowest unsigned type that holds the list ids 0 .. nlist - 1 (None without IVF)."""
    return None if not nlist else np.dtype(np.uint8 if nlist <= 256 else np.uint16 if nlist <= 65536 else np.uint32)


def process_slice(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """The contiguous rows [lo, hi) that process process_index of process_count encodes."""
    return n * process_index // process_count, n * (process_index + 1) // process_count


def part_path(out_dir: str, r: int, R: int, what: str) -> str:
    """A file of process r of R: what is 'json' (the done marker), 'steps.npy' or 'lists.npy'."""
    return os.path.join(out_dir, f"part.r{r}of{R}.{what}")


def settings_of(codec, n: int, part_size: int, process_count: int) -> dict:
    """The settings of a build, as its markers and manifest record them."""
    cfg, nlist = codec.config, nlist_of(codec)
    ld = lists_dtype(nlist)
    return {"n": int(n), "M": int(cfg.M), "K": int(cfg.K), "nlist": nlist, "part_size": int(part_size),
            "process_count": int(process_count), "fingerprint": fingerprint(codec),
            "steps_dtype": steps_dtype(cfg.K).str, "lists_dtype": None if ld is None else ld.str}


def bytes_per_vector(settings: dict) -> int:
    """Bytes per vector of the code files: M step codes plus the list id."""
    ld = settings["lists_dtype"]
    return settings["M"] * np.dtype(settings["steps_dtype"]).itemsize + (0 if ld is None else np.dtype(ld).itemsize)


# ----------------------------------------------------------------------------- schema


SCHEMA = {"format": Field((STR,), max_len=64), "n": Field((INT,), 1, MAX_ROWS), "M": Field((INT,), 1, 1024),
          "K": Field((INT,), 2, 1 << 16), "nlist": Field((INT,), 0, 1 << 32), "part_size": Field((INT,), 1, 1 << 40),
          "process_count": Field((INT,), 1, MAX_PROCESSES), "fingerprint": Field((STR,), max_len=64),
          "steps_dtype": Field((STR,), max_len=8), "lists_dtype": Field((STR, NONE), max_len=8)}
MARKER_SCHEMA = {**SCHEMA, "process_index": Field((INT,), 0, MAX_PROCESSES - 1), "lo": Field((INT,), 0, MAX_ROWS),
                 "hi": Field((INT,), 0, MAX_ROWS), "rows_done": Field((INT,), 0, MAX_ROWS)}


def check_settings(obj: dict, where: str, fmt: str) -> dict:
    """The settings of a marker (fmt PART_FORMAT, its own fields too) or a manifest (CODES_FORMAT), every field
    typed and bounded (qinco_jax.schema) and the process count and dtypes checked against the rest: a
    QincoInputError naming the file and the field."""
    if obj.get("format") == OLD_FORMAT:
        raise QincoInputError(f"{where}: a codes folder of an earlier format (one codes.npy, every column at the "
                              "list-id width), which this version does not read; rebuild it: delete the folder "
                              "and run encode_database / `eval/search.py build` again")
    if obj.get("format") != fmt:
        raise QincoInputError(f"{where}: not a codes store file (format {short(obj.get('format'))}, expected {fmt!r})")
    check(obj, MARKER_SCHEMA if fmt == PART_FORMAT else SCHEMA, where)
    n, K, nlist = obj["n"], obj["K"], obj["nlist"]
    if obj["process_count"] > n:
        raise QincoInputError(f"{where}: the field 'process_count' is {obj['process_count']:,}, more than the "
                              f"{n:,} rows of the database (n)")
    if not _HEX64.fullmatch(obj["fingerprint"]):
        raise QincoInputError(f"{where}: the field 'fingerprint' must be 64 hex digits, got {short(obj['fingerprint'])}")
    ld = lists_dtype(nlist)
    for key, want in (("steps_dtype", steps_dtype(K).str), ("lists_dtype", None if ld is None else ld.str)):
        if obj[key] != want:
            raise QincoInputError(f"{where}: the field {key!r} must be {want!r} for K={K}, nlist={nlist}, "
                                  f"got {short(obj[key])}")
    return {k: obj[k] for k in SETTINGS}


def no_link(path: str, what: str) -> str:
    """path, refused when it is a symbolic link: a codes folder's files are its own."""
    if os.path.islink(path):
        raise QincoInputError(f"{what}: {path} is a symbolic link; the files of a codes folder must be its own")
    return path


def read_manifest(out_dir: str) -> dict:
    """The checked settings of a codes folder's manifest."""
    path = no_link(os.path.join(out_dir, MANIFEST), "codes manifest")
    return check_settings(read_bounded_json(path, "codes manifest"), path, CODES_FORMAT)


def read_marker(out_dir: str, r: int, settings: dict) -> dict | None:
    """The done marker of process r (None when absent), checked against the build's settings and its own
    slice: {'lo', 'hi', 'rows_done'}."""
    R, n = settings["process_count"], settings["n"]
    path = part_path(out_dir, r, R, "json")
    if not os.path.lexists(path):
        return None
    obj = read_bounded_json(no_link(path, "codes done marker"), "codes done marker")
    got = check_settings(obj, path, PART_FORMAT)
    diff = [k for k in SETTINGS if got[k] != settings[k]]
    if diff:
        raise QincoInputError(f"{path} belongs to another build ({diff[0]}: {short(got[diff[0]])} there, "
                              f"{short(settings[diff[0]])} expected); delete the folder and rebuild")
    lo, hi = process_slice(n, r, R)
    if obj.get("process_index") != r or obj.get("lo") != lo or obj.get("hi") != hi:
        raise QincoInputError(f"{path}: the marker claims process {short(obj.get('process_index'))}, rows "
                              f"[{short(obj.get('lo'))}, {short(obj.get('hi'))}); process {r} of {R} encodes "
                              f"[{lo}, {hi})")
    if not lo <= obj["rows_done"] <= hi:
        raise QincoInputError(f"{path}: the field 'rows_done' is {obj['rows_done']:,}, outside the slice "
                              f"[{lo:,}, {hi:,}] of process {r} of {R}")
    return {"lo": lo, "hi": hi, "rows_done": obj["rows_done"]}


def markers_in(out_dir: str) -> dict[int, list[int]]:
    """{process_count: [process indices]} of the done markers in a folder (a bounded listing)."""
    found: dict[int, list[int]] = {}
    with os.scandir(out_dir) as it:
        for i, e in enumerate(it):
            if i >= MAX_ENTRIES:
                raise QincoInputError(f"{out_dir}: more than {MAX_ENTRIES:,} entries; not a codes folder")
            m = _MARKER.fullmatch(e.name)
            if m and int(m.group(1)) < int(m.group(2)) <= MAX_PROCESSES:
                found.setdefault(int(m.group(2)), []).append(int(m.group(1)))
    return found


# ----------------------------------------------------------------------------- part arrays


def npy_header(dtype: np.dtype, shape: tuple) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def part_shape(settings: dict, r: int, what: str) -> tuple[np.dtype, tuple]:
    lo, hi = process_slice(settings["n"], r, settings["process_count"])
    if what == "steps.npy":
        return np.dtype(settings["steps_dtype"]), (hi - lo, settings["M"])
    return np.dtype(settings["lists_dtype"]), (hi - lo,)


def check_part(f, path: str, dtype: np.dtype, shape: tuple) -> int:
    """The header length of an open part file, after checking that it is a regular file whose header names
    exactly dtype and shape (C order) and whose size is the header plus the data."""
    st = os.fstat(f.fileno())
    if not stat.S_ISREG(st.st_mode):
        raise QincoInputError(f"codes part: {path} is not a regular file")
    head = f.read(MAX_HEADER)
    want = npy_header(dtype, shape)
    if head[:len(want)] != want:
        try:
            f.seek(0)
            np.lib.format.read_magic(f)
            got = np.lib.format.read_array_header_1_0(f, max_header_size=MAX_HEADER)
            what = f"dtype {got[2]}, shape {str(got[0])[:60]}{', Fortran order' if got[1] else ''}"
        except Exception:  # noqa: BLE001 - any unreadable header is described the same way
            what = "no readable .npy header"
        raise QincoInputError(f"{path}: {what}; the build's settings say dtype {dtype}, shape {shape}")
    size = len(want) + int(np.prod(shape)) * dtype.itemsize
    if st.st_size != size:
        raise QincoInputError(f"{path} holds {st.st_size:,} bytes, {size:,} expected for {shape} {dtype} codes")
    return len(want)


def open_part(path: str):
    """A part file opened for reading: a regular file (a FIFO cannot block the open)."""
    return os.fdopen(open_regular(no_link(path, "codes part"), "codes part"), "rb")


def map_part(path: str, dtype: np.dtype, shape: tuple) -> np.ndarray:
    """A part file memory-mapped read-only, after check_part (mapped through the descriptor it checked)."""
    with open_part(path) as f:
        offset = check_part(f, path, dtype, shape)
        return np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=shape)


# ----------------------------------------------------------------------------- reader


class Rows:
    """The per-process parts of one column group read as one (n, ...) array, without copying them: indexing
    (an int, a slice, an integer or boolean array of rows, then optional column keys) and np.asarray."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.cumsum([0] + [p.shape[0] for p in parts])
        self.shape = (int(self.starts[-1]),) + tuple(parts[0].shape[1:])
        self.dtype, self.ndim = parts[0].dtype, parts[0].ndim

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if len(self.parts) == 1:
            return self.parts[0][key]
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        n = self.shape[0]
        if isinstance(rows, (int, np.integer)):
            i = int(rows) + n if rows < 0 else int(rows)
            if not 0 <= i < n:
                raise IndexError(f"row {rows} out of range for {n} rows")
            p = int(np.searchsorted(self.starts, i, "right")) - 1
            return self.parts[p][(i - self.starts[p],) + rest]
        if isinstance(rows, slice) and rows.indices(n)[2] == 1:
            lo, hi, _ = rows.indices(n)
            out = [p[max(lo - s, 0):max(min(hi - s, len(p)), 0)] for p, s in zip(self.parts, self.starts)]
            out = np.concatenate(out) if hi > lo else np.empty((0,) + self.shape[1:], self.dtype)
        else:
            idx = np.arange(n)[rows] if isinstance(rows, slice) else np.asarray(rows)
            if idx.dtype == bool:
                idx = np.flatnonzero(idx) if idx.shape == (n,) else np.arange(n)[idx]
            idx = np.where(idx < 0, idx + n, idx).astype(np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise IndexError(f"row indices out of range for {n} rows")
            which = np.searchsorted(self.starts, idx, "right") - 1
            out = np.empty(idx.shape + self.shape[1:], self.dtype)
            for p in np.unique(which):
                sel = which == p
                out[sel] = self.parts[p][idx[sel] - self.starts[p]]
            rest = (slice(None),) * (idx.ndim - 1) + rest
        return out[(slice(None),) + rest] if rest else out

    def __array__(self, dtype=None, copy=None):
        a = np.asarray(self[:])
        return a if dtype is None else a.astype(dtype)


class Codes:
    """The codes of a finished build: `steps` (n, M) and `lists` (n,) or None (plain codecs), as Rows over the
    memory-mapped parts. Indexed, or passed to np.asarray, it gives the (rows, num_codes) code matrix that
    qj.encode gives (column 0 the list id for IVF) in the codec's code dtype."""

    ndim = 2

    def __init__(self, steps: Rows, lists: Rows | None, settings: dict):
        self.steps, self.lists, self.settings = steps, lists, settings
        self.dtype = steps.dtype if lists is None else np.promote_types(steps.dtype, lists.dtype)
        self.shape = (steps.shape[0], steps.shape[1] + (lists is not None))
        self.bytes_per_vector = bytes_per_vector(settings)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        rows, cols = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        one = isinstance(rows, (int, np.integer))
        rows = slice(rows, rows + 1 or None) if one else rows
        out = np.asarray(self.steps[rows], self.dtype)
        if self.lists is not None:
            out = np.concatenate([np.asarray(self.lists[rows], self.dtype)[..., None], out], axis=-1)
        out = out[0] if one else out
        return out[(Ellipsis,) + cols] if cols else out

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a if dtype is None else a.astype(dtype)


def _progress(out_dir: str, settings: dict) -> list[dict | None]:
    return [read_marker(out_dir, r, settings) for r in range(settings["process_count"])]


def codes_status(out_dir) -> dict:
    """How far the build in a codes folder got: {'n', 'done' (rows finished by all processes), 'complete' (the
    manifest is written and every process's slice is done), 'manifest' (its settings, or None), 'settings',
    'processes': [{'lo', 'hi', 'rows_done'} or None per process]}. A folder with no build is done 0 of n=0."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if not os.path.isdir(out_dir):
        raise QincoInputError(f"{out_dir} is not a codes folder (no such directory)")
    manifest = read_manifest(out_dir) if os.path.lexists(os.path.join(out_dir, MANIFEST)) else None
    settings = manifest
    if settings is None:
        if os.path.lexists(os.path.join(out_dir, "codes.npy")):
            check_settings({"format": OLD_FORMAT}, out_dir, CODES_FORMAT)
        found = markers_in(out_dir)
        if len(found) > 1:
            raise QincoInputError(f"{out_dir} holds parts of builds with {' and '.join(map(str, sorted(found)))} "
                                  "processes; delete the folder and rebuild")
        if not found:
            return {"n": 0, "done": 0, "complete": False, "manifest": None, "settings": None, "processes": []}
        (R, ranks), = found.items()
        path = part_path(out_dir, min(ranks), R, "json")
        settings = check_settings(read_bounded_json(no_link(path, "codes done marker"), "codes done marker"),
                                  path, PART_FORMAT)
    procs = _progress(out_dir, settings)
    done = sum(p["rows_done"] - p["lo"] for p in procs if p is not None)
    return {"n": settings["n"], "done": done, "complete": manifest is not None and done == settings["n"],
            "manifest": manifest, "settings": settings, "processes": procs}


def describe(procs: list, ranks) -> str:
    """How far each of the given processes got, for error messages."""
    out = []
    for r in ranks:
        p = procs[r]
        out.append(f"process {r}: no done marker (never started, or died before it began)" if p is None else
                   f"process {r}: {p['rows_done'] - p['lo']:,} of its {p['hi'] - p['lo']:,} rows "
                   f"[{p['lo']:,}, {p['hi']:,})")
    return "; ".join(out)


def open_codes(out_dir, codec=None) -> Codes:
    """The codes of a finished encode_database folder, memory-mapped read-only (a Codes).

    Accepted only when the manifest, every done marker and every part file agree. An unfinished build (a
    process killed or not done) is an error naming how far each process got, as is a codec other than the one
    the codes were made with (when codec is given) and a folder of the earlier one-file format (rebuild it).
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    st = codes_status(out_dir)
    if not st["complete"]:
        if st["settings"] is None:
            raise QincoInputError(f"{out_dir} is not a codes folder (no {MANIFEST} and no done markers)")
        late = [r for r, p in enumerate(st["processes"]) if p is None or p["rows_done"] < p["hi"]]
        raise QincoInputError(
            f"{out_dir}: the database encoding is unfinished ({st['done']:,} of {st['n']:,} rows encoded"
            + (f"; {describe(st['processes'], late[:8])}" if late else "; the manifest was not written")
            + "; the build was interrupted): run encode_database / `eval/search.py build` again with the same "
              "arguments to resume it")
    s = st["manifest"]
    if codec is not None and fingerprint(codec) != s["fingerprint"]:
        raise QincoInputError(f"{out_dir}: these codes were made with another codec (fingerprint "
                              f"{s['fingerprint'][:12]}, this codec {fingerprint(codec)[:12]})")
    R = s["process_count"]
    steps = Rows([map_part(part_path(out_dir, r, R, "steps.npy"), *part_shape(s, r, "steps.npy")) for r in range(R)])
    lists = None if not s["nlist"] else Rows(
        [map_part(part_path(out_dir, r, R, "lists.npy"), *part_shape(s, r, "lists.npy")) for r in range(R)])
    return Codes(steps, lists, s)
