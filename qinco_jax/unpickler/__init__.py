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

Every other global raises `CheckpointError` before anything is called. qinco_jax.ptload turns the
resulting record tree into a codec.

Hostile files: only regular files are opened; every read runs under the budgets of
`qinco_jax.limits` (file, record and total decompressed bytes, pickle opcodes, container sizes and
nesting depth, references per storage record, time). The pickle runs on a restricted interpreter
(a subclass of the pure-Python unpickler) that only calls the stand-ins above, only lets BUILD set
the state of module records it created itself, refuses dict keys and set elements whose hashes can
be made to collide, and builds new objects for every load, so that a refused file changes nothing
in the process. Error messages show values through `checks.short`, never a full repr.

Modules: `records` (the inert stand-ins), `interpreter` (the allowed globals and the restricted
interpreter), `archive` (regular files, the zip archive and its budgets, nesting depth, `read_objects`).
"""

from qinco_jax.unpickler.archive import check_depth, open_regular, read_objects, unpickle
from qinco_jax.unpickler.interpreter import RestrictedUnpickler, resolve_global
from qinco_jax.unpickler.records import ModuleRecord

__all__ = ["ModuleRecord", "RestrictedUnpickler", "check_depth", "open_regular", "read_objects", "resolve_global",
           "unpickle"]
