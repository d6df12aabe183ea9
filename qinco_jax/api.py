"""encode / decode of any codec: a Codec (qinco_jax.runtime) or a PQ-QINCo PQCodec (qinco_jax.pq)."""

from __future__ import annotations

import numpy as np

from qinco_jax import checks, pq, runtime
from qinco_jax.codec import Codec
from qinco_jax.pq import PQCodec

CODECS = (Codec, PQCodec)  # what encode / decode accept


def encode_with_error(codec: Codec | PQCodec, x, *, beam: int | None = None, candidates: int | None = None,
                      batch_size: int | None = None, progress: bool = False, devices=None):
    """Codes and the per-vector squared reconstruction error (raw units).

    Returns (codes (n, num_codes) of the codec's code_dtype, err (n,) float64). See encode() for the arguments.
    """
    checks.codec(codec, CODECS)
    if isinstance(codec, PQCodec):
        return pq.encode_with_error(codec, x, batch_size=batch_size, progress=progress, devices=devices)
    return runtime.encode_with_error(codec, x, beam=beam, candidates=candidates, batch_size=batch_size,
                                     progress=progress, devices=devices)


def encode(codec: Codec | PQCodec, x, *, beam: int | None = None, candidates: int | None = None,
           batch_size: int | None = None, progress: bool = False, devices=None) -> np.ndarray:
    """QINCo codes of x: beam search with candidate pre-selection (greedy for beam=1, candidates=0).

    Args:
      codec: the codec; a PQCodec's sub-codecs search with their own (A, B), beam and candidates aside.
      x: (n, d) array of any real dtype (a memmap is read chunk by chunk), raw units.
      beam: beam width B (default the codec's own: 1 for QINCo v1).
      candidates: codes pre-selected per beam with the cheap codebook, A (default the codec's own;
        0 evaluates all K codes; > 0 needs a model trained with pre-selection).
      batch_size: vectors per jitted call and device (memory is bounded by it and by the search size,
        whatever n).
      progress: show a progress bar on stderr.
      devices: the devices to use (default: all local devices; each call's vectors are split over them).

    Returns:
      (n, cfg.num_codes) codes of cfg.code_dtype: (n, M) for plain QINCo, uint8 when K <= 256 else
      uint16; (n, 1 + M) for IVF-QINCo, column 0 the list id (the dtype holds max(K, nlist)).
    """
    return encode_with_error(codec, x, beam=beam, candidates=candidates, batch_size=batch_size, progress=progress,
                             devices=devices)[0]


def decode(codec: Codec | PQCodec, codes, *, batch_size: int | None = None, progress: bool = False,
           devices=None) -> np.ndarray:
    """Reconstruct vectors (raw units, float32) from codes.

    Args:
      codec: the codec.
      codes: (n, m) integer codes with m <= cfg.num_codes; fewer columns give the reconstruction
        from that prefix (IVF: m = 1 is the centroid). Column 0 of IVF codes must be < nlist.
        A PQCodec takes all its sub-codecs' columns.
      batch_size: vectors per jitted call and device.
      progress: show a progress bar on stderr.
      devices: the devices to use (default: all local devices).

    Returns:
      (n, d) float32.
    """
    checks.codec(codec, CODECS)
    if isinstance(codec, PQCodec):
        return pq.decode(codec, codes, batch_size=batch_size, progress=progress, devices=devices)
    return runtime.decode(codec, codes, batch_size=batch_size, progress=progress, devices=devices)
