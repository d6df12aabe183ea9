"""Saving and loading codecs: orbax directories, training workdirs, official PyTorch .pt files."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile

import jax
import numpy as np

from qinco_jax.checks import CheckpointError
from qinco_jax.codec import Codec, param_shapes
from qinco_jax.model import QincoConfig

FORMAT = "qinco_jax.codec/1"
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


def save(codec: Codec, path, *, overwrite: bool = False) -> str:
    """Save a codec as a directory (orbax params + qinco.json with config and scale).

    The directory appears complete or not at all: it is written beside the target and renamed.
    Returns the absolute path.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        params = jax.tree.map(lambda a: np.asarray(a, np.float32), jax.device_get(codec.params))
        _checkpointer().save(os.path.join(tmp, PARAMS), params)
        meta = {"format": FORMAT, "config": codec.config.to_dict(), "scale": codec.scale}
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=1)
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


def _read_meta(path: str) -> dict:
    try:
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read {META}: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown codec format {meta.get('format')!r} (expected {FORMAT!r})")
    return meta


def _load_dir(path: str) -> Codec:
    meta = _read_meta(path)
    try:
        cfg = QincoConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad config in {META}: {e}") from None
    target = jax.tree.map(lambda s: np.zeros(s, np.float32), param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    try:
        params = _checkpointer().restore(os.path.join(path, PARAMS), item=target)
    except Exception as e:  # orbax raises many types for damaged directories
        raise CheckpointError(f"{path}: cannot restore parameters ({type(e).__name__}: {e})") from None
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    try:
        return Codec(cfg, params, meta["scale"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: inconsistent checkpoint: {e}") from None


def load(path) -> Codec:
    """Load a codec from a saved directory, a training workdir (its best model) or an official .pt file.

    .pt files are read without torch and without executing code from the file.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, META)):
            return _load_dir(path)
        if os.path.exists(os.path.join(path, BEST, META)):
            return _load_dir(os.path.join(path, BEST))
        raise CheckpointError(f"{path} is a directory but holds no saved codec ({META}) nor a training run's {BEST}/")
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist")
    if zipfile.is_zipfile(path) or path.endswith((".pt", ".pth")):
        from qinco_jax.torch_format import load_pt

        cfg, params, scale = load_pt(path)
        return Codec(cfg, params, scale)
    raise CheckpointError(f"{path} is not a qinco_jax codec directory nor a PyTorch QINCo checkpoint")


class TrainCheckpoints:
    """Orbax manager of a run's full training state, one step per epoch (written atomically by orbax)."""

    def __init__(self, directory: str, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.mngr = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False),
        )

    def save(self, epoch: int, state, meta: dict) -> None:
        ocp = self._ocp
        state = jax.tree.map(np.asarray, jax.device_get(state))
        self.mngr.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        self.mngr.wait_until_finished()

    def latest(self) -> int | None:
        return self.mngr.latest_step()

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
