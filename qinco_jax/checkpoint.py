"""Saving and loading codecs: orbax directories, training workdirs, official PyTorch .pt files.

Loading a codec directory checks it before anything is allocated, under the budgets of
qinco_jax.limits: qinco.json is a small regular file holding a JSON object of bounded depth, every
field has its type and range, the parameter files are regular files of bounded size and count,
the stored parameter shapes equal those of the configuration; then the parameters are read and
must be finite. Every failure is a CheckpointError that names the file and the field.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import tempfile

import jax
import numpy as np

from qinco_jax import limits as limits_mod
from qinco_jax.checks import CheckpointError, QincoInputError, short
from qinco_jax.files import umask_mode
from qinco_jax.codec import Codec, Norm, param_shapes
from qinco_jax.limits import Limits
from qinco_jax.config import VARIANTS, QincoConfig
from qinco_jax.unpickler import check_depth, open_regular

FORMAT = "qinco_jax.codec/1"
PQ_FORMAT = "qinco_jax.pq/1"  # a PQCodec: sub_0 .. sub_{n-1} codec directories and an optional rotation
ROTATION = "rotation.npy"
MAX_SUB_CODECS = 1024
META = "qinco.json"
PARAMS = "params"
BEST = "best"  # a training workdir keeps its best codec here


def _checkpointer():
    """A checkpointer local to this process: a codec is small and written by one process only,
    so no cross-process barrier may be involved (on a multi-host job the others are training)."""
    import orbax.checkpoint as ocp

    me = jax.process_index()
    mp = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=mp), multiprocessing_options=mp)


def _host_params(codec: Codec) -> dict:
    """The codec's parameters as float32 host arrays, refused when any is not finite."""
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), jax.device_get(codec.params))
    bad = nonfinite_param(params)
    if bad:
        raise QincoInputError(f"refusing to save a codec whose parameter {bad} holds NaN or inf values")
    return params


def _write(codec, directory: str, params: list) -> None:
    """The files of a codec (params: its host parameter trees, one per plain codec) in a new directory."""
    from qinco_jax.pq import PQCodec

    if isinstance(codec, PQCodec):
        names = [f"sub_{i}" for i in range(len(codec.codecs))]
        for name, sub, p in zip(names, codec.codecs, params):
            os.makedirs(os.path.join(directory, name))
            _write(sub, os.path.join(directory, name), [p])
        if codec.rotation is not None:
            np.save(os.path.join(directory, ROTATION), codec.rotation)
        meta = {"format": PQ_FORMAT, "codecs": names, "rotation": ROTATION if codec.rotation is not None else None}
    else:
        _checkpointer().save(os.path.join(directory, PARAMS), params[0])
        meta = {"format": FORMAT, "config": codec.config.to_dict(), "scale": codec.scale}
        if codec.shift is not None:
            meta["shift"] = [float(v) for v in codec.shift]
    with open(os.path.join(directory, META), "w") as f:
        json.dump(meta, f, indent=1)


def save(codec: Codec, path, *, overwrite: bool = False) -> str:
    """Save a codec (or a PQCodec) as a directory (orbax params + qinco.json with config and scale;
    a PQCodec: one such directory per sub-codec and rotation.npy).

    The directory appears complete or not at all: it is written beside the target and renamed.
    Returns the absolute path.
    """
    from qinco_jax.pq import PQCodec

    if not isinstance(codec, (Codec, PQCodec)):
        raise TypeError(f"save() expects a qinco_jax.Codec or PQCodec, got {type(codec).__name__}")
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    params = [_host_params(c) for c in (codec.codecs if isinstance(codec, PQCodec) else (codec,))]
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    recover_save(path)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        os.chmod(tmp, umask_mode(0o777))  # mkdtemp makes 0700: colleagues could not read the codec
        _write(codec, tmp, params)
        if os.path.exists(path):
            old = tmp + ".old"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def recover_save(path: str) -> None:
    """Finish or undo a save() of path that was killed: leftover temporary directories go.

    save() writes .tmp-<name>-XXXX completely, then renames path to .tmp-<name>-XXXX.old and the
    new directory to path. Killed between the two renames, path is missing: the complete new
    directory (beside its .old) takes its place.
    """
    parent, name = os.path.split(os.path.abspath(path))
    prefix = ".tmp-" + name + "-"
    try:
        leftovers = sorted(e for e in os.listdir(parent) if e.startswith(prefix))
    except FileNotFoundError:
        return
    if not os.path.exists(path):
        for old in leftovers:
            new = old[: -len(".old")]
            if old.endswith(".old") and new in leftovers and os.path.exists(os.path.join(parent, new, META)):
                os.rename(os.path.join(parent, new), path)
                break
    for entry in leftovers:
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def nonfinite_param(params) -> str | None:
    """The name of the first parameter holding NaN or inf, or None."""
    for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not np.isfinite(np.asarray(leaf)).all():
            return "/".join(str(getattr(k, "key", k)) for k in keys)
    return None


def _refuse_constant(name: str):
    raise ValueError(f"the non-finite number {name} is not allowed")


def read_checkpoint_json(path: str, limits: Limits = limits_mod.DEFAULT, what: str = "metadata file") -> dict:
    """A small JSON object from a regular file: size, depth and finite numbers checked."""
    f = open_regular(path, limits.max_json_bytes, what)
    try:
        with f:
            raw = f.read(limits.max_json_bytes + 1)
        obj = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except RecursionError:
        raise CheckpointError(f"{path}: the JSON nests too deeply; refused") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, NaN / Infinity, ints of > 4300 digits
        raise CheckpointError(f"{path}: not valid JSON ({short(str(e), 200)[1:-1]})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it: {e.strerror}") from None
    check_depth(obj, limits.max_json_depth, path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(obj).__name__}, expected an object")
    return obj


def _read_meta(path: str, limits: Limits = limits_mod.DEFAULT) -> dict:
    meta = read_checkpoint_json(os.path.join(path, META), limits, META)
    if meta.get("format") not in (FORMAT, PQ_FORMAT):
        raise CheckpointError(f"{path}: unknown codec format {short(meta.get('format'))} in {META} (expected {FORMAT!r})")
    return meta


def _int_field(d: dict, key: str, where: str) -> int:
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{where}: field {key!r} is {short(value)}, expected an integer")
    return value


def config_from_meta(meta: dict, where: str, limits: Limits = limits_mod.DEFAULT) -> QincoConfig:
    """The 'config' field of codec metadata as a QincoConfig, every field checked, size within budget.

    The IVF (nlist) and QINCo2 fields (variant, de, A, B) are optional: codecs saved before them are
    plain QINCo v1.
    """
    raw = meta.get("config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: field 'config' is {short(raw)}, expected an object")
    names = ("d", "K", "M", "L", "h", "lowrank")
    optional = ("nlist", "variant", "de", "A", "B")  # absent from older (plain, QINCo v1) files
    extra = sorted(k for k in raw if k not in names + optional)
    if extra:
        raise CheckpointError(f"{where}: unknown field config.{short(extra[0])[1:-1]}")
    values = {k: _int_field(raw, k, where + ": config") for k in names[:-1]}
    if not isinstance(raw.get("lowrank"), bool):
        raise CheckpointError(f"{where}: field config.lowrank is {short(raw.get('lowrank'))}, expected true or false")
    values["lowrank"] = raw["lowrank"]
    for k in ("nlist", "A", "B"):
        if k in raw:
            values[k] = _int_field(raw, k, where + ": config")
    if "de" in raw and raw["de"] is not None:
        values["de"] = _int_field(raw, "de", where + ": config")
    if "variant" in raw:
        if raw["variant"] not in VARIANTS:
            raise CheckpointError(f"{where}: field config.variant is {short(raw['variant'])}, expected one of {VARIANTS}")
        values["variant"] = raw["variant"]
    try:
        cfg = QincoConfig(**values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: config: {e}") from None
    limits_mod.check_config(cfg, where, limits)
    return cfg


def scale_from_meta(meta: dict, where: str) -> float:
    """The 'scale' field: a positive finite number (true / false / strings refused)."""
    value = meta.get("scale")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{where}: field 'scale' is {short(value)}, expected a positive number")
    if not (math.isfinite(value) and value > 0):
        raise CheckpointError(f"{where}: field 'scale' is {short(value)}, expected a positive finite number")
    return float(value)


def norm_from_meta(meta: dict, cfg: QincoConfig, where: str) -> Norm:
    """The normalisation: 'scale', and 'shift' (d finite numbers) when present (QINCo2 codecs)."""
    scale = scale_from_meta(meta, where)
    if "shift" not in meta:
        return Norm(None, scale)
    shift = meta["shift"]
    if not isinstance(shift, list) or len(shift) != cfg.d:
        raise CheckpointError(f"{where}: field 'shift' is {short(shift)}, expected a list of d={cfg.d} numbers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in shift):
        raise CheckpointError(f"{where}: field 'shift' holds a value that is not a finite number")
    return Norm(np.asarray(shift, np.float32), scale)


def check_files(path: str, limits: Limits = limits_mod.DEFAULT) -> None:
    """A directory of regular files only, within the record count and byte budgets (before reading any)."""
    if not os.path.isdir(path) or os.path.islink(path):
        raise CheckpointError(f"cannot restore parameters: {path} is missing or not a directory")
    count, total, todo = 0, 0, [(path, 0)]
    while todo:
        folder, depth = todo.pop()
        with os.scandir(folder) as it:
            for entry in it:
                count += 1
                if count > limits.max_records:
                    raise CheckpointError(f"{path} holds more than {limits.max_records:,} files; refused")
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    if depth + 1 >= limits.max_json_depth:
                        raise CheckpointError(f"{path} nests folders too deeply; refused")
                    todo.append((entry.path, depth + 1))
                    continue
                if not stat.S_ISREG(st.st_mode):
                    raise CheckpointError(f"{entry.path} is not a regular file (a link, FIFO or device); refused")
                is_data = os.path.basename(folder) == "d"  # orbax's array chunks live in <...>/d/
                cap = limits.max_record_bytes if is_data else limits.max_index_bytes
                if st.st_size > cap:
                    raise CheckpointError(f"{entry.path} is {st.st_size:,} bytes, over the budget of {cap:,}; refused")
                total += st.st_size
                if total > limits.max_total_bytes:
                    raise CheckpointError(f"{path} holds more than {limits.max_total_bytes:,} bytes; refused")


def _stored_shapes(directory: str) -> dict:
    """{name: shape} of the arrays saved in an orbax params directory (read from its metadata only)."""
    tree = _checkpointer().metadata(directory).item_metadata.tree
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in keys): tuple(leaf.shape) for keys, leaf in leaves}


def restore_params(directory: str, shapes: dict, where: str, limits: Limits = limits_mod.DEFAULT):
    """Parameters of an orbax directory whose stored shapes must equal `shapes` (a tree of tuples), finite."""
    check_files(directory, limits)
    want = {"/".join(str(getattr(k, "key", k)) for k in keys): s
            for keys, s in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]}
    try:
        got = _stored_shapes(directory)
    except Exception as e:  # orbax raises many types for damaged directories
        raise CheckpointError(f"{where}: cannot restore parameters ({type(e).__name__}: {short(str(e), 200)[1:-1]})") from None
    for name, shape in want.items():
        if name not in got:
            raise CheckpointError(f"{where}: parameter {name} is missing")
        if got[name] != shape:
            raise CheckpointError(f"{where}: parameter {name} has shape {short(got[name])}, expected {shape} from the config")
    extra = sorted(set(got) - set(want))
    if extra:
        raise CheckpointError(f"{where}: unexpected parameter {short(extra[0])}")
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, np.float32), shapes, is_leaf=lambda x: isinstance(x, tuple))
    try:
        params = _checkpointer().restore(directory, item=target)
    except Exception as e:
        raise CheckpointError(f"{where}: cannot restore parameters ({type(e).__name__}: {short(str(e), 200)[1:-1]})") from None
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    bad = nonfinite_param(params)
    if bad:
        raise CheckpointError(f"{where}: parameter {bad} holds NaN or inf values")
    return params


def _load_rotation(path: str, limits: Limits) -> np.ndarray:
    """A PQ codec's rotation.npy: a regular file of bounded size holding a finite 2-D float matrix."""
    f = open_regular(path, limits.max_index_bytes, ROTATION)
    try:
        with f:
            rot = np.load(f, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path}: cannot read it as a .npy matrix: {short(str(e), 200)[1:-1]}") from None
    if rot.ndim != 2 or rot.dtype.kind != "f" or not np.isfinite(rot).all():
        raise CheckpointError(f"{path}: expected a finite 2-D float matrix, got {rot.shape} {rot.dtype}")
    return rot


def _load_pq_dir(path: str, meta: dict, limits: Limits):
    """A PQCodec directory: its sub-codec directories (plain codecs, checked as any) and its rotation."""
    from qinco_jax.pq import PQCodec

    where = os.path.join(path, META)
    names = meta.get("codecs")
    if not isinstance(names, list) or not 1 <= len(names) <= MAX_SUB_CODECS:
        raise CheckpointError(f"{where}: field 'codecs' is {short(names)}, expected a list of sub-codec directories")
    if names != [f"sub_{i}" for i in range(len(names))]:
        raise CheckpointError(f"{where}: field 'codecs' must be ['sub_0', 'sub_1', ...], got {short(names)}")
    codecs = []
    for name in names:
        sub = os.path.join(path, name)
        if _read_meta(sub, limits)["format"] != FORMAT:
            raise CheckpointError(f"{sub}: a PQ sub-codec must be a plain codec directory")
        codecs.append(_load_dir(sub, limits))
    rotation = meta.get("rotation")
    if rotation is not None:
        if rotation != ROTATION:
            raise CheckpointError(f"{where}: field 'rotation' is {short(rotation)}, expected {ROTATION!r} or null")
        rotation = _load_rotation(os.path.join(path, ROTATION), limits)
    try:
        return PQCodec(rotation, tuple(codecs))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: inconsistent PQ codec: {e}") from None


def _load_dir(path: str, limits: Limits = limits_mod.DEFAULT) -> Codec:
    meta = _read_meta(path, limits)
    if meta["format"] == PQ_FORMAT:
        return _load_pq_dir(path, meta, limits)
    where = os.path.join(path, META)
    cfg = config_from_meta(meta, where, limits)
    norm = norm_from_meta(meta, cfg, where)
    params = restore_params(os.path.join(path, PARAMS), param_shapes(cfg), path, limits)
    try:
        return Codec(cfg, params, norm)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: inconsistent checkpoint: {e}") from None


def _probed(codec, path: str):
    from qinco_jax.probe import refuse_overflow

    refuse_overflow(codec, path)
    return codec


def load(path) -> Codec:
    """Load a codec from a saved directory, a training workdir (its best model) or an official .pt file.

    .pt files are read without torch and without executing code from the file.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, META)):
            return _probed(_load_dir(path), path)
        if os.path.exists(os.path.join(path, BEST, META)):
            return _probed(_load_dir(os.path.join(path, BEST)), path)
        raise CheckpointError(f"{path} is a directory but holds no saved codec ({META}) nor a training run's {BEST}/")
    with open_regular(path, limits_mod.DEFAULT.max_file_bytes) as f:  # FIFOs and devices are never read
        head = f.read(4)
    if head.startswith(b"PK") or path.endswith((".pt", ".pth")):
        from qinco_jax.ptload import load_pt_codec

        return load_pt_codec(path)  # probed there
    raise CheckpointError(f"{path} is not a qinco_jax codec directory nor a PyTorch QINCo checkpoint")


class TrainCheckpoints:
    """Orbax manager of a run's full training state, one step per epoch (written atomically by orbax)."""

    def __init__(self, directory: str, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.mngr = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False,
                                                cleanup_tmp_directories=True),
        )

    def save(self, epoch: int, state, meta: dict) -> None:
        ocp = self._ocp
        state = jax.tree.map(np.asarray, jax.device_get(state))
        self.mngr.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        self.mngr.wait_until_finished()

    def latest(self) -> int | None:
        return self.mngr.latest_step()

    def steps(self) -> list[int]:
        """The epochs with a complete checkpoint."""
        return list(self.mngr.all_steps())

    def restore(self, template, epoch: int | None = None):
        """(state shaped like template, meta) of the given or latest epoch."""
        ocp = self._ocp
        epoch = self.latest() if epoch is None else epoch
        if epoch is None:
            raise CheckpointError(f"{self.mngr.directory} holds no training checkpoint to resume from")
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), template)
        r = self.mngr.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return jax.tree.map(np.asarray, r["state"]), r["meta"]

    def close(self) -> None:
        self.mngr.close()
