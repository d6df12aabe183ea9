"""A restricted unpickler for PyTorch checkpoint archives: reads them without torch and without
running code from the file.

`torch.save` writes a zip archive holding `<prefix>/data.pkl` (a pickle) and one raw little-endian
record `<prefix>/data/<key>` per tensor storage. A normal unpickler would import and call whatever
globals the pickle names, so `data.pkl` is read by `RestrictedUnpickler`, whose `find_class` maps a
short, fixed list of globals to inert stand-ins:

- the QINCo / QINCoStep / torch.nn module classes -> `ModuleRecord` subclasses that only keep
  their attribute dict;
- torch's tensor / parameter rebuild functions -> functions that slice numpy arrays out of the
  storage records (offset, size and stride checked against the record length);
- numpy scalars and dtypes (the pickled `db_scale`) -> whitelisted numeric dtypes only;
- `collections.OrderedDict`, `set` and `_codecs.encode` (latin-1 only).

Every other global raises `CheckpointError` before anything is called. qinco_jax.torch_format
turns the resulting record tree into a codec.
"""

from __future__ import annotations

import _compat_pickle
import collections
import functools
import io
import math
import os
import pickle
import pickletools
import re
import zipfile

import numpy as np

from qinco_jax.checks import CheckpointError


MAX_PICKLE_BYTES = 64 << 20  # data.pkl of a real model is tens of KB; its tensors live elsewhere

_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."  # pickled torch legacy magic number

_STORAGE_DTYPES = {
    "FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "BFloat16Storage": "bf16",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "b1",
}
_NUMPY_DTYPES = frozenset({"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"})
_TORCH_MODULES = frozenset({
    ("torch.nn.modules.sparse", "Embedding"), ("torch.nn.modules.linear", "Linear"),
    ("torch.nn.modules.container", "Sequential"), ("torch.nn.modules.container", "ModuleList"),
    ("torch.nn.modules.activation", "ReLU"),
})
_QINCO_CLASSES = frozenset({"QINCo", "QINCoLR", "QINCoStep"})
_UNSUPPORTED = {"IVFQINCo": "IVF-QINCo", "PQ_QINCo": "PQ-QINCo"}
_MEMO_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})
_KEY_RE = re.compile(r"[A-Za-z0-9_.]{1,64}")


# ----------------------------------------------------------------------------------------------
# Inert stand-ins


class ModuleRecord:
    """Inert stand-in for a pickled nn.Module: its class name and attribute dict, nothing else."""

    torch_class = "?"  # "module.Name" of the class it replaces
    state = None

    def __init__(self, *args, **kwargs):
        self.state = None

    def __setstate__(self, state):
        """Keep the attribute dict (pickle BUILD)."""
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.torch_class} has a state of type {type(state).__name__}, expected a dict")
        self.state = state

    @property
    def name(self) -> str:
        """The class name without its module (e.g. 'QINCoStep')."""
        return self.torch_class.rsplit(".", 1)[-1]


@functools.lru_cache(maxsize=None)
def _record_class(module: str, name: str) -> type:
    """One ModuleRecord subclass per replaced class (so pickle's NEWOBJ / BUILD see a class)."""
    return type(name, (ModuleRecord,), {"torch_class": f"{module}.{name}", "__module__": __name__})


class _StorageType:
    """Inert stand-in for torch.<X>Storage: the element type of a storage record."""

    def __init__(self, name: str):
        self.name, self.code = name, _STORAGE_DTYPES[name]


class _DtypeSpec:
    """Inert stand-in for a pickled numpy.dtype: a whitelisted type code and a byte order."""

    def __init__(self, code, align=False, copy=True):
        if not isinstance(code, str) or code not in _NUMPY_DTYPES:
            raise CheckpointError(f"refused numpy dtype {code!r} (allowed: {sorted(_NUMPY_DTYPES)})")
        self.code, self.order = code, "="

    def __setstate__(self, state):
        """Accept numpy's dtype state tuple; only its byte-order field is used."""
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "=", "|"):
            raise CheckpointError(f"unexpected numpy dtype state {state!r:.80}")
        self.order = state[1]

    def numpy(self) -> np.dtype:
        """The numpy dtype it stands for."""
        return np.dtype(self.code).newbyteorder(self.order)


def _numpy_scalar(dtype, data=None):
    """Stand-in for numpy's scalar reconstructor: a whitelisted dtype and its raw bytes."""
    if not isinstance(dtype, _DtypeSpec) or not isinstance(data, bytes):
        raise CheckpointError("malformed numpy scalar in the checkpoint")
    dt = dtype.numpy()
    if len(data) != dt.itemsize:
        raise CheckpointError(f"numpy scalar of dtype {dt} has {len(data)} bytes, expected {dt.itemsize}")
    return np.frombuffer(data, dt)[0]


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    """Stand-in for _codecs.encode as used by protocol-2 pickles of bytes (latin-1 only)."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise CheckpointError(f"refused _codecs.encode with encoding {encoding!r}")
    return obj.encode("latin1")


# ----------------------------------------------------------------------------------------------
# Storages and tensors


def _check_ints(values, what: str) -> tuple:
    """A tuple of non-negative Python ints (bools refused)."""
    if isinstance(values, int) and not isinstance(values, bool):
        values = (values,)
    if not isinstance(values, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
    ):
        raise CheckpointError(f"malformed tensor {what} {values!r:.80} in the checkpoint")
    return tuple(values)


class _Storage:
    """A tensor storage: reads and types its archive record on first use."""

    def __init__(self, archive: "_Archive", key: str, stype: _StorageType, numel: int):
        self.archive, self.key, self.stype, self.numel = archive, key, stype, numel

    def array(self) -> np.ndarray:
        """The storage's numel elements as a native-endian 1-D numpy array."""
        return self.archive.storage_array(self.key, self.stype, self.numel)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """Stand-in for torch._utils._rebuild_tensor_v2: a numpy copy of the tensor's elements."""
    if not isinstance(storage, _Storage):
        raise CheckpointError("a tensor in the checkpoint is not backed by a storage record")
    (offset,) = _check_ints(storage_offset, "offset")
    size, stride = _check_ints(size, "size"), _check_ints(stride, "stride")
    if len(size) != len(stride):
        raise CheckpointError(f"tensor size {size} and stride {stride} have different lengths")
    flat = storage.array()
    if 0 in size:
        return np.zeros(size, flat.dtype)
    need = max(offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1, math.prod(size))
    if need > flat.size:
        raise CheckpointError(
            f"storage record data/{storage.key} holds {flat.size} elements; a tensor of size {size} "
            f"at offset {offset} needs {need}: the file is truncated or corrupt"
        )
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=[s * flat.itemsize for s in stride])
    return np.array(view, copy=True)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None):
    """Stand-in for torch._utils._rebuild_parameter: the tensor itself."""
    if not isinstance(data, np.ndarray):
        raise CheckpointError("a parameter in the checkpoint does not wrap a tensor")
    return data


def _rebuild_parameter_with_state(data, requires_grad=True, backward_hooks=None, state=None):
    """Stand-in for torch._utils._rebuild_parameter_with_state: the tensor (its extra state is dropped)."""
    return _rebuild_parameter(data)


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "dtype"): _DtypeSpec,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
}


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """Python 2 names (as protocol-2 pickles write them, e.g. __builtin__.set) mapped as pickle does."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def resolve_global(module: str, name: str):
    """The inert stand-in for a global named by a checkpoint pickle; CheckpointError for any other."""
    written = f"{module}.{name}"
    module, name = _python3_name(module, name)
    if (module, name) in _SAFE_GLOBALS:
        return _SAFE_GLOBALS[(module, name)]
    if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
        return _StorageType(name)
    if (module, name) in _TORCH_MODULES:
        return _record_class(module, name)
    if module.rsplit(".", 1)[-1] == "model_qinco":
        if name in _QINCO_CLASSES:
            return _record_class(module, name)
        if name in _UNSUPPORTED:
            raise CheckpointError(
                f"{module}.{name}: {_UNSUPPORTED[name]} checkpoints are not supported (only QINCo and QINCo-LR)"
            )
    hint = "" if written == f"{module}.{name}" else f" (written as {written})"
    if module.rsplit(".", 1)[-1] == "train_qinco":
        hint += " (this looks like a multi-GPU training checkpoint; load the model saved with --model instead)"
    raise CheckpointError(f"refused to load global {module}.{name}: it is not part of a QINCo v1 checkpoint{hint}")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals of a QINCo v1 checkpoint, to inert stand-ins."""

    def __init__(self, file, archive: "_Archive | None" = None):
        super().__init__(file)
        self._archive = archive

    def find_class(self, module, name):
        """Every global goes through the whitelist; nothing is imported."""
        return resolve_global(module, name)

    def persistent_load(self, pid):
        """('storage', type, key, location, numel) -> a lazily read storage record (location ignored)."""
        if self._archive is None:
            raise CheckpointError("the pickle refers to external storages but is not inside a torch archive")
        return self._archive.storage(pid)


# ----------------------------------------------------------------------------------------------
# The zip archive


def _not_zip_message(path: str, head: bytes, err: Exception) -> str:
    """Explain why a file that zipfile refuses is not a readable checkpoint."""
    if not head:
        return f"checkpoint {path!r} is empty"
    if head.startswith(b"PK"):
        return f"checkpoint {path!r} is a truncated or corrupt zip archive ({err})"
    if head.startswith(_LEGACY_MAGIC):
        return (
            f"checkpoint {path!r} uses the legacy (pre-zip) torch serialization format, which is not "
            "supported: re-save it with torch >= 1.6 (torch.save(torch.load(f, weights_only=False), g))"
        )
    if head[:1] == b"\x80":
        return f"{path!r} is a plain pickle, not a torch checkpoint (a zip archive with data.pkl); it was not loaded"
    return f"{path!r} is not a torch checkpoint (not a zip archive)"


class _Archive:
    """The records of a torch zip checkpoint, read with errors that name the file."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.zf = _open_zip(self.path)
        self.prefix = _find_prefix(self.zf, self.path)
        self.byteorder = self._byteorder()
        self._arrays: dict = {}

    def read(self, name: str, limit: int | None = None) -> bytes:
        """The bytes of record <prefix><name>."""
        full = self.prefix + name
        try:
            info = self.zf.getinfo(full)
        except KeyError:
            raise CheckpointError(
                f"checkpoint {self.path!r} has no record {full!r}: the file is truncated or corrupt"
            ) from None
        if limit is not None and info.file_size > limit:
            raise CheckpointError(f"record {full!r} of {self.path!r} is too large ({info.file_size} bytes)")
        try:
            return self.zf.read(info)
        except Exception as e:  # BadZipFile (CRC), zlib.error, EOFError, OSError on a cut file
            raise CheckpointError(
                f"cannot read record {full!r} of {self.path!r}: the file is truncated or corrupt ({e})"
            ) from None

    def _byteorder(self) -> str:
        """'<' or '>' from the optional byteorder record (little-endian when absent)."""
        if self.prefix + "byteorder" not in self.zf.namelist():
            return "<"
        order = self.read("byteorder").strip()
        if order not in (b"little", b"big"):
            raise CheckpointError(f"checkpoint {self.path!r} has an unknown byteorder record {order!r:.40}")
        return "<" if order == b"little" else ">"

    def storage(self, pid) -> _Storage:
        """Validate a persistent id and return its (lazy) storage."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"unexpected persistent id {pid!r:.80} in {self.path!r}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise CheckpointError(f"persistent id {pid!r:.80} does not name a torch storage type")
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise CheckpointError(f"malformed storage key {key!r:.80} in {self.path!r}")
        (numel,) = _check_ints(numel, "storage size")
        return _Storage(self, key, stype, numel)

    def storage_array(self, key: str, stype: _StorageType, numel: int) -> np.ndarray:
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

    def _decode(self, key: str, stype: _StorageType) -> np.ndarray:
        """All whole elements of one storage record, native-endian (bfloat16 widened to float32)."""
        code = "u2" if stype.code == "bf16" else stype.code
        dt = np.dtype(code).newbyteorder(self.byteorder if code != "b1" else "|")
        raw = self.read(f"data/{key}")
        arr = np.frombuffer(raw, dt, count=len(raw) // dt.itemsize).astype(dt.newbyteorder("="))
        if stype.code == "bf16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr


def _open_zip(path: str) -> zipfile.ZipFile:
    """Open the archive, or explain what the file is instead."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, not a .pt file")
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
        return zipfile.ZipFile(path)
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
        raise CheckpointError(f"{path!r} holds several data.pkl records ({found[:3]}); expected one")
    return found[0][: -len("data.pkl")]


def _prescan(data: bytes) -> None:
    """Parse the opcodes without running them; refuse memo indices a real pickle never uses.

    CPython's unpickler grows its memo to the largest index seen, so a corrupt index would
    allocate gigabytes before any global is resolved.
    """
    for op, arg, _ in pickletools.genops(data):
        if op.name in _MEMO_OPS and isinstance(arg, int) and arg > len(data):
            raise CheckpointError(f"memo index {arg} is out of range (the pickle is corrupt)")


def unpickle(data: bytes, archive: "_Archive | None" = None, what: str = "data.pkl"):
    """Restricted unpickling of checkpoint bytes, every failure reported as CheckpointError."""
    try:
        _prescan(data)
        return RestrictedUnpickler(io.BytesIO(data), archive).load()
    except CheckpointError:
        raise
    except Exception as e:  # UnpicklingError, EOFError, TypeError, MemoryError from a mangled stream, ...
        raise CheckpointError(f"{what} is corrupt: {type(e).__name__}: {e}") from None


def read_objects(path):
    """Unpickle a checkpoint's data.pkl into inert records (ModuleRecord, numpy arrays, dicts...)."""
    archive = _Archive(path)
    try:
        data = archive.read("data.pkl", limit=MAX_PICKLE_BYTES)
        return unpickle(data, archive, f"data.pkl of {archive.path!r}")
    finally:
        archive.zf.close()
