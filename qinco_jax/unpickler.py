"""A restricted unpickler for PyTorch checkpoint archives: reads them without torch and without
running code from the file.

`torch.save` writes a zip archive holding `<prefix>/data.pkl` (a pickle) and one raw little-endian
record `<prefix>/data/<key>` per tensor storage. A normal unpickler would import and call whatever
globals the pickle names, so `data.pkl` is read by `RestrictedUnpickler`, whose `find_class` maps a
short, fixed list of globals to inert stand-ins:

- the QINCo / QINCoLR / IVFQINCo / QINCoStep / torch.nn module classes -> `ModuleRecord` subclasses that only keep
  their attribute dict;
- torch's tensor / parameter rebuild functions -> functions that slice numpy arrays out of the
  storage records (offset, size and stride checked against the record length);
- numpy scalars and dtypes (the pickled `db_scale`) -> whitelisted numeric dtypes only;
- `collections.OrderedDict`, `set` and `_codecs.encode` (latin-1 only).

Every other global raises `CheckpointError` before anything is called. qinco_jax.torch_format
turns the resulting record tree into a codec.

Hostile files: only regular files are opened; every read runs under the budgets of
`qinco_jax.limits` (file, record and total decompressed bytes, pickle opcodes, container sizes and
nesting depth, references per storage record, time). The pickle runs on a restricted interpreter
(a subclass of the pure-Python unpickler) that only calls the stand-ins above, only lets BUILD set
the state of module records it created itself, refuses dict keys and set elements whose hashes can
be made to collide, and builds new objects for every load, so that a refused file changes nothing
in the process. Error messages show values through `checks.short`, never a full repr.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import os
import pickle
import re
import stat
import zipfile

import numpy as np

from qinco_jax import limits as limits_mod
from qinco_jax.checks import CheckpointError, short
from qinco_jax.limits import Budget, Limits

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
_QINCO_CLASSES = frozenset({"QINCo", "QINCoLR", "IVFQINCo", "QINCoStep", "PQ_QINCo"})
_UNSUPPORTED: dict = {}  # QINCo v1 classes that are recognised but not loadable (none at present)
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


def _record_class(module: str, name: str) -> type:
    """A new ModuleRecord subclass for a replaced class (so pickle's NEWOBJ / BUILD see a class).

    Made afresh for every load: nothing a file does to it can reach another load.
    """
    return type(name, (ModuleRecord,), {"torch_class": f"{module}.{name}", "__module__": __name__})


class _StorageType:
    """Inert stand-in for torch.<X>Storage: the element type of a storage record."""

    def __init__(self, name: str):
        self.name, self.code = name, _STORAGE_DTYPES[name]


class _DtypeSpec:
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
        raise CheckpointError(f"refused _codecs.encode with encoding {short(encoding)}")
    return obj.encode("latin1")


# ----------------------------------------------------------------------------------------------
# Storages and tensors


def _check_ints(values, what: str, max_len: int = 64) -> tuple:
    """A short tuple of non-negative Python ints (bools refused)."""
    if isinstance(values, int) and not isinstance(values, bool):
        values = (values,)
    if not isinstance(values, (tuple, list)) or len(values) > max_len or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62 for v in values
    ):
        raise CheckpointError(f"malformed tensor {what} {short(values)} in the checkpoint")
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


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None):
    """Stand-in for torch._utils._rebuild_parameter: the tensor itself."""
    if not isinstance(data, np.ndarray):
        raise CheckpointError("a parameter in the checkpoint does not wrap a tensor")
    return data


def _rebuild_parameter_with_state(data, requires_grad=True, backward_hooks=None, state=None):
    """Stand-in for torch._utils._rebuild_parameter_with_state: the tensor (its extra state is dropped)."""
    return _rebuild_parameter(data)


def _hashable_key(key, where: str):
    """A dict key or set element whose hash a file cannot make collide (str, bytes, bounded int, None)."""
    if key is None or isinstance(key, (str, bytes)):
        return key
    if isinstance(key, int) and -(1 << 60) < key < 1 << 60:
        return key
    raise CheckpointError(f"refused {where} {short(key)}: only strings and small integers are allowed as keys")


def _new_set(items=()):
    """Stand-in for builtins.set: a set of strings or small integers."""
    if not isinstance(items, (list, tuple)):
        raise CheckpointError(f"refused set({short(items)})")
    return {_hashable_key(k, "set element") for k in items}


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): _new_set,
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "dtype"): _DtypeSpec,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
}
_CALLABLE = tuple(v for v in _SAFE_GLOBALS.values() if v is not collections.OrderedDict)


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """Python 2 names (as protocol-2 pickles write them, e.g. __builtin__.set) mapped as pickle does."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def resolve_global(module: str, name: str):
    """The inert stand-in for a global named by a checkpoint pickle; CheckpointError for any other.

    Module classes get a new ModuleRecord subclass at every call.
    """
    if not isinstance(module, str) or not isinstance(name, str):
        raise CheckpointError(f"refused global {short(module)}.{short(name)}")
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
                f"{module}.{name}: {_UNSUPPORTED[name]} checkpoints are not supported (only QINCo, QINCo-LR, IVF-QINCo and PQ-QINCo)"
            )
    written, shown = short(written, 120)[1:-1], f"{short(module, 80)[1:-1]}.{short(name, 80)[1:-1]}"
    hint = "" if written == f"{module}.{name}" else f" (written as {written})"
    if module.rsplit(".", 1)[-1] == "train_qinco":
        hint += " (this looks like a multi-GPU training checkpoint; load the model saved with --model instead)"
    raise CheckpointError(f"refused to load global {shown}: it is not part of a QINCo v1 checkpoint{hint}")


# ----------------------------------------------------------------------------------------------
# The restricted pickle interpreter

_OP = {name: getattr(pickle, name)[0] for name in (
    "BUILD", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "INST", "OBJ", "EXT1", "EXT2", "EXT4", "APPEND", "APPENDS",
    "SETITEM", "SETITEMS", "ADDITEMS", "LIST", "TUPLE", "DICT", "FROZENSET",
)}


class RestrictedUnpickler(pickle._Unpickler):
    """Unpickler that resolves only the globals of a QINCo v1 checkpoint, to inert stand-ins.

    It is the pure-Python interpreter with the opcodes that call, build or fill objects replaced by
    checked versions, run under the budgets of `limits` (opcodes, container sizes, time).
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, archive: "_Archive | None" = None, limits: Limits | None = None):
        super().__init__(file)
        self._archive = archive
        self._limits = limits or (archive.limits if archive is not None else limits_mod.DEFAULT)
        self._deadline = archive.deadline if archive is not None else self._limits.deadline()
        self._items = Budget(self._limits.max_items, "container elements")
        self._classes: dict = {}

    # -- globals and persistent ids

    def find_class(self, module, name):
        """Every global goes through the whitelist; nothing is imported."""
        key = (module, name)
        if key not in self._classes:
            self._classes[key] = resolve_global(module, name)
        return self._classes[key]

    def persistent_load(self, pid):
        """('storage', type, key, location, numel) -> a lazily read storage record (location ignored)."""
        if self._archive is None:
            raise CheckpointError("the pickle refers to external storages but is not inside a torch archive")
        return self._archive.storage(pid)

    # -- the interpreter loop, with an opcode and time budget

    def load(self):
        """Run the pickle; CheckpointError once it runs past max_pickle_ops or the time budget."""
        self._unframer = pickle._Unframer(self._file_read, self._file_readline)
        self.read, self.readinto, self.readline = self._unframer.read, self._unframer.readinto, self._unframer.readline
        self.metastack, self.stack, self.proto = [], [], 0
        self.append = self.stack.append
        read, dispatch, ops, max_ops = self.read, self.dispatch, 0, self._limits.max_pickle_ops
        try:
            while True:
                key = read(1)
                if not key:
                    raise EOFError("the pickle ends without a STOP opcode")
                if key[0] not in dispatch:
                    raise CheckpointError(f"unknown pickle opcode {key!r}: the pickle is corrupt")
                dispatch[key[0]](self)
                ops += 1
                if not ops & 0xFFF:
                    if ops > max_ops:
                        raise CheckpointError(f"the pickle runs more than {max_ops:,} opcodes; refused")
                    self._deadline.check("unpickling")
        except pickle._Stop as stop:
            return stop.value

    # -- containers: sizes, and keys whose hashes cannot be made to collide

    def _grow(self, container, n: int) -> None:
        self._items.take(n, "the pickle")
        if len(container) + n > self._limits.max_container_items:
            raise CheckpointError(
                f"a {type(container).__name__} in the pickle holds more than {self._limits.max_container_items:,} "
                "elements; refused"
            )

    def _setitems(self, d, items) -> None:
        if type(d) not in (dict, collections.OrderedDict):
            raise CheckpointError(f"the pickle sets items on a {type(d).__name__}, not a dict")
        self._grow(d, len(items) // 2)
        for i in range(0, len(items) - 1, 2):
            d[_hashable_key(items[i], "dict key")] = items[i + 1]

    def _load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self._setitems(self.stack[-1], [key, value])

    def _load_setitems(self):
        items = self.pop_mark()
        self._setitems(self.stack[-1], items)

    def _load_dict(self):
        items = self.pop_mark()
        d = {}
        self._setitems(d, items)
        self.append(d)

    def _load_append(self):
        value = self.stack.pop()
        self._extend(self.stack[-1], [value])

    def _load_appends(self):
        items = self.pop_mark()
        self._extend(self.stack[-1], items)

    def _extend(self, lst, items) -> None:
        if type(lst) is not list:
            raise CheckpointError(f"the pickle appends to a {type(lst).__name__}, not a list")
        self._grow(lst, len(items))
        lst.extend(items)

    def _load_additems(self):
        items = self.pop_mark()
        s = self.stack[-1]
        if type(s) is not set:
            raise CheckpointError(f"the pickle adds items to a {type(s).__name__}, not a set")
        self._grow(s, len(items))
        s.update(_hashable_key(k, "set element") for k in items)

    def _load_frozenset(self):
        items = self.pop_mark()
        self._grow((), len(items))
        self.append(frozenset(_hashable_key(k, "set element") for k in items))

    def _load_list(self):
        items = self.pop_mark()
        self._grow((), len(items))
        self.append(items)

    def _load_tuple(self):
        items = self.pop_mark()
        self._grow((), len(items))
        self.append(tuple(items))

    # -- calls and object state: only the stand-ins, only on objects made by this load

    def _load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if not isinstance(args, tuple):
            raise CheckpointError(f"the pickle calls {short(func)} with {short(args)}, not an argument tuple")
        if func is collections.OrderedDict:
            if args:
                raise CheckpointError("the pickle builds an OrderedDict from arguments; refused")
            self.stack[-1] = collections.OrderedDict()
        elif any(func is f for f in _CALLABLE) or self._is_record_class(func):
            self.stack[-1] = func(*args)
        else:
            raise CheckpointError(f"the pickle calls {short(func)}, which is not a checkpoint stand-in; refused")

    def _load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        if cls is collections.OrderedDict and args == ():
            self.append(collections.OrderedDict())
        elif self._is_record_class(cls) and isinstance(args, tuple):
            self.append(cls.__new__(cls))
        else:
            raise CheckpointError(f"the pickle creates an object of {short(cls)}; refused")

    def _load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is _DtypeSpec or (isinstance(inst, ModuleRecord) and self._is_record_class(type(inst))):
            inst.__setstate__(state)
        elif type(inst) is collections.OrderedDict and isinstance(state, dict) and set(state) <= {"_metadata"}:
            pass  # a state_dict's _metadata attribute (module versions): not needed, dropped
        else:
            raise CheckpointError(f"the pickle sets the state of {short(inst)}; refused (only module records have one)")

    def _is_record_class(self, cls) -> bool:
        """A ModuleRecord class made by this load (never a shared one)."""
        return isinstance(cls, type) and issubclass(cls, ModuleRecord) and any(cls is c for c in self._classes.values())

    def _refuse(self):
        raise CheckpointError("the pickle uses an opcode that QINCo checkpoints never contain; refused")

    dispatch[_OP["SETITEM"]] = _load_setitem
    dispatch[_OP["SETITEMS"]] = _load_setitems
    dispatch[_OP["DICT"]] = _load_dict
    dispatch[_OP["APPEND"]] = _load_append
    dispatch[_OP["APPENDS"]] = _load_appends
    dispatch[_OP["ADDITEMS"]] = _load_additems
    dispatch[_OP["FROZENSET"]] = _load_frozenset
    dispatch[_OP["LIST"]] = _load_list
    dispatch[_OP["TUPLE"]] = _load_tuple
    dispatch[_OP["REDUCE"]] = _load_reduce
    dispatch[_OP["NEWOBJ"]] = _load_newobj
    dispatch[_OP["BUILD"]] = _load_build
    for _name in ("NEWOBJ_EX", "INST", "OBJ", "EXT1", "EXT2", "EXT4"):
        dispatch[_OP[_name]] = _refuse


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

    def storage(self, pid) -> _Storage:
        """Validate a persistent id and return its (lazy) storage."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"unexpected persistent id {short(pid)} in {self.path!r}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise CheckpointError(f"persistent id {short(pid)} does not name a torch storage type")
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise CheckpointError(f"malformed storage key {short(key)} in {self.path!r}")
        (numel,) = _check_ints(numel, "storage size")
        self.count_ref(key)
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
