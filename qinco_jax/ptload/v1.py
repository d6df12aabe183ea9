"""Official PyTorch QINCo v1 checkpoints (.pt) -> (QincoConfig, params, scale), without torch.

`qinco_jax.unpickler` reads the archive into inert records (no code from the file runs); this module
checks the record tree of a QINCo / QINCo-LR / IVF-QINCo module and converts it to a `QincoConfig`, a parameter
tree in this package's layout (see qinco_jax.model) and the data scale (the original's db_scale); and
that of a PQ_QINCo module (one QINCo per sub-vector block, an optional OPQ matrix) to a PQCodec.
"""

from __future__ import annotations

import numpy as np

from qinco_jax import limits
from qinco_jax.checks import CheckpointError, short
from qinco_jax.codec import Codec
from qinco_jax.config import QincoConfig
from qinco_jax.pq import PQCodec
from qinco_jax.ptload.tensors import MALFORMED, checked_tensor
from qinco_jax.unpickler import ModuleRecord


# ----------------------------------------------------------------------------------------------
# QINCo / QINCoLR / IVFQINCo record tree -> config, params, scale


def _submodule(rec: ModuleRecord, name: str, path: str, cls: str | None = None) -> ModuleRecord:
    """Child module `name` of rec, optionally checking its class name."""
    mods = (rec.state or {}).get("_modules")
    child = mods.get(name) if isinstance(mods, dict) else None
    if not isinstance(child, ModuleRecord) or not isinstance(child.state, dict):
        raise CheckpointError(f"the checkpoint has no module {path}")
    if cls is not None and child.name != cls:
        raise CheckpointError(f"module {path} is a {child.torch_class}, expected {cls}")
    return child


def _tensor(rec: ModuleRecord, name: str, path: str, shape: tuple) -> np.ndarray:
    """Parameter `name` of rec as float32, checked for presence, dtype, shape and finiteness."""
    params = rec.state.get("_parameters")
    return checked_tensor(params.get(name) if isinstance(params, dict) else None, path, shape, "the model attributes")


def _linear(rec: ModuleRecord, path: str, out_f: int, in_f: int, bias: bool) -> dict:
    """A torch Linear as {'kernel': W.T (in, out)} (+ 'bias'); a bias must be present iff expected."""
    if rec.name != "Linear":
        raise CheckpointError(f"module {path} is a {rec.torch_class}, expected Linear")
    out = {"kernel": np.ascontiguousarray(_tensor(rec, "weight", f"{path}.weight", (out_f, in_f)).T)}
    has_bias = isinstance(rec.state.get("_parameters"), dict) and rec.state["_parameters"].get("bias") is not None
    if bias:
        out["bias"] = _tensor(rec, "bias", f"{path}.bias", (out_f,))
    elif has_bias:
        raise CheckpointError(f"module {path} has a bias; the QINCo v1 architecture has none there")
    return out


def _int_attr(rec: ModuleRecord, name: str) -> int:
    """Integer attribute of a module record."""
    value = rec.state.get(name)
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    if value is None:
        raise CheckpointError(f"the {rec.name} module has no attribute {name!r}")
    raise CheckpointError(f"attribute {name!r} of the {rec.name} module is {short(value)}, expected an int")


def _top_module(obj) -> ModuleRecord:
    """The pickled QINCo / QINCoLR / IVFQINCo module, or an error saying what the file holds instead."""
    if isinstance(obj, ModuleRecord) and obj.name in ("QINCo", "QINCoLR", "IVFQINCo") and isinstance(obj.state, dict):
        return obj
    if isinstance(obj, ModuleRecord):
        raise CheckpointError(f"the checkpoint holds a {obj.torch_class}, not a QINCo, QINCoLR or IVFQINCo model")
    if isinstance(obj, dict) and obj and all(isinstance(v, np.ndarray) for v in obj.values()):
        raise CheckpointError(
            "the checkpoint holds a state_dict (tensors only), not a model saved with torch.save(model, path); "
            "its architecture attributes and db_scale are missing"
        )
    raise CheckpointError(f"the checkpoint holds a {type(obj).__name__}, not a QINCo model")


def _step_names(top: ModuleRecord, M: int, ivf: bool = False) -> list[str]:
    """step1 .. step{M-1} (IVFQINCo: M full steps step0 .. step{M-1}), checked against the registered submodules."""
    mods = top.state.get("_modules")
    if not isinstance(mods, dict):
        raise CheckpointError("the QINCo module has no submodules")
    if not all(isinstance(k, str) for k in mods):
        raise CheckpointError("the QINCo module has submodules with non-string names")
    if len(mods) != M + ivf:  # checked first: M comes from the file and may be absurdly large
        raise CheckpointError(
            f"the {top.name} module has {len(mods)} submodules {short(sorted(mods))}, expected {M + ivf} for M={M}"
        )
    want = ["codebook0"] + [f"step{m}" for m in range(0 if ivf else 1, M)]
    if sorted(mods) != sorted(want):
        raise CheckpointError(
            f"the {top.name} module has submodules {short(sorted(mods))}, expected {short(want)} for M={M}"
        )
    return want[1:]


def _is_lowrank(top: ModuleRecord, steps: list[str]) -> bool:
    """QINCo-LR iff MLPconcat is a Sequential (all steps agree with each other and the class name)."""
    kinds = {_submodule(_submodule(top, s, s), "MLPconcat", f"{s}.MLPconcat").name for s in steps}
    if not kinds:
        return top.name == "QINCoLR"
    if len(kinds) > 1 or not kinds <= {"Linear", "Sequential"}:
        raise CheckpointError(f"unexpected MLPconcat modules {sorted(kinds)} (expected Linear or Sequential)")
    lowrank = kinds == {"Sequential"}
    if top.name == "QINCoLR" and not lowrank:
        raise CheckpointError("a QINCoLR checkpoint whose MLPconcat blocks are plain Linear layers")
    return lowrank


def _config(top: ModuleRecord) -> tuple[QincoConfig, list[str]]:
    """QincoConfig from the module attributes and structure, plus the step names."""
    d, K, L, M, h = (_int_attr(top, a) for a in ("d", "K", "L", "M", "h"))
    ivf = top.name == "IVFQINCo"
    nlist = _int_attr(top, "K_IVF") if ivf else 0  # IVF: M counts the QINCo steps after the centroids
    if ivf and nlist < 1:
        raise CheckpointError(f"invalid architecture in the checkpoint: K_IVF = {nlist}, expected >= 1")
    try:
        QincoConfig(d=d, K=K, M=M, L=L, h=h, nlist=nlist)  # ranges, before M sizes any loop
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"invalid architecture in the checkpoint: {e}") from None
    limits.check_config(QincoConfig(d=d, K=K, M=M, L=L, h=h, nlist=nlist), "the checkpoint")
    steps = _step_names(top, M, ivf)
    lowrank = _is_lowrank(top, steps)
    cfg = QincoConfig(d=d, K=K, M=M, L=L, h=h, lowrank=lowrank, nlist=nlist)
    limits.check_config(cfg, "the checkpoint")
    return cfg, steps


def _step_params(step: ModuleRecord, cfg: QincoConfig, name: str) -> dict:
    """One QINCoStep's parameters in this package's layout."""
    d, K, L, h = cfg.d, cfg.K, cfg.L, cfg.h
    for attr, want in (("d", d), ("K", K), ("L", L), ("h", h)):
        if attr in step.state and _int_attr(step, attr) != want:
            raise CheckpointError(f"{name}.{attr} = {step.state[attr]} disagrees with the model's {attr} = {want}")
    mods = step.state.get("_modules") or {}
    blocks = sorted(k for k in mods if k.startswith("residual_block"))
    if len(blocks) != L or blocks != sorted(f"residual_block{l}" for l in range(L)):
        raise CheckpointError(f"{name} has residual blocks {short(blocks)}, expected {L} (L={L})")
    cb = _submodule(step, "codebook", f"{name}.codebook", "Embedding")
    out = {"codebook": _tensor(cb, "weight", f"{name}.codebook.weight", (K, d))}
    mlp = _submodule(step, "MLPconcat", f"{name}.MLPconcat")
    if cfg.lowrank:
        out["concat_in"] = _linear(_submodule(mlp, "0", f"{name}.MLPconcat.0"), f"{name}.MLPconcat.0", h, 2 * d, False)
        out["concat_out"] = _linear(_submodule(mlp, "1", f"{name}.MLPconcat.1"), f"{name}.MLPconcat.1", d, h, False)
    else:
        out["concat"] = _linear(mlp, f"{name}.MLPconcat", d, 2 * d, True)
    for l in range(L):
        p = f"{name}.residual_block{l}"
        blk = _submodule(step, f"residual_block{l}", p, "Sequential")
        _submodule(blk, "1", f"{p}.1", "ReLU")
        up = _linear(_submodule(blk, "0", f"{p}.0"), f"{p}.0", h, d, False)
        down = _linear(_submodule(blk, "2", f"{p}.2"), f"{p}.2", d, h, False)
        out[f"block_{l}"] = {"up": up, "down": down}
    return out


def _db_scale(top: ModuleRecord) -> float:
    """The model's db_scale attribute as a positive finite float."""
    value = top.state.get("db_scale")
    if value is None:
        raise CheckpointError("the model has no db_scale attribute (set by the QINCo v1 training script)")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise CheckpointError(f"db_scale is {short(value)}, expected a number")
    scale = float(value)
    if not np.isfinite(scale) or scale <= 0:
        raise CheckpointError(f"db_scale must be positive and finite, got {scale}")
    return scale


def convert(obj) -> tuple[QincoConfig, dict, float]:
    """(config, params, scale) from the unpickled record tree of a QINCo / QINCoLR checkpoint."""
    try:
        return _convert(obj)
    except CheckpointError:
        raise
    except MALFORMED as e:  # odd attribute types
        raise CheckpointError(f"malformed QINCo module in the checkpoint: {type(e).__name__}: {e}") from None


def _convert(obj) -> tuple[QincoConfig, dict, float]:
    """convert() without the safety net for malformed record trees."""
    top = _top_module(obj)
    cfg, steps = _config(top)
    cb0 = _submodule(top, "codebook0", "codebook0", "Embedding")
    params = {"codebook0": _tensor(cb0, "weight", "codebook0.weight", (cfg.nlist or cfg.K, cfg.d))}
    for m, name in enumerate(steps, start=1):  # IVF: step{m-1} -> step_{m} (code column m)
        step = _submodule(top, name, name, "QINCoStep")
        params[f"step_{m}"] = _step_params(step, cfg, name)
    return cfg, params, _db_scale(top)


# ----------------------------------------------------------------------------------------------
# PQ_QINCo record tree -> PQCodec


def _opq_matrix(top: ModuleRecord, d_out: int) -> np.ndarray | None:
    """The PQ_QINCo's optional (d_out, d_in) OPQ matrix: a parameter, or None (registered or plain)."""
    params = top.state.get("_parameters")
    params = params if isinstance(params, dict) else {}
    if params.get("opq_matrix") is None and top.state.get("opq_matrix") is None:
        return None
    arr = params.get("opq_matrix")
    if not isinstance(arr, np.ndarray) or arr.ndim != 2:
        raise CheckpointError(f"opq_matrix is {type(arr).__name__}, expected a 2-D tensor")
    return _tensor(top, "opq_matrix", "opq_matrix", (d_out, arr.shape[1]))


def convert_pq(obj):
    """A PQCodec from the unpickled record tree of a PQ_QINCo checkpoint (sub_quantizer_{m}, opq_matrix)."""
    try:
        mods = obj.state.get("_modules")
        if not isinstance(mods, dict) or not all(isinstance(k, str) for k in mods):
            raise CheckpointError("the PQ_QINCo module has no submodules")
        want = [f"sub_quantizer_{m}" for m in range(len(mods))]
        if not mods or sorted(mods) != sorted(want):
            raise CheckpointError(f"the PQ_QINCo module has submodules {sorted(mods)[:6]}, expected sub_quantizer_0..")
        codecs = []
        for name in want:
            try:
                codecs.append(Codec(*convert(mods[name])))
            except CheckpointError as e:
                raise CheckpointError(f"{name}: {e}") from None
        rotation = _opq_matrix(obj, sum(c.config.d for c in codecs))
        return PQCodec(rotation, tuple(codecs))
    except CheckpointError:
        raise
    except MALFORMED as e:
        raise CheckpointError(f"malformed PQ_QINCo module in the checkpoint: {type(e).__name__}: {e}") from None


