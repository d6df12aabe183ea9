"""Official PyTorch QINCo checkpoints (.pt) -> codecs, without torch.

`qinco_jax.unpickler` reads the archive into inert records (no code from the file runs); `family`
tells which training code wrote it, and one converter per family checks the record tree and turns it
into this package's layout (qinco_jax.model):

- `v1`: a QINCo v1 module saved whole (torch.save(model, path)): QINCo, QINCo-LR, IVF-QINCo, and
  PQ_QINCo (one QINCo per sub-vector block);
- `qinco2`: a QINCo2 training checkpoint (a dict with the state_dict, 'parameters' and 'data_dim').

`tensors` holds the checks they share.
"""

from __future__ import annotations

import os

from qinco_jax.checks import CheckpointError
from qinco_jax.codec import Codec
from qinco_jax.ptload.qinco2 import convert_qinco2
from qinco_jax.probe import refuse_overflow
from qinco_jax.ptload.v1 import convert, convert_pq
from qinco_jax.unpickler import ModuleRecord, read_objects

__all__ = ["CheckpointError", "family", "load_pt", "load_pt_codec"]


def family(obj) -> str:
    """'pq' (a PQ_QINCo module), 'qinco2' (a dict with the model's state_dict under 'model' and its
    'parameters') or 'v1' for anything else, whose converter says what the file holds if not a QINCo v1 model."""
    if isinstance(obj, ModuleRecord) and obj.name == "PQ_QINCo" and isinstance(obj.state, dict):
        return "pq"
    if isinstance(obj, dict) and "model" in obj and "parameters" in obj:
        return "qinco2"
    return "v1"


def load_pt(path):
    """Read a PyTorch QINCo v1 checkpoint (torch.save(model, path)) or a QINCo2 training checkpoint
    (a dict with the state_dict, 'parameters' and 'data_dim') without torch.

    Returns (config, params, norm): params is a nested dict of float32 numpy arrays in this
    package's layout (qinco_jax.model); norm the v1 model's db_scale (a float) or QINCo2's
    qinco_jax.Norm (data mean and std). IVFQINCo files give an IVF config (nlist = K_IVF, the
    frozen centroids in codebook0). Raises CheckpointError for anything that is not a readable
    QINCo / QINCo-LR / IVF-QINCo / QINCo2 checkpoint; no code from the file is run.
    """
    obj = read_objects(path)
    if family(obj) == "qinco2":
        return convert_qinco2(obj)
    return convert(obj)


def load_pt_codec(path):
    """A Codec (QINCo, QINCo-LR, IVF-QINCo, QINCo2) or a PQCodec (PQ_QINCo) from an official .pt file,
    without torch."""
    obj = read_objects(path)
    kind = family(obj)
    if kind == "pq":
        codec = convert_pq(obj)
    elif kind == "qinco2":
        codec = Codec(*convert_qinco2(obj))
    else:
        codec = Codec(*convert(obj))
    refuse_overflow(codec, os.fspath(path))  # finite but extreme weights: decode would give inf / NaN
    return codec
