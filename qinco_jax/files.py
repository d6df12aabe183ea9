"""Small file helpers shared by the library, training and evaluation: JSON files, written atomically."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from qinco_jax.checks import QincoInputError


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
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path, what: str) -> dict:
    """A JSON file this project wrote; a missing or unreadable file is a QincoInputError naming `what`."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise QincoInputError(f"{what}: {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise QincoInputError(f"{what}: cannot read {path}: {e}") from None
