"""Small file helpers shared by the library, training and evaluation: JSON files, written atomically and read
within a size and a depth cap."""

from __future__ import annotations

import json
import os
import stat
import tempfile

import numpy as np

from qinco_jax.checks import QincoInputError

MAX_JSON_BYTES = 16 << 20  # the project's JSON files are kilobytes; results tables stay far below this
MAX_JSON_DEPTH = 32


def _json_default(obj):
    """JSON encoding of numpy scalars and arrays."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def write_json(path, obj) -> None:
    """Write obj as indented JSON to path atomically (temporary file in the same folder, then os.replace)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.fchmod(fd, umask_mode(0o666))  # mkstemp makes 0600; the file gets the mode open() would give it
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def umask_mode(mode: int) -> int:
    """mode as the process's umask lets it be (what open() and mkdir() give, not tempfile's 0600 / 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def _depth(obj) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, [] or {} is 1), without recursion."""
    depth, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        depth = max(depth, d)
        stack.extend((c, d + 1) for c in children)
    return depth


def read_bounded_json(path, what: str, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> dict:
    """The JSON object of a regular file of at most max_bytes, nested at most max_depth deep.

    Made for the small JSON files this project writes (manifests, progress markers, index metadata, run
    summaries and results). A missing file, a directory, FIFO or device, a file over the size cap, invalid
    UTF-8 or JSON, deeper nesting or a value other than an object is a QincoInputError naming `what`.
    """
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO cannot block the open
    except FileNotFoundError:
        raise QincoInputError(f"{what}: {path} does not exist") from None
    except OSError as e:
        raise QincoInputError(f"{what}: cannot read {path}: {e.strerror}") from None
    st = os.fstat(fd)  # checked on the open descriptor, so the file read is the file checked
    if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
        os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise QincoInputError(f"{what}: {path} is not a regular file")
        raise QincoInputError(f"{what}: {path} holds {st.st_size:,} bytes, over the {max_bytes:,} of a JSON file")
    with os.fdopen(fd, "rb") as f:
        try:
            raw = f.read(max_bytes + 1)
        except OSError as e:
            raise QincoInputError(f"{what}: cannot read {path}: {e.strerror}") from None
    if len(raw) > max_bytes:
        raise QincoInputError(f"{what}: {path} holds over {max_bytes:,} bytes, the cap of a JSON file")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise QincoInputError(f"{what}: {path} nests more than {max_depth} deep") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise QincoInputError(f"{what}: cannot read {path}: {e}") from None
    if _depth(obj) > max_depth:
        raise QincoInputError(f"{what}: {path} nests more than {max_depth} deep")
    if not isinstance(obj, dict):
        raise QincoInputError(f"{what}: {path} holds a JSON {type(obj).__name__}, expected an object")
    return obj


MAX_NPZ_BYTES = 4 << 30


def read_npz(path, what: str, members: dict, required=(), *, max_bytes: int = MAX_NPZ_BYTES,
             check_shapes=None) -> dict:
    """The arrays of an .npz archive, each checked from the archive's headers before anything is inflated.

    members maps each allowed array name to (dtype, ndim). The archive must be a regular file; every entry
    must be one of them (stored or deflated), its .npy header must give that dtype and ndim (no object arrays,
    no pickles), its declared size must equal the header's shape times the item size, and all declared sizes
    together must stay within max_bytes; check_shapes({name: shape}), if given, may refuse the shapes (raising
    QincoInputError) before any data is inflated. Inflating never goes past a declared size (zipfile stops
    there and checks the CRC), so memory stays bounded whatever the file claims. A QincoInputError names
    `what` and the entry otherwise.
    """
    import zipfile

    path = os.fspath(path)
    fd = open_regular(path, what)
    with os.fdopen(fd, "rb") as f:
        try:
            z = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise QincoInputError(f"{what}: {path} is not an .npz archive ({e})") from None
        with z:
            infos = z.infolist()
            if len(infos) > len(members):
                raise QincoInputError(f"{what}: {path} holds {len(infos):,} entries, at most {len(members)} expected")
            names = [i.filename[:-4] if i.filename.endswith(".npy") else i.filename for i in infos]
            unknown = sorted(set(names) - set(members))
            missing = sorted(set(required) - set(names))
            if unknown or missing or len(set(names)) != len(names):
                raise QincoInputError(f"{what}: {path} has entries {sorted(names)[:10]}; expected "
                                      f"{sorted(required)} and optionally {sorted(set(members) - set(required))}")
            if sum(i.file_size for i in infos) > max_bytes:
                raise QincoInputError(f"{what}: {path} declares {sum(i.file_size for i in infos):,} bytes of "
                                      f"arrays, over the budget of {max_bytes:,}")
            heads = {n: _npy_entry(z, i, members[n], f"{what}: {path}: {n}") for n, i in zip(names, infos)}
            if check_shapes is not None:
                check_shapes({n: h[0] for n, h in heads.items()})
            return {n: _npy_entry(z, i, members[n], f"{what}: {path}: {n}", read=True) for n, i in zip(names, infos)}


def open_regular(path: str, what: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise QincoInputError(f"{what}: cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise QincoInputError(f"{what}: {path} is not a regular file")
    return fd


def _npy_entry(z, info, spec: tuple, where: str, read: bool = False):
    """(shape, header bytes) of a .npy entry, checked against spec (dtype, ndim); with read, its array."""
    import zipfile

    dtype, ndim = np.dtype(spec[0]), spec[1]
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise QincoInputError(f"{where}: compression method {info.compress_type} (expected stored or deflated)")
    try:
        with z.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version != (1, 0):  # what np.save writes for these arrays; 2.0 headers may claim 4 GB
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran, got = np.lib.format.read_array_header_1_0(f, max_header_size=10000)
            start = f.tell()
            if got != dtype or len(shape) != ndim or fortran:
                raise QincoInputError(f"{where}: a {got} array of shape {shape} (fortran order {fortran}); "
                                      f"expected {dtype} with {ndim} dimensions")
            nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if start + nbytes != info.file_size:
                raise QincoInputError(f"{where}: the header's shape {shape} needs {nbytes:,} bytes, the entry "
                                      f"declares {info.file_size - start:,}")
            if not read:
                return shape, start
            raw = f.read(nbytes)
    except QincoInputError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, SyntaxError, RuntimeError) as e:
        raise QincoInputError(f"{where}: unreadable ({str(e)[:200]})") from None
    if len(raw) != nbytes:
        raise QincoInputError(f"{where}: {len(raw):,} bytes where the header needs {nbytes:,}")
    return np.frombuffer(raw, dtype).reshape(shape).copy()
