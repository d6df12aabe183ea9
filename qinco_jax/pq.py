"""PQ-QINCo: an optional rotation, then one QINCo codec per contiguous sub-vector block (spec v1 §1.8).

`PQCodec(rotation, [Codec, ...])` is one codec for `qinco_jax.encode`, `decode`, `save` and `load`:
x (raw units, d_in) -> y = x @ rotation.T (d_out; identity without a rotation) -> block b of y, of the
b-th codec's dimension, is encoded by that codec (with its own data scale) -> the codes are
concatenated. Decoding reverses it: each block is decoded, the blocks are concatenated and, with a
rotation, multiplied by it (y_hat @ rotation). The official PQ_QINCo `.pt` files are read as one.
"""

from __future__ import annotations

import dataclasses
import numpy as np

from qinco_jax import checks, runtime
from qinco_jax.codec import Codec
from qinco_jax.progress import Progress

CHUNK = 65536  # input rows rotated and split at a time


def _spans(sizes: list[int]) -> list[tuple[int, int]]:
    """Consecutive (start, stop) ranges of the given sizes."""
    stops = np.cumsum(sizes).tolist()
    return [(stop - n, stop) for n, stop in zip(sizes, stops)]


@dataclasses.dataclass(frozen=True, eq=False)
class PQCodec:
    """A product of QINCo codecs over contiguous blocks of (optionally rotated) vectors.

    Args:
      rotation: None, or a (d_out, d_in) float32 matrix (faiss OPQMatrix.A); vectors are multiplied
        by its transpose before the split.
      codecs: the sub-codecs; their dimensions add up to d_out.
    """

    rotation: np.ndarray | None
    codecs: tuple

    def __post_init__(self):
        codecs = tuple(self.codecs)
        if not codecs or not all(isinstance(c, Codec) for c in codecs):
            raise TypeError("PQCodec needs a non-empty sequence of Codec objects")
        object.__setattr__(self, "codecs", codecs)
        d_out = sum(c.config.d for c in codecs)
        if self.rotation is not None:
            rot = np.ascontiguousarray(self.rotation, np.float32)
            if rot.ndim != 2 or rot.shape[0] != d_out:
                raise ValueError(f"rotation must be (d_out={d_out}, d_in), got shape {rot.shape}")
            if not np.isfinite(rot).all():
                raise ValueError("rotation holds NaN or inf values")
            object.__setattr__(self, "rotation", rot)

    @property
    def d(self) -> int:
        """Input dimension."""
        return self.rotation.shape[1] if self.rotation is not None else self.d_out

    @property
    def d_out(self) -> int:
        """Dimension after the rotation: the sum of the sub-codecs' dimensions."""
        return sum(c.config.d for c in self.codecs)

    @property
    def M(self) -> int:
        """Code columns: the sum of the sub-codecs' M."""
        return sum(c.config.M for c in self.codecs)

    @property
    def code_bits(self) -> float:
        """Bits per vector."""
        return float(sum(c.config.M * np.log2(c.config.K) for c in self.codecs))

    @property
    def code_dtype(self):
        return np.uint8 if max(c.config.K for c in self.codecs) <= 256 else np.uint16

    def blocks(self) -> list[tuple[int, int]]:
        """(start, stop) of each sub-codec's dimensions in the rotated vector."""
        return _spans([c.config.d for c in self.codecs])

    def code_columns(self) -> list[tuple[int, int]]:
        """(start, stop) of each sub-codec's code columns."""
        return _spans([c.config.M for c in self.codecs])

    def __repr__(self) -> str:
        subs = ", ".join(f"{c.config.d}d {c.config.M}x{int(np.log2(c.config.K))}b" for c in self.codecs)
        rot = "none" if self.rotation is None else f"{self.rotation.shape[0]}x{self.rotation.shape[1]}"
        return f"PQCodec(d={self.d}, rotation={rot}, {len(self.codecs)} sub-codecs: {subs})"


def _rotated(codec: PQCodec, block: np.ndarray) -> np.ndarray:
    x = np.asarray(block, np.float32)
    return x if codec.rotation is None else x @ codec.rotation.T


def encode_with_error(codec: PQCodec, x, *, batch_size=None, progress=False, devices=None):
    """(codes (n, sum M) , per-vector squared error in raw units) of a PQ codec, chunk by chunk."""
    x = checks.vectors(x, codec.d)
    n = x.shape[0]
    codes = np.empty((n, codec.M), codec.code_dtype)
    err = np.zeros(n, np.float64)
    with Progress(n, desc="encode", enabled=progress) as bar:
        for i in range(0, n, CHUNK):
            block = np.asarray(x[i : i + CHUNK])
            checks.finite_chunk(block, i)
            y = _rotated(codec, block)
            for sub, (a, b), (ca, cb) in zip(codec.codecs, codec.blocks(), codec.code_columns()):
                c, e = runtime.encode_with_error(sub, y[:, a:b], batch_size=batch_size, devices=devices)
                codes[i : i + len(block), ca:cb] = c
                err[i : i + len(block)] += e
            if codec.rotation is not None:  # the error of the un-rotated reconstruction (exact for any matrix)
                xhat = decode(codec, codes[i : i + len(block)], batch_size=batch_size, devices=devices)
                err[i : i + len(block)] = ((xhat.astype(np.float64) - block.astype(np.float64)) ** 2).sum(1)
            bar.update(len(block))
    return codes, err


def decode(codec: PQCodec, codes, *, batch_size=None, progress=False, devices=None) -> np.ndarray:
    """(n, d) float32 reconstructions from (n, sum M) codes."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != codec.M:
        raise checks.QincoInputError(
            f"PQ-QINCo codes must have shape (n, {codec.M}) (all sub-codecs' codes), got {codes.shape}")
    n = codes.shape[0]
    out = np.empty((n, codec.d), np.float32)
    with Progress(n, desc="decode", enabled=progress) as bar:
        for i in range(0, n, CHUNK):
            y = np.empty((min(CHUNK, n - i), codec.d_out), np.float32)
            for sub, (a, b), (ca, cb) in zip(codec.codecs, codec.blocks(), codec.code_columns()):
                y[:, a:b] = runtime.decode(sub, codes[i : i + CHUNK, ca:cb], batch_size=batch_size, devices=devices)
            out[i : i + len(y)] = y if codec.rotation is None else y @ codec.rotation
            bar.update(len(y))
    return out


def split_dims(d: int, nsub: int) -> list[tuple[int, int]]:
    """nsub contiguous equal blocks of d dimensions (nsub must divide d, as in the original)."""
    if nsub < 1 or d % nsub:
        raise checks.QincoInputError(f"--pq {nsub}: the number of sub-vectors must divide d={d}")
    s = d // nsub
    return [(i * s, (i + 1) * s) for i in range(nsub)]


def train_opq(xt_sample: np.ndarray, nsub: int, d_out: int | None = None) -> np.ndarray:
    """faiss OPQMatrix(d, M=nsub, d2=d_out).train(sample): its (d_out, d_in) matrix A (x -> x @ A.T)."""
    import faiss

    x = np.ascontiguousarray(xt_sample, np.float32)
    d = x.shape[1]
    opq = faiss.OPQMatrix(d, nsub, d_out or d)
    opq.train(x)
    return faiss.vector_to_array(opq.A).reshape(opq.d_out, opq.d_in).copy()

