"""Official QINCo2 checkpoints read without torch (fixtures from tests/make_pt_fixture.py, whose torch
modules carry the original's tensor names and compute the reference codes)."""

import copy
import sys
from pathlib import Path

import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax.ptload.qinco2 import convert_qinco2
from qinco_jax.unpickler import read_objects

DATA = Path(__file__).parent / "data"
FIXTURES = {
    "qinco2_tiny": qj.QincoConfig(d=8, K=16, M=3, L=2, h=10, variant="qinco2", de=6, A=4, B=3),
    "qinco2_ddp_tiny": qj.QincoConfig(d=8, K=16, M=3, L=1, h=12, variant="qinco2", de=8, A=0, B=1),
    # IVF-QINCo2 (the original's IVFBook as steps.0, then M = 2 networked steps); B > A, so the codes
    # depend on the first networked step's max(A, B) candidates (with A there, a quarter of them differ)
    "qinco2_ivf_tiny": qj.QincoConfig(d=8, K=16, M=2, L=1, h=10, variant="qinco2", de=6, A=4, B=5, nlist=40),
}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_codes_equal_the_torch_reference(name):
    codec = qj.load(DATA / f"{name}.pt")
    ref = np.load(DATA / f"{name}_ref.npz")
    assert codec.config == FIXTURES[name]
    np.testing.assert_array_equal(qj.encode(codec, ref["x"]), ref["codes"])  # the checkpoint's own A, B
    np.testing.assert_array_equal(qj.encode(codec, ref["x"], beam=1, candidates=0), ref["greedy_codes"])
    np.testing.assert_allclose(qj.decode(codec, ref["codes"]), ref["recon"], rtol=1e-5, atol=1e-4)
    assert "torch" not in sys.modules  # loading a .pt never needs (nor imports) torch


def test_ivf_table_is_step_0_in_the_normalised_space():
    codec = qj.load(DATA / "qinco2_ivf_tiny.pt")
    obj = read_objects(DATA / "qinco2_ivf_tiny.pt")
    table, mean, std = (np.asarray(obj["model"][k]) for k in ("steps.0.ivf_centroids.weight", "data_mean", "data_std"))
    np.testing.assert_array_equal(codec.params["codebook0"], table)
    np.testing.assert_allclose(codec.ivf_centroids, table * std + mean, rtol=1e-6, atol=1e-5)  # raw units
    ref = np.load(DATA / "qinco2_ivf_tiny_ref.npz")
    assert qj.encode(codec, ref["x"]).shape == (len(ref["x"]), 3)  # the list id, then M = 2 codes
    np.testing.assert_array_equal(qj.runtime.ivf_assign(codec, ref["x"]), ref["codes"][:, 0])


@pytest.fixture(scope="module")
def raw():
    return read_objects(DATA / "qinco2_tiny.pt")


@pytest.fixture(scope="module")
def raw_ivf():
    return read_objects(DATA / "qinco2_ivf_tiny.pt")


def test_ivf_refusals(raw_ivf):
    table = "steps.0.ivf_centroids.weight"
    with pytest.raises(qj.CheckpointError, match=r"declares ivf_K = 41 centroids of data_dim = 8: expected \(41, 8\)"):
        convert_qinco2(_edited(raw_ivf, lambda o: o["parameters"].__setitem__("ivf_K", 41)))

    def other_width(o):
        o["model"][table] = np.zeros((40, 9), np.float32)

    with pytest.raises(qj.CheckpointError, match=r"shape \(40, 9\).*data_dim = 8"):
        convert_qinco2(_edited(raw_ivf, other_width))
    with pytest.raises(qj.CheckpointError, match=f"missing tensor {table}"):
        convert_qinco2(_edited(raw_ivf, lambda o: o["model"].pop(table)))
    with pytest.raises(qj.CheckpointError, match="ivf_K = 0"):
        convert_qinco2(_edited(raw_ivf, lambda o: o["parameters"].__setitem__("ivf_K", 0)))
    with pytest.raises(qj.CheckpointError, match="no 'ivf_K'"):
        convert_qinco2(_edited(raw_ivf, lambda o: o["parameters"].pop("ivf_K")))
    with pytest.raises(qj.CheckpointError, match="unexpected tensor 'steps.0.codebook.weight'"):
        convert_qinco2(_edited(raw_ivf, lambda o: o["model"].__setitem__("steps.0.codebook.weight",
                                                                         np.zeros((16, 8), np.float32))))


def _edited(raw, edit):
    obj = copy.deepcopy(raw)
    edit(obj)
    return obj


@pytest.mark.parametrize("tensor", ["steps.1.concat.mlp.bias", "steps.2.substep.codebook.weight", "data_std",
                                    "steps.0.codebook.weight", "steps.2.out_proj.weight"])
def test_missing_tensor_is_named(raw, tensor):
    obj = _edited(raw, lambda o: o["model"].pop(tensor))
    with pytest.raises(qj.CheckpointError, match=f"missing tensor {tensor}"):
        convert_qinco2(obj)


@pytest.mark.parametrize("tensor", ["steps.2.residual_blocks.1.up_proj.weight", "steps.1.in_proj.weight",
                                    "data_mean"])
def test_misshaped_tensor_is_named(raw, tensor):
    def edit(o):
        o["model"][tensor] = np.zeros(o["model"][tensor].shape + (2,), np.float32)

    with pytest.raises(qj.CheckpointError, match=f"tensor {tensor} has shape"):
        convert_qinco2(_edited(raw, edit))


def test_other_refusals(raw):
    with pytest.raises(qj.CheckpointError, match="unexpected tensor 'steps.1.extra'"):
        convert_qinco2(_edited(raw, lambda o: o["model"].__setitem__("steps.1.extra", np.zeros(3, np.float32))))
    with pytest.raises(qj.CheckpointError, match="no 'ivf_K'"):  # IVF declared, without its size
        convert_qinco2(_edited(raw, lambda o: o["parameters"].__setitem__("ivf_in_use", True)))
    with pytest.raises(qj.CheckpointError, match="'L' is"):
        convert_qinco2(_edited(raw, lambda o: o["parameters"].__setitem__("L", "2")))
    with pytest.raises(qj.CheckpointError, match="NaN"):
        convert_qinco2(_edited(raw, lambda o: o["model"]["steps.1.codebook.weight"].__setitem__((0, 0), np.nan)))
    with pytest.raises(qj.CheckpointError, match="A = 17"):
        convert_qinco2(_edited(raw, lambda o: o["parameters"].__setitem__("A", 17)))
