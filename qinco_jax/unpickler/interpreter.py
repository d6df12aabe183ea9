"""The restricted pickle interpreter that reads a checkpoint's data.pkl (see qinco_jax.unpickler).

`resolve_global` maps the short, fixed list of globals a QINCo checkpoint names to the inert
stand-ins of qinco_jax.unpickler.records, and refuses every other global before anything is called.
`RestrictedUnpickler` is the pure-Python unpickler with the opcodes that call, build or fill objects
replaced by checked versions: it only calls the stand-ins, only lets BUILD set the state of module
records it created itself, refuses dict keys and set elements whose hashes can be made to collide,
and runs under the budgets of `qinco_jax.limits` (opcodes, container sizes, time).
"""

from __future__ import annotations

import _compat_pickle
import collections
import pickle

from qinco_jax import limits as limits_mod
from qinco_jax.checks import CheckpointError, short
from qinco_jax.limits import Budget, Limits
from qinco_jax.unpickler.records import (
    STORAGE_DTYPES,
    DtypeSpec,
    ModuleRecord,
    StorageType,
    hashable_key,
    latin1_encode,
    new_set,
    numpy_scalar,
    rebuild_parameter,
    rebuild_parameter_with_state,
    rebuild_tensor_v2,
    record_class,
)

# ----------------------------------------------------------------------------------------------
# The allowed globals

_TORCH_MODULES = frozenset({
    ("torch.nn.modules.sparse", "Embedding"), ("torch.nn.modules.linear", "Linear"),
    ("torch.nn.modules.container", "Sequential"), ("torch.nn.modules.container", "ModuleList"),
    ("torch.nn.modules.activation", "ReLU"),
})
_QINCO_CLASSES = frozenset({"QINCo", "QINCoLR", "IVFQINCo", "QINCoStep", "PQ_QINCo"})
_UNSUPPORTED: dict = {}  # QINCo v1 classes that are recognised but not loadable (none at present)

_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): new_set,
    ("_codecs", "encode"): latin1_encode,
    ("numpy", "dtype"): DtypeSpec,
    ("numpy.core.multiarray", "scalar"): numpy_scalar,
    ("numpy._core.multiarray", "scalar"): numpy_scalar,
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter_with_state,
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
    if module in ("torch", "torch.cuda") and name in STORAGE_DTYPES:
        return StorageType(name)
    if (module, name) in _TORCH_MODULES:
        return record_class(module, name)
    if module.rsplit(".", 1)[-1] == "model_qinco":
        if name in _QINCO_CLASSES:
            return record_class(module, name)
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

    def __init__(self, file, archive=None, limits: Limits | None = None):
        """archive: the record reader of the torch archive around the pickle (qinco_jax.unpickler.archive),
        which serves its storages and budgets; None for a bare pickle, which then may not refer to any."""
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
            d[hashable_key(items[i], "dict key")] = items[i + 1]

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
        s.update(hashable_key(k, "set element") for k in items)

    def _load_frozenset(self):
        items = self.pop_mark()
        self._grow((), len(items))
        self.append(frozenset(hashable_key(k, "set element") for k in items))

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
        if type(inst) is DtypeSpec or (isinstance(inst, ModuleRecord) and self._is_record_class(type(inst))):
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

