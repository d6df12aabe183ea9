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


# ----------------------------------------------------------------------------- search baselines

SEARCH_BASELINES = ("IVF-PQ", "IVF-RQ", "IVF-PQfs")


def search_baseline_name(name: str, nlist: int, M: int, nbits: int) -> str:
    """The faiss factory-style name of a search baseline at M codes of nbits bits (PQfs: 2M codes of 4 bits)."""
    coarse = f"IVF{nlist}," if nlist else ""
    body = {"IVF-PQ": f"PQ{M}x{nbits}", "IVF-RQ": f"RQ{M}x{nbits}_Nqint8", "IVF-PQfs": f"PQ{M * nbits // 4}x4fs"}
    return coarse + body[name]


def train_search_baseline(name: str, xt, M: int, nbits: int = 8, centroids=None):
    """A trained, empty faiss search index of the same size as an M x nbits code: IVF-PQ (PQ{M}x{nbits}),
    IVF-RQ (RQ{M}x{nbits} with a 1-byte quantized norm, as the QINCo index stores) or IVF-PQfs (PQ{2M}x4 fast
    scan, for nbits=8). With centroids (nlist, d) the coarse quantizer holds exactly those (the QINCo codec's
    IVF centroids, so every method probes the same lists); without, the flat variant (PQ, RQ, PQfs)."""
    import faiss

    xt = np.ascontiguousarray(checks.vectors(xt, None, "xt"), dtype=np.float32)
    d = xt.shape[1]
    if name not in SEARCH_BASELINES:
        raise QincoInputError(f"unknown search baseline {name!r}; choose from {', '.join(SEARCH_BASELINES)}")
    m_pq = M * nbits // 4 if name == "IVF-PQfs" else M
    if name != "IVF-RQ" and d % m_pq:
        raise BaselineUnavailable(f"{name} needs {m_pq} sub-vectors to divide d={d}")
    st = faiss.AdditiveQuantizer.ST_norm_qint8
    if centroids is None:
        index = {"IVF-PQ": lambda: faiss.IndexPQ(d, M, nbits),
                 "IVF-RQ": lambda: faiss.IndexResidualQuantizer(d, M, nbits, faiss.METRIC_L2, st),
                 "IVF-PQfs": lambda: faiss.IndexPQFastScan(d, m_pq, 4)}[name]()
    else:
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        nlist = centroids.shape[0]
        quantizer = faiss.IndexFlatL2(d)
        quantizer.add(centroids)
        index = {"IVF-PQ": lambda: faiss.IndexIVFPQ(quantizer, d, nlist, M, nbits),
                 "IVF-RQ": lambda: faiss.IndexIVFResidualQuantizer(quantizer, d, nlist, M, nbits,
                                                                   faiss.METRIC_L2, st),
                 "IVF-PQfs": lambda: faiss.IndexIVFPQFastScan(quantizer, d, nlist, m_pq, 4)}[name]()
        quantizer.this.disown()
        index.own_fields = True
    index.train(xt)
    return index


def add_in_chunks(index, xb, chunk: int = 65536) -> None:
    """Add a (memory-mapped) database to a faiss index chunk by chunk, as float32."""
    for i0 in range(0, xb.shape[0], chunk):
        index.add(np.ascontiguousarray(xb[i0:i0 + chunk], dtype=np.float32))
