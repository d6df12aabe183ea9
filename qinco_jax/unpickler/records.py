"""The inert stand-ins that a checkpoint pickle is rebuilt from (see qinco_jax.unpickler).

Module classes become `ModuleRecord` subclasses that only keep their attribute dict; torch storage
types, numpy dtypes and scalars become whitelisted type codes; torch's tensor and parameter rebuild
functions slice numpy arrays out of the archive's storage records (offset, size and stride checked
against the record length); sets and dict keys are limited to values whose hashes a file cannot make
collide. Nothing here imports or calls anything that a file names.
"""

from __future__ import annotations

import math

import numpy as np

from qinco_jax.checks import CheckpointError, short

STORAGE_DTYPES = {
    "FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "BFloat16Storage": "bf16",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "b1",
}
_NUMPY_DTYPES = frozenset({"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"})


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


def record_class(module: str, name: str) -> type:
    """A new ModuleRecord subclass for a replaced class (so pickle's NEWOBJ / BUILD see a class).

    Made afresh for every load: nothing a file does to it can reach another load.
    """
    return type(name, (ModuleRecord,), {"torch_class": f"{module}.{name}", "__module__": __name__})


class StorageType:
    """Inert stand-in for torch.<X>Storage: the element type of a storage record."""

    def __init__(self, name: str):
        self.name, self.code = name, STORAGE_DTYPES[name]


class DtypeSpec:
    """Inert stand-in for a pickled numpy.dtype: a whitelisted type code and a byte order."""

    def __init__(self, code, align=False, copy=True):
        if not isinstance(code, str) or code not in _NUMPY_DTYPES:
            raise CheckpointError(f"refused numpy dtype {short(code)} (allowed: {sorted(_NUMPY_DTYPES)})")
        self.code, self.order = code, "="

    def __setstate__(self, state):
        """Accept numpy's dtype state tuple; only its byte-order field is used."""
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "=", "|"):
            raise CheckpointError(f"unexpected numpy dtype state {short(state)}")
        self.order = state[1]

    def numpy(self) -> np.dtype:
        """The numpy dtype it stands for."""
        return np.dtype(self.code).newbyteorder(self.order)


def numpy_scalar(dtype, data=None):
    """Stand-in for numpy's scalar reconstructor: a whitelisted dtype and its raw bytes."""
    if not isinstance(dtype, DtypeSpec) or not isinstance(data, bytes):
        raise CheckpointError("malformed numpy scalar in the checkpoint")
    dt = dtype.numpy()
    if len(data) != dt.itemsize:
        raise CheckpointError(f"numpy scalar of dtype {dt} has {len(data)} bytes, expected {dt.itemsize}")
    return np.frombuffer(data, dt)[0]


def latin1_encode(obj, encoding="utf-8", errors="strict"):
    """Stand-in for _codecs.encode as used by protocol-2 pickles of bytes (latin-1 only)."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise CheckpointError(f"refused _codecs.encode with encoding {short(encoding)}")
    return obj.encode("latin1")


# ----------------------------------------------------------------------------------------------
# Storages and tensors


def check_ints(values, what: str, max_len: int = 64) -> tuple:
    """A short tuple of non-negative Python ints (bools refused)."""
    if isinstance(values, int) and not isinstance(values, bool):
        values = (values,)
    if not isinstance(values, (tuple, list)) or len(values) > max_len or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62 for v in values
    ):
        raise CheckpointError(f"malformed tensor {what} {short(values)} in the checkpoint")
    return tuple(values)


class Storage:
    """A tensor storage: reads and types its archive record on first use."""

    def __init__(self, archive, key: str, stype: StorageType, numel: int):
        """archive: the qinco_jax.unpickler.archive record reader that holds data/<key>."""
        self.archive, self.key, self.stype, self.numel = archive, key, stype, numel

    def array(self) -> np.ndarray:
        """The storage's numel elements as a native-endian 1-D numpy array."""
        return self.archive.storage_array(self.key, self.stype, self.numel)


def rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                      metadata=None):
    """Stand-in for torch._utils._rebuild_tensor_v2: a numpy copy of the tensor's elements."""
    if not isinstance(storage, Storage):
        raise CheckpointError("a tensor in the checkpoint is not backed by a storage record")
    (offset,) = check_ints(storage_offset, "offset")
    size, stride = check_ints(size, "size"), check_ints(stride, "stride")
    if len(size) != len(stride):
        raise CheckpointError(f"tensor size {short(size)} and stride {short(stride)} have different lengths")
    storage.archive.count_ref(storage.key)
    flat = storage.array()
    if 0 in size:
        return np.zeros(size, flat.dtype)
    need = max(offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1, math.prod(size))
    if need > flat.size:
        raise CheckpointError(
            f"storage record data/{storage.key} holds {flat.size} elements; a tensor of size {short(size)} "
            f"at offset {offset} needs {need}: the file is truncated or corrupt"
        )
    storage.archive.total.take(math.prod(size) * flat.itemsize, f"tensor of size {short(size)} in {storage.archive.path!r}")
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=[s * flat.itemsize for s in stride])
    return np.array(view, copy=True)


def rebuild_parameter(data, requires_grad=True, backward_hooks=None):
    """Stand-in for torch._utils._rebuild_parameter: the tensor itself."""
    if not isinstance(data, np.ndarray):
        raise CheckpointError("a parameter in the checkpoint does not wrap a tensor")
    return data


def rebuild_parameter_with_state(data, requires_grad=True, backward_hooks=None, state=None):
    """Stand-in for torch._utils._rebuild_parameter_with_state: the tensor (its extra state is dropped)."""
    return rebuild_parameter(data)


# ----------------------------------------------------------------------------------------------
# Sets and dict keys


def hashable_key(key, where: str):
    """A dict key or set element whose hash a file cannot make collide (str, bytes, bounded int, None)."""
    if key is None or isinstance(key, (str, bytes)):
        return key
    if isinstance(key, int) and -(1 << 60) < key < 1 << 60:
        return key
    raise CheckpointError(f"refused {where} {short(key)}: only strings and small integers are allowed as keys")


def new_set(items=()):
    """Stand-in for builtins.set: a set of strings or small integers."""
    if not isinstance(items, (list, tuple)):
        raise CheckpointError(f"refused set({short(items)})")
    return {hashable_key(k, "set element") for k in items}

