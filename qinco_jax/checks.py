"""Input validation with errors that name the problem (never a trace from inside XLA)."""

from __future__ import annotations

import numpy as np


class QincoInputError(ValueError):
    """Bad vectors, codes or files given to qinco_jax."""


def vectors(x, d: int | None, what: str = "x") -> np.ndarray:
    """Check the shape and dtype of a (n, d) real matrix; returns it as an ndarray (memmaps stay memmaps)."""
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as e:  # ragged lists and the like
            raise QincoInputError(f"{what} cannot be read as a matrix: {e}") from None
    if x.dtype.kind not in "uif":
        raise QincoInputError(f"{what} must hold real numbers, got dtype {x.dtype}")
    if x.ndim != 2:
        raise QincoInputError(f"{what} must be a 2-D array (n, d), got shape {x.shape}")
    if x.shape[0] == 0:
        raise QincoInputError(f"{what} is empty (0 vectors)")
    if d is not None and x.shape[1] != d:
        raise QincoInputError(f"{what} has dimension {x.shape[1]}, the model expects d={d}")
    return x


def finite_chunk(chunk: np.ndarray, offset: int, what: str = "x") -> None:
    """Raise naming the first row (global index) holding NaN or inf."""
    if chunk.dtype.kind == "f":
        ok = np.isfinite(chunk).all(axis=1)
        if not ok.all():
            bad = np.flatnonzero(~ok)
            raise QincoInputError(
                f"{what} has {bad.size} row(s) with NaN or inf values; first bad row is {offset + int(bad[0])}"
            )


# Squared norms of the (scaled) vectors a model sees must stay this far below float32's maximum, so
# that distances to codewords and reconstruction errors are finite too.
MAX_SQ_NORM = float(np.finfo(np.float32).max) / 64


def encodable_chunk(chunk: np.ndarray, offset: int, scale: float = 1.0, what: str = "x") -> None:
    """Raise naming the first row (global index) that is NaN / inf or whose squared norm, divided by
    scale**2, overflows float32 (such rows would get meaningless codes and an infinite error)."""
    finite_chunk(chunk, offset, what)
    if not float(np.finfo(np.float32).tiny) < float(scale) < MAX_SQ_NORM ** 0.5:
        raise QincoInputError(f"the codec's data scale {float(scale):.3g} is outside the range float32 can use: "
                              "its codes would be meaningless (a damaged or hand-made checkpoint?)")
    sq = np.einsum("ij,ij->i", chunk, chunk, dtype=np.float64) / float(scale) / float(scale)  # no scale**2 overflow
    bad = np.flatnonzero(~(sq < MAX_SQ_NORM))
    if bad.size:
        i = int(bad[0])
        raise QincoInputError(
            f"{what} has {bad.size} row(s) too large to encode in float32: row {offset + i} has squared norm "
            f"{sq[i]:.3g} (in the codec's scaled units; at most {MAX_SQ_NORM:.3g})"
        )


def codec(obj, types: tuple, what: str = "codec") -> None:
    """TypeError unless obj is one of the codec types."""
    if not isinstance(obj, types):
        names = " or ".join(f"qinco_jax.{t.__name__}" for t in types)
        raise TypeError(
            f"{what} must be a {names} (from qinco_jax.load, qinco_jax.init_codec or training), "
            f"got {type(obj).__module__}.{type(obj).__name__}"
        )


def finite(x: np.ndarray, what: str = "x", chunk: int = 65536) -> None:
    """Raise naming the first row with NaN or inf; reads x (a memmap is fine) chunk by chunk."""
    chunk = batch_size(chunk, "chunk")
    if x.dtype.kind != "f":
        return
    for i in range(0, x.shape[0], chunk):
        finite_chunk(np.asarray(x[i : i + chunk]), i, what)


def trainable(x: np.ndarray, K: int, what: str = "training vectors", chunk: int = 65536) -> None:
    """Raise unless x can train K-entry codebooks: at least K rows, and not all rows equal.

    Reads chunks only until a row differs from the first (at once on real data)."""
    if x.shape[0] < K:
        raise QincoInputError(f"{what}: {x.shape[0]} vectors cannot train codebooks of K={K} entries; "
                              f"give at least {K} (many more in practice)")
    first = np.asarray(x[:1])
    for i in range(0, x.shape[0], chunk):
        if (np.asarray(x[i : i + chunk]) != first).any():
            return
    raise QincoInputError(f"{what}: all {x.shape[0]} vectors are equal (constant data); there is nothing to quantize")


def codes(c, K: int, M: int, nlist: int = 0) -> np.ndarray:
    """Check a (n, m) integer code matrix: 1 <= m <= M (M + 1 with IVF) and entries in [0, K)
    (column 0 in [0, nlist) with IVF: the list ids)."""
    c = np.asarray(c)
    if c.dtype.kind not in "ui":
        raise QincoInputError(f"codes must be integers, got dtype {c.dtype}")
    if c.ndim != 2:
        raise QincoInputError(f"codes must be a 2-D array (n, m), got shape {c.shape}")
    if c.shape[0] == 0:
        raise QincoInputError("codes is empty (0 vectors)")
    if nlist and not 1 <= c.shape[1] <= M + 1:
        raise QincoInputError(
            f"IVF codes must have between 1 and M+1={M + 1} columns (list id, then M codes), got {c.shape[1]}"
        )
    if not nlist and not 1 <= c.shape[1] <= M:
        raise QincoInputError(f"codes must have between 1 and M={M} columns, got {c.shape[1]}")
    if nlist:
        _in_range(c[:, :1], nlist, "IVF list ids (codes column 0)")
        if c.shape[1] > 1:
            _in_range(c[:, 1:], K, "codes (columns 1..)")
    else:
        _in_range(c, K, "codes")
    return c


def _in_range(c: np.ndarray, K: int, what: str) -> None:
    lo, hi = int(c.min()), int(c.max())
    if lo < 0 or hi >= K:
        bad = np.flatnonzero(((c < 0) | (c >= K)).any(axis=1))[0]
        raise QincoInputError(f"{what} out of range [0, {K}): min {lo}, max {hi}; first bad row is {int(bad)}")


def centroids(c, d: int, nlist: int | None = None, what: str = "IVF centroids") -> np.ndarray:
    """Check an (nlist, d) table of finite centroids; returns it as float32."""
    try:
        c = np.asarray(c)
    except Exception as e:
        raise QincoInputError(f"{what} cannot be read as a matrix: {e}") from None
    if c.dtype.kind not in "uif":
        raise QincoInputError(f"{what} must hold real numbers, got dtype {c.dtype}")
    if c.ndim != 2:
        raise QincoInputError(f"{what} must be a 2-D array (nlist, d), got shape {c.shape}")
    if c.shape[0] < 1:
        raise QincoInputError(f"{what} holds no centroid (shape {c.shape}); at least 1 is needed")
    if c.shape[1] != d:
        raise QincoInputError(f"{what} have dimension {c.shape[1]}, the data has d={d}")
    if nlist is not None and c.shape[0] != nlist:
        raise QincoInputError(f"{what} hold {c.shape[0]} centroids, the config says nlist={nlist}")
    c = np.ascontiguousarray(c, dtype=np.float32)
    finite_chunk(c, 0, what)
    return c


def batch_size(bs, what: str = "batch_size") -> int:
    if isinstance(bs, bool) or not isinstance(bs, (int, np.integer)) or bs < 1:
        raise QincoInputError(f"{what} must be a positive int, got {bs!r}")
    return int(bs)


class CheckpointError(QincoInputError):
    """A file or directory that is not a loadable codec (missing, damaged, unknown or unsafe)."""


def short(value, limit: int = 60) -> str:
    """A bounded description of any value for error messages: never builds a full repr.

    Strings and bytes are cut before repr; huge ints, containers and other objects are described
    by type and size (containers show their first few elements, one level deep).
    """

    def atom(v) -> str | None:
        if v is None or isinstance(v, (bool, float, complex)):
            return repr(v)
        if isinstance(v, int):
            return repr(v) if v.bit_length() <= 64 else f"<int of {v.bit_length()} bits>"
        if isinstance(v, (str, bytes, bytearray)):
            r = repr(v[: limit + 1])
            return r if len(v) <= limit else r[: limit] + f"... ({len(v):,} long)"
        if isinstance(v, np.ndarray):
            return f"<array {v.dtype} {v.shape}>"
        if isinstance(v, np.generic):
            return repr(v.item()) if v.dtype.kind in "biuf" else f"<{type(v).__name__}>"
        return None

    out = atom(value)
    if out is not None:
        return out
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        it = iter(value.items() if isinstance(value, dict) else value)
        items = [x for _, x in zip(range(3), it)]
        inner = lambda v: short(v, limit // 3) if atom(v) is not None else f"<{type(v).__name__}>"  # noqa: E731
        shown = [f"{inner(k)}: {inner(v)}" for k, v in items] if isinstance(value, dict) else [inner(v) for v in items]
        more = f", ... ({len(value):,} items)" if len(value) > 3 else ""
        return f"{type(value).__name__}[{', '.join(shown)}{more}]"
    return f"<{type(value).__name__}>"
