"""faiss baselines (PQ, OPQ, RQ, RQ with beam 5, LSQ) at a given code size, evaluated like QINCo."""

from __future__ import annotations

import time

import numpy as np

from qinco_jax import checks
from qinco_jax.checks import QincoInputError

from . import metrics

BASELINES = ("PQ", "OPQ", "RQ", "RQ-beam5", "LSQ")


class BaselineUnavailable(QincoInputError):
    """A baseline that cannot be built at the requested code size (e.g. PQ when M does not divide d)."""


class Baseline:
    """A trained faiss codec: encode to packed bytes, decode back to vectors."""

    def __init__(self, name: str, index, M: int, nbits: int, parts=()):
        self.name, self.index, self.M, self.nbits = name, index, M, nbits
        self._parts = list(parts)  # faiss holds raw pointers to these: keep them alive with the index
        self.bytes = int(index.sa_code_size())

    def encode(self, x) -> np.ndarray:
        """(n, bytes) uint8 packed codes of x."""
        x = checks.vectors(x, self.index.d, "x")
        return self.index.sa_encode(np.ascontiguousarray(x, dtype=np.float32))

    def decode(self, codes) -> np.ndarray:
        """(n, d) float32 reconstructions of packed codes."""
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        if codes.ndim != 2 or codes.shape[1] != self.bytes:
            raise QincoInputError(f"{self.name} codes must have shape (n, {self.bytes}), got {codes.shape}")
        return self.index.sa_decode(codes)

    def __repr__(self) -> str:
        return f"Baseline({self.name}, M={self.M}, nbits={self.nbits}, bytes={self.bytes})"


def _build(name: str, d: int, M: int, nbits: int):
    """Untrained faiss index for a baseline name and the objects its options may be set on."""
    import faiss

    if name in ("PQ", "OPQ") and d % M:
        raise BaselineUnavailable(f"{name} needs M to divide d, got d={d}, M={M}")
    if name == "PQ":
        index = faiss.IndexPQ(d, M, nbits)
        return index, [index.pq, index.pq.cp]
    if name == "OPQ":
        index = faiss.index_factory(d, f"OPQ{M},PQ{M}x{nbits}")
        opq, pq = faiss.downcast_VectorTransform(index.chain.at(0)), faiss.downcast_index(index.index).pq
        # faiss learns the rotation for 8-bit codes by default; learn it for the evaluated code size
        opq.pq = rot_pq = faiss.ProductQuantizer(d, M, nbits)
        return index, [opq, pq, pq.cp, rot_pq]
    if name in ("RQ", "RQ-beam5"):
        index = faiss.IndexResidualQuantizer(d, M, nbits)
        index.rq.max_beam_size = 5 if name == "RQ-beam5" else 1  # faiss's default is 5
        return index, [index.rq, index.rq.cp]
    if name == "LSQ":
        index = faiss.IndexLocalSearchQuantizer(d, M, nbits)
        return index, [index.lsq]
    raise QincoInputError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")


def _set_opts(targets, opts: dict) -> None:
    """Set each option on the first target object that has that attribute."""
    for key, value in opts.items():
        target = next((t for t in targets if hasattr(t, key)), None)
        if target is None:
            raise QincoInputError(f"unknown option {key!r} for this baseline")
        setattr(target, key, value)


def train_baseline(name: str, xt, M: int, nbits: int = 8, **opts) -> Baseline:
    """Train a faiss baseline of M codes x nbits bits on xt; opts are set on the faiss quantizer objects.

    Raises BaselineUnavailable when the code size is impossible for that method (PQ/OPQ with d % M != 0).
    """
    xt = checks.vectors(xt, None, "xt")
    M, nbits = checks.batch_size(M, "M"), checks.batch_size(nbits, "nbits")
    index, targets = _build(name, xt.shape[1], M, nbits)
    _set_opts(targets, opts)
    index.train(np.ascontiguousarray(xt, dtype=np.float32))
    return Baseline(name, index, M, nbits, targets)


def decoded_chunks(b: Baseline, x, chunk: int = 65536, timer: list | None = None):
    """(start, float32 reconstructions) of x chunk by chunk; encoding seconds are added to timer[0]."""
    x = checks.vectors(x, b.index.d, "x")
    for i0 in range(0, x.shape[0], chunk):
        t0 = time.perf_counter()
        codes = b.encode(x[i0:i0 + chunk])
        if timer is not None:
            timer[0] += time.perf_counter() - t0
        yield i0, b.decode(codes)


def evaluate_baseline(b: Baseline, xb, xq, gt, ks=(1, 10, 100)) -> dict:
    """dict(method, bytes, mse, r1, r10, r100, encode_us) for a trained baseline on xb / xq / gt.

    The database is encoded, decoded and searched chunk by chunk: one chunk of reconstructions at a time.
    """
    xb = checks.vectors(xb, b.index.d, "xb")
    xq = checks.vectors(xq, b.index.d, "xq")
    gt = metrics.check_groundtruth(gt, xb.shape[0], xq.shape[0])
    timer = [0.0]
    mse, I = metrics.stream_evaluate(xb, decoded_chunks(b, xb, timer=timer), xq, max(ks))
    row = {"method": b.name, "bytes": b.bytes, "mse": mse}
    row.update({f"r{k}": v for k, v in metrics.recalls(I, gt, ks).items()})
    row["encode_us"] = timer[0] / xb.shape[0] * 1e6
    return row


def baseline_mse_by_bytes(names, xt, xb, max_M: int, nbits: int = 8, opts: dict | None = None,
                          known: dict | None = None) -> dict:
    """{name: [MSE on xb for M = 1..max_M codes]} (None where the method is unavailable), one training per M.

    opts maps a baseline name to its train_baseline options; known maps a name to its MSE at max_M
    (not trained again). With nbits=8, M codes take M bytes;
    otherwise they take ceil(M * nbits / 8) bytes.
    """
    out = {}
    for name in names:
        curve = []
        for M in range(1, max_M + 1):
            if M == max_M and name in (known or {}):
                curve.append(known[name])  # already measured at the full size
                continue
            try:
                b = train_baseline(name, xt, M, nbits, **(opts or {}).get(name, {}))
            except BaselineUnavailable:
                curve.append(None)
                continue
            curve.append(metrics.stream_evaluate(xb, decoded_chunks(b, xb))[0])
        out[name] = curve
    return out
