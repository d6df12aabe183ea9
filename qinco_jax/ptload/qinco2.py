"""Official QINCo2 checkpoints (.pt) -> (QincoConfig, params, Norm), without torch.

The QINCo2 training writes `torch.save({"model": state_dict, "parameters": {K, M, L, de, dh, A, B,
...}, "data_dim": D, "optimizer": ..., ...})` (spec 1.5). IVF-QINCo2 files (parameters `ivf_in_use`,
`ivf_K`) hold the frozen IVF table as steps.0.ivf_centroids.weight (ivf_K, D), in the normalised
space like every codebook, followed by M networked steps steps.1 .. steps.M. `qinco_jax.unpickler` reads the archive
into plain containers and numpy arrays (no code from the file runs); this module checks the
state_dict tensor by tensor against the architecture the parameters declare and converts it to
this package's layout (qinco_jax.model): torch Linear weights (out, in) become kernels (in, out).
"""

from __future__ import annotations

import numpy as np

from qinco_jax import limits
from qinco_jax.checks import CheckpointError, short
from qinco_jax.codec import Norm
from qinco_jax.config import QincoConfig
from qinco_jax.ptload.tensors import MALFORMED, StateDictTensors

DDP_PREFIX = "module."
BUFFERS = ("xtarget_mean", "xtarget_var")  # dead-codeword statistics: not needed to encode or decode


def _int_param(params: dict, name: str, default: int | None = None) -> int:
    value = params.get(name)
    if value is None:
        if default is None:
            raise CheckpointError(f"the checkpoint's parameters have no {name!r}")
        return default
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise CheckpointError(f"the checkpoint's parameter {name!r} is {short(value)}, expected an int")
    return int(value)


def _config(obj: dict) -> tuple[QincoConfig, bool]:
    """(config, qinco1_mode) from 'parameters' and 'data_dim'."""
    params = obj["parameters"]
    if not isinstance(params, dict):
        raise CheckpointError(f"the checkpoint's 'parameters' is {short(params)}, expected a dict")
    D = _int_param(obj, "data_dim")
    nlist = 0
    if params.get("ivf_in_use"):  # IVF-QINCo2: M networked steps after the IVF table
        nlist = _int_param(params, "ivf_K")
        if nlist < 1:
            raise CheckpointError(f"invalid architecture in the checkpoint: ivf_K = {nlist}, expected >= 1")
    K, M, L = (_int_param(params, k) for k in ("K", "M", "L"))
    de, dh = _int_param(params, "de", D), _int_param(params, "dh")
    A, B = _int_param(params, "A", 0), _int_param(params, "B", 1)
    qinco1_mode = bool(params.get("qinco1_mode", False))
    try:
        if qinco1_mode:  # the v1 architecture (no outer skip, de = D, no pre-selection) in QINCo2's names
            cfg = QincoConfig(d=D, K=K, M=M, L=L, h=dh, variant="qinco1", A=0, B=B, nlist=nlist)
            if de != D or A:
                raise CheckpointError(f"qinco1_mode with de={de}, A={A}: expected de = D = {D} and A = 0")
        else:
            cfg = QincoConfig(d=D, K=K, M=M, L=L, h=dh, variant="qinco2", de=de, A=A, B=B, nlist=nlist)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"invalid architecture in the checkpoint: {e}") from None
    limits.check_config(cfg, "the checkpoint")
    return cfg, qinco1_mode


def _state_dict(obj: dict) -> dict:
    """The model's tensors by name, DDP 'module.' prefixes stripped."""
    state = obj["model"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"the checkpoint's 'model' is {short(state)}, expected a state_dict of named tensors")
    out = {}
    for k, v in state.items():
        name = k[len(DDP_PREFIX):] if k.startswith(DDP_PREFIX) else k
        if name in out:
            raise CheckpointError(f"tensor {name} appears twice in the checkpoint (with and without {DDP_PREFIX!r})")
        out[name] = v
    return out


def _step(t: StateDictTensors, cfg: QincoConfig, m: int) -> dict:
    """steps.{m} in this package's layout."""
    D, K, e, h, p = cfg.d, cfg.K, cfg.emb, cfg.h, f"steps.{m}"
    out = {"codebook": t.get(f"{p}.codebook.weight", (K, D))}
    if cfg.preselect:
        out["presel_codebook"] = t.get(f"{p}.substep.codebook.weight", (K, D))
    if e != D:
        out["in_proj"] = t.linear(f"{p}.in_proj", e, D)
        out["out_proj"] = t.linear(f"{p}.out_proj", D, e)
    out["concat"] = t.linear(f"{p}.concat.mlp", e, e + D, bias=True)
    for l in range(cfg.L):
        b = f"{p}.residual_blocks.{l}"
        out[f"block_{l}"] = {"up": t.linear(f"{b}.up_proj", h, e), "down": t.linear(f"{b}.down_proj", e, h)}
    return out


IVF_TABLE = "steps.0.ivf_centroids.weight"


def _ivf_table(t: StateDictTensors, cfg: QincoConfig) -> np.ndarray:
    """The frozen IVF centroids (ivf_K, data_dim), normalised as the file stores them."""
    table = t.state.get(IVF_TABLE)
    want = (cfg.nlist, cfg.d)
    if isinstance(table, np.ndarray) and table.shape != want:
        raise CheckpointError(
            f"tensor {IVF_TABLE} has shape {table.shape}, but the checkpoint declares ivf_K = {cfg.nlist} centroids "
            f"of data_dim = {cfg.d}: expected {want}")
    return t.get(IVF_TABLE, want)


def _norm(t: StateDictTensors, D: int) -> Norm:
    mean = t.state.get("data_mean")
    if isinstance(mean, np.ndarray) and mean.size == D and mean.shape != (D,):
        t.state["data_mean"] = mean.reshape(D)
    std = t.state.get("data_std")
    if isinstance(std, np.ndarray) and std.size == 1:
        t.state["data_std"] = std.reshape(())
    mean, std = t.get("data_mean", (D,)), float(t.get("data_std", ()).reshape(-1)[0])
    if not std > 0:
        raise CheckpointError(f"tensor data_std is {std}, expected a positive number")
    return Norm(mean, std)


def convert_qinco2(obj: dict) -> tuple[QincoConfig, dict, Norm]:
    """(config, params, normalisation) from the unpickled dict of a QINCo2 training checkpoint."""
    try:
        cfg, _ = _config(obj)
        t = StateDictTensors(_state_dict(obj), BUFFERS)
        if cfg.nlist:
            params = {"codebook0": _ivf_table(t, cfg)}
        else:
            params = {"codebook0": t.get("steps.0.codebook.weight", (cfg.K, cfg.d))}
            t.used.add("steps.0.substep.codebook.weight")  # older files carry an unused one on step 0
        for m in range(1, cfg.num_codes):
            params[f"step_{m}"] = _step(t, cfg, m)
        norm = _norm(t, cfg.d)
        t.check_all_used()
        return cfg, params, norm
    except CheckpointError:
        raise
    except MALFORMED as e:
        raise CheckpointError(f"malformed QINCo2 checkpoint: {type(e).__name__}: {e}") from None
