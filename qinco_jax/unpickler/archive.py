"""The torch zip archive around a checkpoint pickle, read under budgets (see qinco_jax.unpickler).

`torch.save` writes a zip archive holding `<prefix>/data.pkl` (a pickle) and one raw little-endian
record `<prefix>/data/<key>` per tensor storage. Only regular files are opened (`open_regular`, also
used for codec directories); the central directory, every record and the bytes decompressed and
materialised in all are checked against the budgets of `qinco_jax.limits`, and so is the nesting
depth of the unpickled tree (`check_depth`). `read_objects` runs data.pkl through the restricted
interpreter and returns the inert record tree.
"""

from __future__ import annotations

import collections
import io
import os
import re
import stat
import zipfile

import numpy as np

from qinco_jax import limits as limits_mod
from qinco_jax.checks import CheckpointError, short
from qinco_jax.limits import Budget, Limits
from qinco_jax.unpickler.interpreter import RestrictedUnpickler
from qinco_jax.unpickler.records import ModuleRecord, Storage, StorageType, check_ints

_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."  # pickled torch legacy magic number
_KEY_RE = re.compile(r"[A-Za-z0-9_.]{1,64}")


# ----------------------------------------------------------------------------------------------
# Nesting depth of an unpickled tree


def _children(obj):
    if isinstance(obj, dict):
        return obj.values()
    if isinstance(obj, (list, tuple, set, frozenset)):
        return obj
    if isinstance(obj, ModuleRecord) and isinstance(obj.state, dict):
        return (obj.state,)
    return ()


def _is_node(obj) -> bool:
    return isinstance(obj, (dict, list, tuple, set, frozenset, ModuleRecord))


def check_depth(root, max_depth: int, what: str) -> None:
    """Refuse object trees nested deeper than max_depth (longest path; shared nodes visited once)."""
    if not _is_node(root):
        return
    height: dict[int, int] = {}
    frames = [[root, iter(_children(root)), 0]]
    on_path = {id(root)}
    while frames:
        frame = frames[-1]
        for child in frame[1]:
            if not _is_node(child) or id(child) in on_path:
                continue
            if id(child) in height:
                frame[2] = max(frame[2], height[id(child)] + 1)
                continue
            if len(frames) >= max_depth:
                raise CheckpointError(f"{what} nests containers more than {max_depth} deep; refused")
            frames.append([child, iter(_children(child)), 0])
            on_path.add(id(child))
            break
        else:
            frames.pop()
            on_path.discard(id(frame[0]))
            height[id(frame[0])] = frame[2]
            if frame[2] >= max_depth:
                raise CheckpointError(f"{what} nests containers more than {max_depth} deep; refused")
            if frames:
                frames[-1][2] = max(frames[-1][2], frame[2] + 1)


# ----------------------------------------------------------------------------------------------
# The zip archive


def _not_zip_message(path: str, head: bytes, err: Exception) -> str:
    """Explain why a file that zipfile refuses is not a readable checkpoint."""
    if not head:
        return f"checkpoint {path!r} is empty"
    if head.startswith(b"PK"):
        return f"checkpoint {path!r} is a truncated or corrupt zip archive ({short(str(err), 200)[1:-1]})"
    if head.startswith(_LEGACY_MAGIC):
        return (
            f"checkpoint {path!r} uses the legacy (pre-zip) torch serialization format, which is not "
            "supported: re-save it with torch >= 1.6 (torch.save(torch.load(f, weights_only=False), g))"
        )
    if head[:1] == b"\x80":
        return f"{path!r} is a plain pickle, not a torch checkpoint (a zip archive with data.pkl); it was not loaded"
    return f"{path!r} is not a torch checkpoint (not a zip archive)"


def open_regular(path: str, limit: int, what: str = "checkpoint"):
    """Open a regular file for reading, refusing FIFOs, devices, directories and files over limit bytes.

    The file is opened without blocking (a FIFO cannot hang the caller) and checked on the open
    descriptor, so a file swapped after the check is still refused.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path!r} does not exist") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {path!r}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{what} {path!r} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{what} {path!r} is not a regular file (a FIFO, socket or device); refused")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {path!r}: {e.strerror}") from None
    f = os.fdopen(fd, "rb")
    st = os.fstat(f.fileno())
    if not stat.S_ISREG(st.st_mode):
        f.close()
        raise CheckpointError(f"{what} {path!r} is not a regular file; refused")
    if st.st_size > limit:
        f.close()
        raise CheckpointError(f"{what} {path!r} is {st.st_size:,} bytes, over the budget of {limit:,}; refused")
    return f


class _Archive:
    """The records of a torch zip checkpoint, read with errors that name the file, under budgets."""

    def __init__(self, path, limits: Limits | None = None):
        self.path = os.fspath(path)
        self.limits = limits or limits_mod.DEFAULT
        self.deadline = self.limits.deadline()
        self.total = Budget(self.limits.max_total_bytes, "bytes decompressed and materialised")
        self._refs: dict = collections.Counter()
        self.file = open_regular(self.path, self.limits.max_file_bytes)
        try:
            self.zf = _open_zip(self.path, self.file, self.limits)
            self.prefix = _find_prefix(self.zf, self.path)
            self.byteorder = self._byteorder()
        except BaseException:
            self.close()
            raise
        self._arrays: dict = {}

    def close(self) -> None:
        if getattr(self, "zf", None) is not None:
            self.zf.close()
        self.file.close()

    def read(self, name: str, limit: int | None = None) -> bytes:
        """The bytes of record <prefix><name>, read in pieces and stopped at the budgets."""
        full = self.prefix + name
        try:
            info = self.zf.getinfo(full)
        except KeyError:
            raise CheckpointError(
                f"checkpoint {self.path!r} has no record {full!r}: the file is truncated or corrupt"
            ) from None
        limit = min(self.limits.max_record_bytes, limit or self.limits.max_record_bytes)
        if info.file_size > limit:
            raise CheckpointError(
                f"record {full!r} of {self.path!r} is too large ({info.file_size:,} bytes, budget {limit:,})"
            )
        if info.file_size > max(4096, self.limits.max_compression_ratio * info.compress_size):
            raise CheckpointError(
                f"record {full!r} of {self.path!r} inflates {info.compress_size:,} bytes to {info.file_size:,}, "
                f"more than {self.limits.max_compression_ratio}x (a compression bomb); refused"
            )
        self.total.take(info.file_size, f"record {full!r} of {self.path!r}")
        out = bytearray()
        try:
            with self.zf.open(info) as f:
                while True:
                    piece = f.read(min(1 << 22, limit + 1 - len(out)))
                    if not piece:
                        break
                    out += piece
                    if len(out) > min(limit, info.file_size):
                        raise CheckpointError(f"record {full!r} of {self.path!r} holds more than it declares")
                    self.deadline.check(f"{self.path!r}")
        except CheckpointError:
            raise
        except Exception as e:  # BadZipFile (CRC), zlib.error, EOFError, OSError on a cut file
            raise CheckpointError(
                f"cannot read record {full!r} of {self.path!r}: the file is truncated or corrupt "
                f"({short(str(e), 200)[1:-1]})"
            ) from None
        return bytes(out)

    def _byteorder(self) -> str:
        """'<' or '>' from the optional byteorder record (little-endian when absent)."""
        try:
            self.zf.getinfo(self.prefix + "byteorder")
        except KeyError:
            return "<"
        order = self.read("byteorder", limit=64).strip()
        if order not in (b"little", b"big"):
            raise CheckpointError(f"checkpoint {self.path!r} has an unknown byteorder record {short(order)}")
        return "<" if order == b"little" else ">"

    def count_ref(self, key: str) -> None:
        """One more reference to storage record key (storages and tensors), within the budget."""
        self._refs[key] += 1
        if self._refs[key] > self.limits.max_refs_per_record:
            raise CheckpointError(
                f"storage record data/{key} of {self.path!r} is referenced more than "
                f"{self.limits.max_refs_per_record} times; refused"
            )

    def storage(self, pid) -> Storage:
        """Validate a persistent id and return its (lazy) storage."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"unexpected persistent id {short(pid)} in {self.path!r}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, StorageType):
            raise CheckpointError(f"persistent id {short(pid)} does not name a torch storage type")
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise CheckpointError(f"malformed storage key {short(key)} in {self.path!r}")
        (numel,) = check_ints(numel, "storage size")
        self.count_ref(key)
        return Storage(self, key, stype, numel)

    def storage_array(self, key: str, stype: StorageType, numel: int) -> np.ndarray:
        """The first numel elements of record data/<key> read as stype (records are cached)."""
        if (key, stype.code) not in self._arrays:
            self._arrays[(key, stype.code)] = self._decode(key, stype)
        arr = self._arrays[(key, stype.code)]
        if arr.size < numel:
            raise CheckpointError(
                f"storage record data/{key} of {self.path!r} holds {arr.size} elements, its {stype.name} "
                f"needs {numel}: the file is truncated or corrupt"
            )
        return arr[:numel]

    def _decode(self, key: str, stype: StorageType) -> np.ndarray:
        """All whole elements of one storage record, native-endian (bfloat16 widened to float32)."""
        code = "u2" if stype.code == "bf16" else stype.code
        dt = np.dtype(code).newbyteorder(self.byteorder if code != "b1" else "|")
        raw = self.read(f"data/{key}")
        arr = np.frombuffer(raw, dt, count=len(raw) // dt.itemsize).astype(dt.newbyteorder("="))
        if stype.code == "bf16":
            self.total.take(2 * arr.nbytes, f"record data/{key} of {self.path!r}")
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr


def _open_zip(path: str, file, limits: Limits) -> zipfile.ZipFile:
    """Open the archive (its central directory checked against the budgets first), or explain what
    the file is instead."""
    try:
        head = file.read(len(_LEGACY_MAGIC))
        file.seek(0)
        end = zipfile._EndRecData(file)
        if end is not None:
            entries, cd_size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
            if entries > limits.max_records or cd_size > limits.max_directory_bytes:
                raise CheckpointError(
                    f"checkpoint {path!r} lists {entries:,} records in a {cd_size:,}-byte directory, over the "
                    f"budget of {limits.max_records:,} records / {limits.max_directory_bytes:,} bytes; refused"
                )
        file.seek(0)
        return zipfile.ZipFile(file)
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {e}") from None
    except Exception as e:  # BadZipFile, and the odd ValueError / EOFError on mangled headers
        raise CheckpointError(_not_zip_message(path, head, e)) from None


def _find_prefix(zf: zipfile.ZipFile, path: str) -> str:
    """'<prefix>/' of the single top-level data.pkl record."""
    found = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if not found:
        raise CheckpointError(f"{path!r} is a zip archive but not a torch checkpoint: it has no <name>/data.pkl record")
    if len(found) > 1:
        raise CheckpointError(f"{path!r} holds several data.pkl records ({short(found)}); expected one")
    return found[0][: -len("data.pkl")]


def unpickle(data: bytes, archive: "_Archive | None" = None, what: str = "data.pkl", limits: Limits | None = None):
    """Restricted unpickling of checkpoint bytes, every failure reported as CheckpointError."""
    limits = limits or (archive.limits if archive is not None else limits_mod.DEFAULT)
    if len(data) > limits.max_pickle_bytes:
        raise CheckpointError(f"{what} is {len(data):,} bytes, over the budget of {limits.max_pickle_bytes:,}; refused")
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), archive, limits).load()
        check_depth(obj, limits.max_depth, what)
        return obj
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(f"{what} nests objects too deeply; refused") from None
    except Exception as e:  # UnpicklingError, EOFError, TypeError, KeyError, MemoryError from a mangled stream...
        raise CheckpointError(f"{what} is corrupt: {type(e).__name__}: {short(str(e), 200)[1:-1]}") from None


def read_objects(path, limits: Limits | None = None):
    """Unpickle a checkpoint's data.pkl into inert records (ModuleRecord, numpy arrays, dicts...)."""
    archive = _Archive(path, limits)
    try:
        data = archive.read("data.pkl", limit=archive.limits.max_pickle_bytes)
        return unpickle(data, archive, f"data.pkl of {archive.path!r}")
    finally:
        archive.close()
