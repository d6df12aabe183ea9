"""What every stage of the search asks of a codec and of its code matrices: IVF or flat, code columns and dtype,
the IVF centroids, the clear errors for the wrong kind of codec, and the fingerprint that names a model."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import jax
import numpy as np

from qinco_jax import checks
from qinco_jax.checks import QincoInputError


def nlist_of(codec) -> int:
    """Number of IVF lists of a codec (0 for a plain QINCo codec)."""
    return int(getattr(codec.config, "nlist", 0) or 0)


def num_codes(cfg) -> int:
    """Columns of a full code matrix: M, plus one (the list id) for IVF."""
    return int(getattr(cfg, "num_codes", cfg.M))


def code_dtype(cfg) -> np.dtype:
    return np.dtype(cfg.code_dtype)


def ivf_centroids(codec) -> np.ndarray | None:
    """(nlist, d) float32 IVF centroids in raw units, None for a plain codec."""
    if not nlist_of(codec):
        return None
    return np.asarray(codec.ivf_centroids, np.float32)


def require_ivf(codec, what: str) -> None:
    """A clear error when a pipeline that needs an IVF codec is given a plain one."""
    if not nlist_of(codec):
        raise QincoInputError(f"{what} needs an IVF-QINCo codec (trained with --ivf), but this codec has no IVF "
                              f"step (M={codec.config.M}, nlist=0); use the flat pipeline for it")


def require_flat(codec, what: str) -> None:
    """A clear error when a pipeline that needs a plain (flat) codec is given an IVF one."""
    if nlist_of(codec):
        raise QincoInputError(f"{what} needs a plain QINCo codec without IVF, but this codec has an IVF step "
                              f"(nlist={nlist_of(codec)}); use the IVF pipeline for it")


def split_codes(codes: np.ndarray, K: int, centroids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(step codes (n, M), list ids (n,) or None) of a code matrix, range-checked.

    centroids None: codes are (n, M) step codes. Otherwise codes are (n, 1 + M), column 0 the list id, which must
    index a row of centroids (only its length is used).
    """
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.dtype.kind not in "ui":
        raise QincoInputError(f"codes must be a 2-D integer matrix, got shape {codes.shape}, dtype {codes.dtype}")
    if centroids is None:
        return checks.codes(codes, K, codes.shape[1]), None
    if codes.shape[1] < 2:
        raise QincoInputError(f"IVF codes need a list-id column and at least one step code, got shape {codes.shape}")
    lists = codes[:, 0].astype(np.int64)
    if lists.size and (lists.min() < 0 or lists.max() >= centroids.shape[0]):
        raise QincoInputError(f"list ids out of range [0, {centroids.shape[0]}): min {lists.min()}, max {lists.max()}")
    return checks.codes(codes[:, 1:], K, codes.shape[1] - 1), lists


def fingerprint(codec) -> str:
    """sha256 (hex) of a codec's architecture, normalisation and parameter values: names the model an index was
    built with."""
    h = hashlib.sha256()
    # fields at their default are left out, so that a new config field with a default keeps old fingerprints
    defaults = {f.name: f.default for f in dataclasses.fields(codec.config)}
    arch = {k: v for k, v in codec.config.to_dict().items() if defaults.get(k, dataclasses.MISSING) != v}
    h.update(json.dumps(arch, sort_keys=True).encode())
    h.update(repr(float(codec.scale)).encode())
    shift = getattr(getattr(codec, "norm", None), "shift", None)
    if shift is not None:  # QINCo2's per-dimension mean (v1 codecs have none: their fingerprint is unchanged)
        h.update(b"shift" + np.ascontiguousarray(np.asarray(shift, np.float32)).tobytes())
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(codec.params))[0]
    for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
        a = np.ascontiguousarray(np.asarray(leaf, np.float32))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()
