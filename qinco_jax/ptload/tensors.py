"""Checks shared by the .pt converters: tensors taken out of an unpickled checkpoint (present,
floating-point, of the expected shape, finite) and the errors that a malformed record tree raises."""

from __future__ import annotations

import numpy as np

from qinco_jax.checks import CheckpointError, short

# What reading odd attribute types out of a malformed record tree raises; converters report it as CheckpointError.
MALFORMED = (TypeError, AttributeError, KeyError, IndexError, ValueError, OverflowError)


def checked_tensor(arr, path: str, shape: tuple, source: str) -> np.ndarray:
    """A checkpoint tensor as float32: present, floating-point, of the shape that `source` implies, finite."""
    if arr is None:
        raise CheckpointError(f"the checkpoint is missing tensor {path}")
    if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
        raise CheckpointError(f"tensor {path} is not a floating-point tensor ({getattr(arr, 'dtype', type(arr))})")
    if arr.shape != shape:
        raise CheckpointError(f"tensor {path} has shape {arr.shape}, expected {shape} from {source}")
    if not np.isfinite(arr).all():
        raise CheckpointError(f"tensor {path} holds NaN or inf values")
    return np.ascontiguousarray(arr, dtype=np.float32)


class StateDictTensors:
    """Takes tensors out of a state_dict by name, checking presence, dtype, shape and finiteness;
    `check_all_used` then refuses any tensor left over but the buffers named in `ignored`."""

    def __init__(self, state: dict, ignored: tuple = ()):
        self.state, self.used, self.ignored = state, set(), ignored

    def get(self, name: str, shape: tuple, transpose: bool = False) -> np.ndarray:
        arr = checked_tensor(self.state.get(name), name, shape, "the parameters")
        self.used.add(name)
        return np.ascontiguousarray(arr.T) if transpose else arr

    def linear(self, prefix: str, out_f: int, in_f: int, bias: bool = False) -> dict:
        """A torch Linear (weight (out, in)) as {'kernel': (in, out)} (+ 'bias'); a bias must be present iff expected."""
        out = {"kernel": self.get(f"{prefix}.weight", (out_f, in_f), transpose=True)}
        if bias:
            out["bias"] = self.get(f"{prefix}.bias", (out_f,))
        elif f"{prefix}.bias" in self.state:
            raise CheckpointError(f"tensor {prefix}.bias: the architecture has no bias there")
        return out

    def check_all_used(self) -> None:
        extra = sorted(n for n in self.state if n not in self.used and n.rsplit(".", 1)[-1] not in self.ignored)
        if extra:
            raise CheckpointError(f"unexpected tensor {short(extra[0], 100)} in the checkpoint "
                                  f"({len(extra)} unexpected in all)")
