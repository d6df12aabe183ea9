"""Reading PyTorch QINCo v1 checkpoints without torch (fixtures from tests/make_pt_fixture.py)."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax import codec as qcodec
from qinco_jax.config import QincoConfig
import reference
from qinco_jax.checks import CheckpointError
from qinco_jax.ptload import load_pt
from qinco_jax.ptload.v1 import convert
from qinco_jax.unpickler import ModuleRecord, RestrictedUnpickler, read_objects

DATA = Path(__file__).parent / "data"
FIXTURES = [
    ("qinco_tiny", QincoConfig(d=8, K=16, M=3, L=2, h=12, lowrank=False), 2.75),
    ("qinco_lr_tiny", QincoConfig(d=8, K=16, M=4, L=1, h=6, lowrank=True), 37.5),
    ("qinco_ivf_tiny", QincoConfig(d=8, K=16, M=2, L=1, h=8, nlist=300), 5.0),
]
TINY = DATA / "qinco_tiny.pt"
IVF = DATA / "qinco_ivf_tiny.pt"


# ----------------------------------------------------------------------------------------------
# Helpers for crafted files


class Reduce:
    """Pickles as a call fn(*args) (what a malicious checkpoint would contain)."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def write_pt(path, pkl: bytes, records: dict | None = None):
    """A torch-like zip archive holding data.pkl and extra records."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", "3\n")
        for name, data in (records or {}).items():
            z.writestr(f"archive/{name}", data)
    return path


def rewrite_zip(src, dst, edit):
    """Copy a zip, passing each record through edit(name, data) -> bytes, or None to drop it."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)
    return dst


# ----------------------------------------------------------------------------------------------
# Loading the fixtures


@pytest.mark.parametrize("name,cfg,scale", FIXTURES)
def test_config_and_params(name, cfg, scale):
    got_cfg, params, got_scale = load_pt(DATA / f"{name}.pt")
    ref = np.load(DATA / f"{name}_ref.npz")
    assert got_cfg == cfg
    assert list(ref["config"]) == [cfg.d, cfg.K, cfg.M, cfg.L, cfg.h] and bool(ref["lowrank"]) == cfg.lowrank
    assert (int(ref["nlist"]) if "nlist" in ref else 0) == cfg.nlist
    assert got_scale == pytest.approx(float(ref["db_scale"])) and isinstance(got_scale, float)
    qcodec.check_params(got_cfg, params)
    for leaf in _leaves(params):
        assert isinstance(leaf, np.ndarray) and leaf.dtype == np.float32 and leaf.flags.c_contiguous


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


@pytest.mark.parametrize("name,cfg,scale", FIXTURES)
def test_numpy_forward_matches_torch(name, cfg, scale):
    cfg, params, _ = load_pt(DATA / f"{name}.pt")
    ref = np.load(DATA / f"{name}_ref.npz")
    codes, xhat = reference.encode(params, ref["x"], cfg.M, cfg.L, cfg.lowrank, ivf=cfg.nlist > 0)
    np.testing.assert_array_equal(codes, ref["codes"])
    np.testing.assert_allclose(xhat, ref["encode_xhat"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(reference.decode(params, ref["codes"], cfg.L, cfg.lowrank), ref["recon"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,cfg,scale", FIXTURES)
def test_flax_codec_matches_torch(name, cfg, scale):
    cfg, params, scale = load_pt(DATA / f"{name}.pt")
    ref = np.load(DATA / f"{name}_ref.npz")
    c = qj.Codec(cfg, params, scale)
    x_raw = ref["x"] * np.float32(scale)
    codes = qj.encode(c, x_raw)
    assert codes.shape == ref["codes"].shape and codes.dtype == cfg.code_dtype
    np.testing.assert_array_equal(codes.astype(np.int64), ref["codes"])
    recon = qj.decode(c, ref["codes"])
    np.testing.assert_allclose(recon / scale, ref["recon"], rtol=0, atol=1e-5)


def test_cuda_location_is_read_like_cpu(tmp_path):
    needle = b"X\x03\x00\x00\x00cpu"  # the pickled location string (BINUNICODE)

    def to_cuda(name, data):
        if name.endswith("data.pkl"):
            assert needle in data
            return data.replace(needle, b"X\x06\x00\x00\x00cuda:0")
        return data

    cuda = rewrite_zip(TINY, tmp_path / "cuda.pt", to_cuda)
    cfg, params, scale = load_pt(cuda)
    cfg0, params0, scale0 = load_pt(TINY)
    assert (cfg, scale) == (cfg0, scale0)
    for a, b in zip(_leaves(params), _leaves(params0)):
        np.testing.assert_array_equal(a, b)


def _to_bf16_bytes(a):
    return (a.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()


@pytest.mark.parametrize(
    "storage,encode,rounded",
    [
        ("HalfStorage", lambda a: a.astype("<f2").tobytes(), lambda a: a.astype(np.float16).astype(np.float32)),
        ("DoubleStorage", lambda a: a.astype("<f8").tobytes(), lambda a: a),
        ("BFloat16Storage", _to_bf16_bytes,
         lambda a: ((a.view(np.uint32) >> 16) << 16).astype(np.uint32).view(np.float32)),
    ],
)
def test_other_float_storages(tmp_path, storage, encode, rounded):
    def retype(name, data):
        if name.endswith("data.pkl"):
            assert data.count(b"ctorch\nFloatStorage\n") == 1
            return data.replace(b"ctorch\nFloatStorage\n", b"ctorch\n" + storage.encode() + b"\n")
        if "/data/" in name:
            return encode(np.frombuffer(data, "<f4"))
        return data

    path = rewrite_zip(TINY, tmp_path / "retyped.pt", retype)
    cfg, params, _ = load_pt(path)
    cfg0, params0, _ = load_pt(TINY)
    assert cfg == cfg0
    for a, b in zip(_leaves(params), _leaves(params0)):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, rounded(b))


# ----------------------------------------------------------------------------------------------
# Security: nothing from the file is ever called


@pytest.mark.parametrize(
    "make",
    [
        lambda m: (Reduce(os.system, (f"touch {m}",)), 2, "system"),
        lambda m: (Reduce(eval, (f"open({str(m)!r}, 'w').close()",)), 4, "eval"),
        lambda m: (Reduce(exec, (f"open({str(m)!r}, 'w').close()",)), 2, "exec"),
        lambda m: (Reduce(subprocess.Popen, (["touch", str(m)],)), 2, "subprocess.Popen"),
    ],
    ids=["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen"],
)
def test_malicious_global_is_refused_before_call(tmp_path, make):
    marker = tmp_path / "marker"
    obj, protocol, global_name = make(marker)
    pkl = pickle.dumps({"d": 8, "payload": obj}, protocol=protocol)
    path = write_pt(tmp_path / "evil.pt", pkl)
    with pytest.raises(CheckpointError, match="refused") as e:
        load_pt(path)
    assert global_name in str(e.value)
    assert not marker.exists()


def test_restricted_unpickler_alone_refuses(tmp_path):
    marker = tmp_path / "marker"
    pkl = pickle.dumps(Reduce(os.system, (f"touch {marker}",)), protocol=2)
    with pytest.raises(CheckpointError, match="system"):
        RestrictedUnpickler(io.BytesIO(pkl)).load()
    assert not marker.exists()


def test_plain_pickle_is_not_loaded(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(Reduce(os.system, (f"touch {marker}",)), protocol=2))
    with pytest.raises(CheckpointError, match="plain pickle"):
        load_pt(path)
    assert not marker.exists()


def test_legacy_format_is_named(tmp_path):
    path = tmp_path / "legacy.pt"
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2))
    with pytest.raises(CheckpointError, match="legacy"):
        load_pt(path)


def test_pq_is_not_a_plain_codec(tmp_path):
    path = write_pt(tmp_path / "x.pt", b"\x80\x02cmodel_qinco\nPQ_QINCo\n)\x81}b.")
    with pytest.raises(CheckpointError, match="holds a model_qinco.PQ_QINCo, not a QINCo"):
        load_pt(path)


def test_unknown_class_is_refused(tmp_path):
    path = write_pt(tmp_path / "foo.pt", b"\x80\x02cmodel_qinco\nFoo\n)\x81}b.")
    with pytest.raises(CheckpointError, match=r"refused to load global model_qinco\.Foo"):
        load_pt(path)


def test_training_checkpoint_gets_a_hint(tmp_path):
    path = write_pt(tmp_path / "ckpt.pt", b"\x80\x02ctrain_qinco\nScheduler\n)\x81}b.")
    with pytest.raises(CheckpointError, match="--model"):
        load_pt(path)


# ----------------------------------------------------------------------------------------------
# Errors for broken or foreign files


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pt(tmp_path / "nope.pt")


def test_random_bytes(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(b"R" + np.random.default_rng(0).bytes(4000))
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        load_pt(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_pt(path)


def test_truncated_file(tmp_path):
    data = TINY.read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_pt(path)


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "plain.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/version", "3\n")
    with pytest.raises(CheckpointError, match="no <name>/data.pkl"):
        load_pt(path)


def test_corrupt_data_pkl(tmp_path):
    path = rewrite_zip(TINY, tmp_path / "bad.pt", lambda n, d: d[: len(d) // 2] if n.endswith("data.pkl") else d)
    with pytest.raises(CheckpointError, match="data.pkl .* is corrupt"):
        load_pt(path)


def test_missing_storage_record(tmp_path):
    path = rewrite_zip(TINY, tmp_path / "bad.pt", lambda n, d: None if n.endswith("/data/3") else d)
    with pytest.raises(CheckpointError, match="has no record .*data/3"):
        load_pt(path)


def test_storage_too_short(tmp_path):
    path = rewrite_zip(TINY, tmp_path / "bad.pt", lambda n, d: d[:12] if n.endswith("/data/0") else d)
    with pytest.raises(CheckpointError, match="data/0 .*truncated or corrupt"):
        load_pt(path)


def test_missing_tensor():
    top = read_objects(TINY)
    assert isinstance(top, ModuleRecord) and top.name == "QINCo"
    del top.state["_modules"]["step1"].state["_modules"]["codebook"].state["_parameters"]["weight"]
    with pytest.raises(CheckpointError, match="missing tensor step1.codebook.weight"):
        convert(top)


def test_attribute_shape_mismatch():
    top = read_objects(TINY)
    top.state["d"] = 9
    with pytest.raises(CheckpointError, match=r"codebook0.weight has shape \(16, 8\), expected \(16, 9\)"):
        convert(top)


def test_step_attribute_mismatch():
    top = read_objects(TINY)
    top.state["h"] = 13
    with pytest.raises(CheckpointError, match="step1.h = 12 disagrees with the model's h = 13"):
        convert(top)


def test_residual_block_shape_mismatch():
    top = read_objects(TINY)
    for m in (1, 2):
        top.state["_modules"][f"step{m}"].state["h"] = 13
    top.state["h"] = 13
    want = r"step1.residual_block0.0.weight has shape \(12, 8\), expected \(13, 8\)"
    with pytest.raises(CheckpointError, match=want):
        convert(top)


def test_missing_db_scale():
    top = read_objects(TINY)
    del top.state["db_scale"]
    with pytest.raises(CheckpointError, match="db_scale"):
        convert(top)


def test_not_a_qinco_module():
    top = read_objects(TINY)
    with pytest.raises(CheckpointError, match="not a QINCo"):
        convert(top.state["_modules"]["step1"])


# ----------------------------------------------------------------------------------------------
# IVF-QINCo files: K_IVF centroids in codebook0, then step0 .. step{M-1}


def test_ivf_steps_are_renumbered_from_one():
    top = read_objects(IVF)
    assert top.name == "IVFQINCo" and int(top.state["K_IVF"]) == 300 and int(top.state["M"]) == 2
    cfg, params, _ = convert(top)
    mods = top.state["_modules"]
    assert sorted(params) == ["codebook0", "step_1", "step_2"]
    for m in (0, 1):
        cb = mods[f"step{m}"].state["_modules"]["codebook"].state["_parameters"]["weight"]
        np.testing.assert_array_equal(params[f"step_{m + 1}"]["codebook"], cb)
    np.testing.assert_array_equal(params["codebook0"], mods["codebook0"].state["_parameters"]["weight"])


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t.state.pop("K_IVF"), "no attribute 'K_IVF'"),
        (lambda t: t.state.update(K_IVF=0), "K_IVF = 0"),
        (lambda t: t.state.update(K_IVF=301), r"codebook0.weight has shape \(300, 8\), expected \(301, 8\)"),
        (lambda t: t.state["_modules"].update(step2=t.state["_modules"].pop("step0")), r"IVFQINCo module has submodules .*'step2'.*expected .*'step0', 'step1'"),
        (lambda t: t.state["_modules"].pop("step1"), "has 2 submodules"),
    ],
    ids=["no-K_IVF", "K_IVF-0", "K_IVF-mismatch", "plain-step-names", "missing-step"],
)
def test_ivf_structure_errors(edit, match):
    top = read_objects(IVF)
    edit(top)
    with pytest.raises(CheckpointError, match=match):
        convert(top)
