"""qinco_jax.save / qinco_jax.load: orbax round trip, official .pt files, refusals."""

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax import faiss_ops

from conftest import near_codes, random_codec

FIXTURES = Path(__file__).parent / "data"


def test_round_trip_gives_identical_codes(tmp_path):
    codec = random_codec(qj.QincoConfig(d=12, K=16, M=3, L=1, h=10, lowrank=True), scale=7.5)
    path = qj.save(codec, tmp_path / "c")
    back = qj.load(path)
    assert back.config == codec.config and back.scale == codec.scale
    x = near_codes(codec, 200)
    np.testing.assert_array_equal(qj.encode(back, x), qj.encode(codec, x))
    assert sorted(os.listdir(tmp_path)) == ["c"]  # no temporary directory left behind


def test_save_never_overwrites_silently(tmp_path):
    a, b = random_codec(seed=0), random_codec(seed=1)
    qj.save(a, tmp_path / "c")
    with pytest.raises(FileExistsError):
        qj.save(b, tmp_path / "c")
    qj.save(b, tmp_path / "c", overwrite=True)
    np.testing.assert_array_equal(qj.load(tmp_path / "c").params["codebook0"], b.params["codebook0"])


def test_official_pt_file_loads_without_torch_and_matches_faiss():
    codec = qj.load(FIXTURES / "qinco_tiny.pt")
    ref = np.load(FIXTURES / "qinco_tiny_ref.npz")
    x = ref["x"] * codec.scale
    codes = qj.encode(codec, x)
    np.testing.assert_array_equal(codes, ref["codes"])
    q = faiss_ops.to_faiss(codec)
    np.testing.assert_array_equal(codes, faiss_ops.faiss_encode(q, ref["x"]))
    assert "torch" not in sys.modules  # loading a .pt never needs (nor imports) torch


def test_refusals(tmp_path):
    with pytest.raises(qj.CheckpointError, match="does not exist"):
        qj.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(qj.CheckpointError, match="holds no saved codec"):
        qj.load(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(qj.CheckpointError, match="not a qinco_jax codec"):
        qj.load(tmp_path / "notes.txt")
    qj.save(random_codec(), tmp_path / "c")
    shutil.rmtree(tmp_path / "c" / "params")
    with pytest.raises(qj.CheckpointError, match="cannot restore parameters"):
        qj.load(tmp_path / "c")
    half = tmp_path / "half.pt"
    data = (FIXTURES / "qinco_tiny.pt").read_bytes()
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(qj.CheckpointError):
        qj.load(half)
