"""The device runtime of a Codec: matmul precision, chunk and sub-batch sizes, the devices, the jit / pmap
wrappers, and the streaming, pipelined encode / decode (raw units) and IVF assignment.

These take a Codec only; qinco_jax.api's encode / decode take any codec (PQ-QINCo included).
"""

from __future__ import annotations

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qinco_jax import checks
from qinco_jax.codec import Codec
from qinco_jax.config import QincoConfig
from qinco_jax.model import Qinco, nearest_blocked
from qinco_jax.progress import Progress

# Vectors per jitted call, and elements of the inner sub-batch's (sub, K, max(d, h)) activations, by
# backend. On a CPU the activations stay cache-sized while the outer chunk amortises dispatch (chosen by
# eval/bench_codec.py); an accelerator wants far larger tensors (2^26 elements and 16,384-vector calls
# were fastest on an H100 in eval/bench_device.py; see README). Set DEFAULT_CHUNK / SUB_ELEMS to override.
SIZES = {"cpu": (1024, 1 << 20)}
ACCELERATOR_SIZES = (16384, 1 << 26)
DEFAULT_CHUNK: int | None = None
SUB_ELEMS: int | None = None
# Matmul precision of encode / decode. "highest" is float32 everywhere, so codes equal the original's and
# faiss's on every backend; GPUs otherwise default to TF32 for float32 matmuls, twice as fast on an H100 but
# with about 0.05% of the codes different (README, "Speed"). set_matmul_precision("tensorfloat32") trades that
# for speed.
MATMUL_PRECISION = "highest"


def set_matmul_precision(precision: str) -> None:
    """Matmul precision of the encode / decode functions compiled from now on: "highest" (float32, the
    default), "tensorfloat32" or "bfloat16" (bfloat16 inputs, float32 accumulation)."""
    global MATMUL_PRECISION
    if precision not in ("highest", "tensorfloat32", "bfloat16"):
        raise checks.QincoInputError(f"unknown matmul precision {precision!r}")
    MATMUL_PRECISION = precision
    _encode_fn.cache_clear()
    _decode_fn.cache_clear()


def default_chunk() -> int:
    """Vectors per jitted encode / decode call on this backend (or DEFAULT_CHUNK when set)."""
    return DEFAULT_CHUNK or SIZES.get(jax.default_backend(), ACCELERATOR_SIZES)[0]


def sub_elems() -> int:
    """Elements of the inner sub-batch's candidate activations on this backend (or SUB_ELEMS when set)."""
    return SUB_ELEMS or SIZES.get(jax.default_backend(), ACCELERATOR_SIZES)[1]


AXIS = "batch"  # the device axis of the pmap-ed encode / decode (and train step)


def search_policy(cfg: QincoConfig, beam: int | None = None, candidates: int | None = None) -> tuple[int, int]:
    """(A, B) of an encode: the requested candidates per beam and beam width, else the codec's own.

    Raises QincoInputError for a beam below 1, candidates outside [0, K], or candidates > 0 on a
    model without pre-selection codebooks (trained with A = 0; the original refuses it too).
    """
    A = cfg.A if candidates is None else candidates
    B = cfg.B if beam is None else beam
    for name, v in (("beam", B), ("candidates", A)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise checks.QincoInputError(f"{name} must be an int, got {v!r}")
    A, B = int(A), int(B)
    if B < 1:
        raise checks.QincoInputError(f"beam must be >= 1 (1 is greedy), got {B}")
    if A < 0 or A > cfg.K:
        raise checks.QincoInputError(f"candidates must be between 0 (all codes) and K={cfg.K}, got {A}")
    if A and not cfg.preselect:
        raise checks.QincoInputError(
            f"candidates={A} asks for pre-selection, but this model was trained without it (A=0) and has no "
            "pre-selection codebooks; use candidates=0 (all K codes)"
        )
    return A, B


def _sub_batch(cfg: QincoConfig, chunk: int, A: int | None = None, B: int | None = None) -> int:
    """Vectors per inner sub-batch: B * (A or K) candidates of width max(d, de, h) stay cache-sized,
    whatever the search."""
    A = cfg.A if A is None else A
    B = cfg.B if B is None else B
    evals = B * (A or cfg.K)
    return min(chunk, max(1, sub_elems() // (evals * max(cfg.d, cfg.emb, cfg.h))))


def _chunk(requested: int | None, n: int) -> int:
    """Vectors per jitted call: the request, or for fewer vectors the next power of two above n,
    so that calls on many small, differently sized inputs compile O(log n) times, not once per size."""
    requested = checks.batch_size(requested or default_chunk())
    return min(requested, 1 << max(0, n - 1).bit_length())


def _encode_chunk(cfg: QincoConfig, requested: int | None, n: int, A: int | None = None, B: int | None = None) -> int:
    """Vectors per jitted encode call: see _chunk, rounded up to a multiple of the inner sub-batch."""
    chunk = _chunk(requested, n)
    sub = _sub_batch(cfg, chunk, A, B)
    return -(-chunk // sub) * sub


def local_devices(devices=None) -> tuple:
    """The devices to run on: the given ones, or every local device of this process."""
    devs = tuple(devices) if devices is not None else tuple(jax.local_devices())
    if not devs:
        raise checks.QincoInputError("devices is empty")
    return devs


def _at_precision(fn, precision: str):
    """fn traced with its matmuls at the given precision (a part of the compiled function)."""

    def run(*args):
        with jax.default_matmul_precision(precision):
            return fn(*args)

    return run


def _parallel(fn, devices: tuple):
    """fn(params, x) over the devices: jit on one, pmap over several (params replicated, x split on axis 0)."""
    if len(devices) == 1:
        return jax.jit(fn)
    return jax.pmap(fn, in_axes=(0, 0), devices=list(devices))


def replicate(tree, devices: tuple):
    """A host pytree placed for _parallel: committed to the one device, else stacked over the devices."""
    return jax.device_put(tree, devices[0]) if len(devices) == 1 else stacked_replicate(tree, devices)


def stacked_replicate(tree, devices: tuple):
    """A host pytree copied onto each device along a leading axis, laid out as a pmap's own outputs
    (a mesh over the devices), so that a pmap fed with it compiles once."""
    if jax.process_count() > 1:
        from flax import jax_utils

        return jax_utils.replicate(tree, devices=list(devices))
    sharding = NamedSharding(Mesh(np.array(devices), (AXIS,)), PartitionSpec(AXIS))
    stacked = jax.tree.map(lambda a: np.broadcast_to(np.asarray(a), (len(devices),) + np.shape(a)), tree)
    return jax.device_put(stacked, sharding)


def _split(block: np.ndarray, devices: tuple):
    """A padded host block as the parallel function's input: (n_dev, chunk, ...) over several devices."""
    if len(devices) == 1:
        return jax.device_put(block, devices[0])
    return block.reshape((len(devices), -1) + block.shape[1:])


def _joined(out, devices: tuple | None):
    """Host copy of a parallel function's outputs, the device axis folded back into the rows."""
    out = jax.device_get(out)
    if devices is None or len(devices) == 1:
        return out
    return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), out)


@functools.lru_cache(maxsize=64)
def _encode_fn(cfg: QincoConfig, chunk: int, devices: tuple, A: int | None = None, B: int | None = None):
    """Encode `chunk` vectors per device per call, with the search (A, B) (default the config's)."""
    A, B = search_policy(cfg, B, A)
    model, sub = Qinco(cfg), _sub_batch(cfg, chunk, A, B)

    def one(params, x_BD, code0_B=None):
        codes, xhat = model.apply({"params": params}, x_BD, code0_B, A=A, B=B, method=Qinco.encode)
        return codes, jnp.sum(jnp.square(xhat - x_BD), axis=-1)

    def run(params, x):
        xs = x.reshape(chunk // sub, sub, cfg.d)
        if cfg.nlist:  # the IVF assignment on the whole chunk (a matmul per centroid block), then the steps
            code0 = model.apply({"params": params}, x, method=Qinco.assign).reshape(chunk // sub, sub)
            codes, err = jax.lax.map(lambda a: one(params, *a), (xs, code0))
        else:
            codes, err = jax.lax.map(lambda xb: one(params, xb), xs)
        return codes.reshape(chunk, cfg.num_codes), err.reshape(chunk)

    return _parallel(_at_precision(run, MATMUL_PRECISION), devices)


@jax.jit
def _assign_fn(c_ND, x_BD):
    return nearest_blocked(x_BD, c_ND)


@functools.lru_cache(maxsize=64)
def _decode_fn(cfg: QincoConfig, chunk: int, m: int, devices: tuple):
    model = Qinco(cfg)
    run = lambda params, codes: model.apply({"params": params}, codes, method=Qinco.decode)  # noqa: E731
    return _parallel(_at_precision(run, MATMUL_PRECISION), devices)


def _chunks(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


def _pad(block: np.ndarray, chunk: int) -> np.ndarray:
    if block.shape[0] == chunk:
        return block
    out = np.zeros((chunk,) + block.shape[1:], block.dtype)
    out[: block.shape[0]] = block
    return out


def _pipelined(n, chunk, launch, progress, desc, devices: tuple | None = None):
    """Launch jitted work chunk by chunk, fetching chunk i-1 while chunk i runs; yields host results."""
    pending = None
    with Progress(n, desc=desc, enabled=progress) as bar:
        for start, stop in _chunks(n, chunk):
            out = launch(start, stop)
            if pending is not None:
                yield pending[0], _joined(pending[1], devices)
                bar.update(pending[2])
            pending = (start, out, stop - start)
        if pending is not None:
            yield pending[0], _joined(pending[1], devices)
            bar.update(pending[2])


def encode_with_error(codec: Codec, x, *, beam: int | None = None, candidates: int | None = None,
                      batch_size: int | None = None, progress: bool = False, devices=None):
    """Codes and the per-vector squared reconstruction error (raw units) of a Codec.

    Returns (codes (n, cfg.num_codes) of cfg.code_dtype, err (n,) float64); the arguments are those of
    qinco_jax.api.encode.
    """
    cfg = codec.config
    A, B = search_policy(cfg, beam, candidates)
    x = checks.vectors(x, cfg.d)
    n, devs = x.shape[0], local_devices(devices)
    chunk = _encode_chunk(cfg, batch_size, -(-n // len(devs)), A, B)
    step = chunk * len(devs)  # vectors per call, split evenly over the devices
    search = () if (A, B) == (cfg.A, cfg.B) else (A, B)  # the codec's own search shares its compilation
    fn = _encode_fn(cfg, chunk, devs, *search)
    params = replicate(codec.params, devs)
    inv = np.float32(1.0 / codec.scale)
    shift = codec.shift
    codes = np.empty((n, cfg.num_codes), cfg.code_dtype)
    err = np.empty(n, np.float64)

    def launch(start, stop):
        block = np.asarray(x[start:stop], dtype=np.float32)
        if shift is not None:
            block = block - shift
        checks.encodable_chunk(block, start, codec.scale)
        return fn(params, _split(_pad(block * inv, step), devs))

    for start, (c, e) in _pipelined(n, step, launch, progress, "encode", devs):
        stop = min(n, start + step)
        codes[start:stop] = c[: stop - start]
        err[start:stop] = e[: stop - start].astype(np.float64) * codec.scale * codec.scale
    return codes, err


def decode(codec: Codec, codes, *, batch_size: int | None = None, progress: bool = False,
           devices=None) -> np.ndarray:
    """(n, d) float32 reconstructions (raw units) of a Codec's codes: see qinco_jax.api.decode."""
    cfg = codec.config
    codes = checks.codes(codes, cfg.K, cfg.M, nlist=cfg.nlist)
    n, m = codes.shape
    devs = local_devices(devices)
    chunk = _chunk(batch_size, -(-n // len(devs)))
    step = chunk * len(devs)
    fn = _decode_fn(cfg, chunk, m, devs)
    params = replicate(codec.params, devs)
    out = np.empty((n, cfg.d), np.float32)

    def launch(start, stop):
        return fn(params, _split(_pad(np.asarray(codes[start:stop], np.int32), step), devs))

    for start, xhat in _pipelined(n, step, launch, progress, "decode", devs):
        stop = min(n, start + step)
        out[start:stop] = xhat[: stop - start]
    out *= np.float32(codec.scale)
    if codec.shift is not None:
        out += codec.shift
    return out


def assign_scaled(c_scaled: np.ndarray, x, inv: np.float32, batch_size, progress: bool, what: str,
                   shift: np.ndarray | None = None) -> np.ndarray:
    """Nearest row of c_scaled for each row of (x - shift) * inv, streamed in chunks (int64 ids)."""
    x = checks.vectors(x, c_scaled.shape[1], what)
    n = x.shape[0]
    chunk = _chunk(batch_size, n)
    c = jax.device_put(np.asarray(c_scaled, np.float32))
    out = np.empty(n, np.int64)

    def launch(start, stop):
        block = np.asarray(x[start:stop], dtype=np.float32)
        checks.finite_chunk(block, start, what)
        if shift is not None:
            block = block - shift
        return _assign_fn(c, _pad(block * inv, chunk))

    for start, ids in _pipelined(n, chunk, launch, progress, "assign"):
        stop = min(n, start + chunk)
        out[start:stop] = ids[: stop - start]
    return out


def ivf_assign(codec: Codec, x, *, batch_size: int | None = None, progress: bool = False) -> np.ndarray:
    """IVF list ids of x: the exact nearest centroid (first index on ties), streamed in chunks.

    Equals column 0 of `encode(codec, x)` without running the QINCo steps. Returns (n,) int64.
    """
    if not codec.config.nlist:
        raise checks.QincoInputError("ivf_assign needs an IVF-QINCo codec (config.nlist > 0)")
    inv = np.float32(1.0 / codec.scale)
    return assign_scaled(np.asarray(codec.params["codebook0"]), x, inv, batch_size, progress, "x", codec.shift)
