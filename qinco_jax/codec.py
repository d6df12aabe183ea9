"""The codec object and streaming, jit-compiled greedy encode / decode in raw units."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qinco_jax import checks
from qinco_jax.model import Qinco, QincoConfig, nearest_blocked
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


@dataclasses.dataclass(frozen=True, eq=False)
class Norm:
    """How raw vectors map to the model's domain: x_model = (x - shift) / scale.

    QINCo v1: shift None (0) and scale the data scale (db_scale); QINCo2: shift the per-dimension
    mean and scale one scalar std (spec 3.4).
    """

    shift: np.ndarray | None
    scale: float

    def __post_init__(self):
        s = float(self.scale)
        if not np.isfinite(s) or s <= 0:
            raise ValueError(f"scale must be a positive finite number, got {self.scale!r}")
        object.__setattr__(self, "scale", s)
        if self.shift is not None:
            shift = np.asarray(self.shift, np.float32)
            if shift.ndim != 1 or not np.isfinite(shift).all():
                raise ValueError(f"shift must be a finite vector, got shape {shift.shape}")
            object.__setattr__(self, "shift", shift)


@dataclasses.dataclass(frozen=True, eq=False)
class Codec:
    """A trained QINCo codec: architecture, parameters (normalised domain) and the normalisation.

    Inputs are mapped to (x - shift) / scale before the model sees them; reconstructions back.
    `norm` may be given as a number: the scale of a QINCo v1 codec (no shift).
    """

    config: QincoConfig
    params: Any
    norm: Norm

    def __post_init__(self):
        if not isinstance(self.config, QincoConfig):
            raise TypeError(f"config must be a QincoConfig, got {type(self.config).__name__}")
        norm = self.norm if isinstance(self.norm, Norm) else Norm(None, self.norm)
        if norm.shift is not None and norm.shift.shape != (self.config.d,):
            raise ValueError(f"shift has shape {norm.shift.shape}, expected ({self.config.d},)")
        object.__setattr__(self, "norm", norm)
        check_params(self.config, self.params)

    def __repr__(self) -> str:
        """One line: the architecture and the scale, not the parameter arrays."""
        c = self.config
        lr = ", lowrank" if c.lowrank else ""
        ivf = f", nlist={c.nlist}" if c.nlist else ""
        v2 = f", qinco2 de={c.emb} A={c.A} B={c.B}" if c.variant == "qinco2" else ""
        return (f"Codec(d={c.d}, K={c.K}, M={c.M}, L={c.L}, h={c.h}{lr}{ivf}{v2}, scale={self.scale:.6g}, "
                f"{c.num_params():,} parameters)")

    @property
    def scale(self) -> float:
        return self.norm.scale

    @property
    def shift(self) -> np.ndarray | None:
        return self.norm.shift

    @property
    def ivf_centroids(self) -> np.ndarray | None:
        """(nlist, d) float32 IVF centroids in raw units; None for a plain QINCo codec."""
        if not self.config.nlist:
            return None
        c = np.asarray(self.params["codebook0"], np.float32) * np.float32(self.scale)
        return c if self.shift is None else c + self.shift


def _init(cfg: QincoConfig, key):
    """Qinco(cfg).init: through encode for plain QINCo (as always), through decode for IVF (creating
    the same parameters without running the nearest-centroid scan eagerly)."""
    if cfg.nlist:
        return Qinco(cfg).init(key, jnp.zeros((1, cfg.num_codes), jnp.int32), method=Qinco.decode_all)
    return Qinco(cfg).init(key, jnp.zeros((1, cfg.d)), method=Qinco.encode)


CODECS = (Codec,)  # what encode / decode accept


def param_shapes(cfg: QincoConfig) -> dict:
    """The expected parameter tree as shapes (no computation)."""
    variables = jax.eval_shape(lambda: _init(cfg, jax.random.key(0)))
    return jax.tree.map(lambda a: tuple(a.shape), variables["params"])


def check_params(cfg: QincoConfig, params) -> None:
    """Raise a ValueError naming the first parameter whose presence or shape is wrong."""
    want = param_shapes(cfg)
    got_leaves = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    want_leaves = dict(jax.tree_util.tree_flatten_with_path(want, is_leaf=lambda x: isinstance(x, tuple))[0])
    name = lambda p: "/".join(str(getattr(k, "key", k)) for k in p)  # noqa: E731
    got = {name(p): v for p, v in got_leaves.items()}
    for p, shape in want_leaves.items():
        n = name(p)
        if n not in got:
            raise ValueError(f"parameter {n} is missing for {cfg}")
        if tuple(np.shape(got[n])) != shape:
            raise ValueError(f"parameter {n} has shape {tuple(np.shape(got[n]))}, expected {shape} for {cfg}")
    extra = set(got) - {name(p) for p in want_leaves}
    if extra:
        raise ValueError(f"unexpected parameters for {cfg}: {sorted(extra)[:5]}")


def init_params(cfg: QincoConfig, key: jax.Array) -> dict:
    """Random parameters: codebooks N(0, 1), linear layers as torch.nn.Linear's default init."""
    return _init(cfg, key)["params"]


def with_codebooks(params: dict, codebooks: np.ndarray, centroids: np.ndarray | None = None) -> dict:
    """Replace the codebooks of a parameter tree (normalised domain); pre-selection codebooks, where
    the steps have them, get the same values (QINCo2 spec 1.2).

    Plain QINCo: codebooks (M, K, d) go to codebook0, step_1 .. step_{M-1}. IVF-QINCo: centroids
    (nlist, d) go to codebook0 and codebooks (M, K, d) to step_1 .. step_M.
    """
    params = dict(params)  # new containers: the caller's tree is left as it was
    if centroids is None:
        params["codebook0"], rest = jnp.asarray(codebooks[0], jnp.float32), codebooks[1:]
    else:
        params["codebook0"], rest = jnp.asarray(centroids, jnp.float32), codebooks
    for m, cb in enumerate(rest, start=1):
        step = dict(params[f"step_{m}"])
        step["codebook"] = jnp.asarray(cb, jnp.float32)
        if "presel_codebook" in step:
            step["presel_codebook"] = step["codebook"]
        params[f"step_{m}"] = step
    return params


def identity_steps(cfg: QincoConfig, params: dict) -> dict:
    """Parameters whose every step returns its codeword, f(c, xhat) = c exactly, so that decoding
    is the plain RQ of the codebooks (`--init rq-exact`).

    QINCo v1: the concat block and every block's down-projection are zero. QINCo2: the
    codeword half of the concat block is -I, cancelling z0 = P_in c exactly (its xhat half, its
    bias and the down-projections are zero), so the outer skip alone remains.
    """
    params = jax.tree.map(np.array, jax.device_get(params))  # writable host copies
    for m in range(1, cfg.num_codes):
        step = params[f"step_{m}"]
        for l in range(cfg.L):
            step[f"block_{l}"]["down"]["kernel"][:] = 0
        if cfg.variant == "qinco2":
            step["concat"]["kernel"][:] = 0
            step["concat"]["kernel"][: cfg.emb] = -np.eye(cfg.emb, dtype=np.float32)
            step["concat"]["bias"][:] = 0
        elif cfg.lowrank:
            step["concat_out"]["kernel"][:] = 0
        else:
            step["concat"]["kernel"][:] = 0
            step["concat"]["bias"][:] = 0
    return params


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


def _composite(codec):
    """The module of a composite codec (PQ-QINCo), or a TypeError."""
    from qinco_jax import pq

    checks.codec(codec, CODECS + (pq.PQCodec,))
    return pq


def encode_with_error(codec: Codec, x, *, beam: int | None = None, candidates: int | None = None,
                      batch_size: int | None = None, progress: bool = False, devices=None):
    """Codes and the per-vector squared reconstruction error (raw units).

    Returns (codes (n, cfg.num_codes) of cfg.code_dtype, err (n,) float64). See encode() for the arguments.
    """
    if not isinstance(codec, Codec):
        return _composite(codec).encode_with_error(codec, x, batch_size=batch_size, progress=progress, devices=devices)
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


def encode(codec: Codec, x, *, beam: int | None = None, candidates: int | None = None,
           batch_size: int | None = None, progress: bool = False, devices=None) -> np.ndarray:
    """QINCo codes of x: beam search with candidate pre-selection (greedy for beam=1, candidates=0).

    Args:
      codec: the codec.
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


def decode(codec: Codec, codes, *, batch_size: int | None = None, progress: bool = False,
           devices=None) -> np.ndarray:
    """Reconstruct vectors (raw units, float32) from codes.

    Args:
      codec: the codec.
      codes: (n, m) integer codes with m <= cfg.num_codes; fewer columns give the reconstruction
        from that prefix (IVF: m = 1 is the centroid). Column 0 of IVF codes must be < nlist.
      batch_size: vectors per jitted call and device.
      progress: show a progress bar on stderr.
      devices: the devices to use (default: all local devices).

    Returns:
      (n, d) float32.
    """
    if not isinstance(codec, Codec):
        return _composite(codec).decode(codec, codes, batch_size=batch_size, progress=progress, devices=devices)
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


def _assign_scaled(c_scaled: np.ndarray, x, inv: np.float32, batch_size, progress: bool, what: str,
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
    return _assign_scaled(np.asarray(codec.params["codebook0"]), x, inv, batch_size, progress, "x", codec.shift)


def data_scale(xt) -> float:
    """The original's db_scale: the maximum entry of the training set (signed, not max-abs), streamed."""
    from qinco_jax import data

    s = data.streamed_max(xt)
    if not np.isfinite(s) or s <= 0:
        raise checks.QincoInputError(
            f"the training data's maximum is {s}; the data scale must be positive: pass scale= explicitly"
        )
    return s


RQ_NT = 1_000_000  # the RQ initialisation trains on at most this many vectors (as QINCo2)
NORM_NT = 100_000  # QINCo2 normalisation statistics come from the first 100k training vectors


def mean_std(xt) -> Norm:
    """QINCo2's normalisation (spec 3.4): per-dimension mean, one scalar std over all entries."""
    x = np.asarray(xt[:NORM_NT], np.float64)
    mean = x.mean(axis=0)
    std = float(np.sqrt(np.mean(np.square(x - mean))))
    if not np.isfinite(std) or std <= 0:
        raise checks.QincoInputError(f"the training data's standard deviation is {std}; it must be positive")
    return Norm(mean.astype(np.float32), std)


INITS = ("default", "rq-exact")
CODEBOOK_NOISE = 0.1  # QINCo2's codebook_noise_init


def init_codec(cfg: QincoConfig, xt, *, seed: int = 0, rq_beam_size: int = 1, scale: float | None = None,
               init: str = "default", centroids=None, rq_nt: int = RQ_NT) -> Codec:
    """A codec initialised as the originals: RQ codebooks trained on xt (raw units) and random layers.

    QINCo v1: codebooks divided by the data scale, torch-default linear layers. QINCo2: inputs
    normalised by mean and std, codebooks (RQ - mean) / std for step 0 and RQ / std after it, plus
    Gaussian noise of 0.1 x each table's std, copied into the pre-selection books (spec 1.2, 3.5).
    init="rq-exact": no noise, and every step returns its codeword, so the untrained codec is the RQ.
    IVF-QINCo (cfg.nlist > 0): codebook0 holds the centroids (raw units, (nlist, d); default: faiss
    k-means on xt with this seed), and the M-level RQ is trained on the residuals x - c[assign], where
    assign is the codec's own (exact) IVF assignment.

    Args:
      cfg: architecture.
      xt: (n, d) training vectors in raw units (a memmap is read in chunks, never converted whole).
      seed: seed of the random layers, of the codebook noise, of the RQ training sample (and of the IVF k-means).
      rq_beam_size: beam size of the faiss ResidualQuantizer that initialises the codebooks.
      scale: QINCo v1 data scale; default xt.max() as in the original (over all of xt).
      init: "default" (the originals') or "rq-exact".
      centroids: IVF centroids in raw units (IVF only).
      rq_nt: the RQ (and the IVF k-means) train on all of xt when it holds at most rq_nt vectors
        (the original's case, 500k by default), else on a fixed random sample of rq_nt of them.
    """
    from qinco_jax import data, faiss_ops

    if init not in INITS:
        raise checks.QincoInputError(f"init must be one of {INITS}, got {init!r}")
    xt = checks.vectors(xt, cfg.d, "training vectors")
    checks.finite(xt, "training vectors")
    checks.trainable(xt, cfg.K, "training vectors")
    if centroids is not None and not cfg.nlist:
        raise checks.QincoInputError("centroids are given but the config is not IVF (nlist = 0)")
    if cfg.variant == "qinco2":
        norm = mean_std(xt)
    else:
        norm = Norm(None, data_scale(xt) if scale is None else float(scale))
    inv = np.float32(1.0 / norm.scale)
    x = data.sample_rows(xt, rq_nt, seed)
    c_scaled = None
    if cfg.nlist:
        if centroids is None:
            if cfg.nlist > x.shape[0]:
                raise checks.QincoInputError(
                    f"k-means of nlist={cfg.nlist} centroids needs at least as many training vectors, got {x.shape[0]}"
                )
            centroids = faiss_ops.kmeans(x, cfg.nlist, seed)
        centroids = checks.centroids(centroids, cfg.d, cfg.nlist)
        c_scaled = (centroids if norm.shift is None else centroids - norm.shift) * inv
        assign = _assign_scaled(c_scaled, x, inv, None, False, "training vectors", norm.shift)
        x -= centroids[assign]
    if rq_beam_size == 1:  # the original's default, level by level in bounded memory
        codebooks = faiss_ops.greedy_rq_codebooks(x, cfg.M, cfg.K, inplace=True)
    else:
        codebooks = faiss_ops.rq_codebooks(faiss_ops.train_rq(x, cfg.M, cfg.K, rq_beam_size))
    del x
    if norm.shift is not None and not cfg.nlist:  # steps after IVF work on residuals: no mean there
        codebooks[0] -= norm.shift
    codebooks = codebooks / np.float32(norm.scale)
    if cfg.variant == "qinco2" and init == "default":
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal(codebooks.shape).astype(np.float32)
        codebooks = codebooks + noise * codebooks.std(axis=(1, 2), keepdims=True) * np.float32(CODEBOOK_NOISE)
    params = with_codebooks(init_params(cfg, jax.random.key(seed)), codebooks, c_scaled)
    if init == "rq-exact":
        params = identity_steps(cfg, params)
    return Codec(cfg, jax.device_get(params), norm)
