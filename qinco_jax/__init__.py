"""qinco_jax: QINCo residual quantization with implicit neural codebooks, in JAX/Flax.

Public API:
  QincoConfig, Codec, Norm      architecture (QINCo v1 or QINCo2), trained codec (params + normalisation)
  PQCodec                       PQ-QINCo: optional rotation + one Codec per sub-vector block
  init_codec(cfg, xt)           RQ-initialised codec, ready to train
  encode(codec, x, beam=B, candidates=A) / decode(codec, codes)
  save(codec, path) / load(path)   orbax directories, training workdirs and official .pt files
"""

from qinco_jax.checks import QincoInputError
from qinco_jax.checkpoint import CheckpointError, load, save
from qinco_jax.api import decode, encode, encode_with_error
from qinco_jax.codec import Codec, Norm
from qinco_jax.config import QincoConfig
from qinco_jax.initialise import init_codec
from qinco_jax.pq import PQCodec

__all__ = [
    "CheckpointError",
    "Codec",
    "Norm",
    "PQCodec",
    "QincoConfig",
    "QincoInputError",
    "decode",
    "encode",
    "encode_with_error",
    "init_codec",
    "load",
    "save",
]
__version__ = "0.1.0"
