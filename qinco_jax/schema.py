"""Type and range checks of the fields of a JSON object read from a file (index.json and the like).

A schema maps each field to a Field: the JSON types it may take, an optional range for numbers or a set of
choices for strings, and whether it must be present. Unknown fields are allowed (newer writers may add some)
but never used without a schema entry.
"""

from __future__ import annotations

import dataclasses
import math

from qinco_jax.checks import QincoInputError, short

INT, FLOAT, STR, BOOL, DICT, LIST, NONE = int, float, str, bool, dict, list, type(None)


@dataclasses.dataclass(frozen=True)
class Field:
    types: tuple
    lo: float | None = None
    hi: float | None = None
    choices: tuple | None = None
    required: bool = True
    max_len: int = 4096  # strings


def check(obj: dict, schema: dict, what: str) -> dict:
    """obj itself when every field of the schema is present (or optional) with its type and range; otherwise a
    QincoInputError naming `what` and the field."""
    if not isinstance(obj, dict):
        raise QincoInputError(f"{what}: expected a JSON object, got {type(obj).__name__}")
    for name, f in schema.items():
        if name not in obj:
            if f.required:
                raise QincoInputError(f"{what}: the field {name!r} is missing")
            continue
        v = obj[name]
        # bool is a subclass of int: an int field never takes true/false, a float field takes ints
        ok = any((t is INT and isinstance(v, int) and not isinstance(v, bool))
                 or (t is FLOAT and isinstance(v, (int, float)) and not isinstance(v, bool))
                 or (t not in (INT, FLOAT) and isinstance(v, t)) for t in f.types)
        if not ok:
            names = " or ".join("null" if t is NONE else t.__name__ for t in f.types)
            raise QincoInputError(f"{what}: the field {name!r} must be {names}, got {short(v)}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if isinstance(v, float) and not math.isfinite(v):
                raise QincoInputError(f"{what}: the field {name!r} is {v}, expected a finite number")
            if (f.lo is not None and v < f.lo) or (f.hi is not None and v > f.hi):
                raise QincoInputError(f"{what}: the field {name!r} is {short(v)}, outside [{f.lo}, {f.hi}]")
        if isinstance(v, str):
            if len(v) > f.max_len:
                raise QincoInputError(f"{what}: the field {name!r} holds {len(v):,} characters")
            if f.choices is not None and v not in f.choices:
                raise QincoInputError(f"{what}: the field {name!r} is {short(v)}, expected one of "
                                      f"{', '.join(map(str, f.choices))}")
    return obj
