"""Hostile files against every loader: crafted pickles, zip archives, JSON and codec directories.

Every file is made here, small (a few KB to a few hundred KB), and every case asserts the error
type, a time budget and a memory budget (peak traced allocations, which include numpy buffers;
one test also measures the peak RSS growth of a fresh process). The budgets are generous bounds,
not benchmarks: the failures they guard against took seconds to minutes and gigabytes.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax import checkpoint, limits
from qinco_jax.ptload import load_pt
from qinco_jax.unpickler import read_objects
from qinco_jax.unpickler import records as stand_ins

from conftest import random_codec

DATA = Path(__file__).parent / "data"
TINY = DATA / "qinco_tiny.pt"
SECONDS = 20.0  # per case; each takes well under a second
PEAK_BYTES = 64 << 20  # per case; the refused files once took 2-8 GB


def within_budget(fn, *args, error=qj.CheckpointError, match=None, peak=PEAK_BYTES):
    """Run fn(*args): it must raise `error` (matching `match`) within the time and memory budgets."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    t0 = time.monotonic()
    try:
        with pytest.raises(error, match=match) as info:
            fn(*args)
    finally:
        used = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    seconds = time.monotonic() - t0
    assert seconds < SECONDS, f"took {seconds:.1f} s"
    assert used < peak, f"allocated {used / 2**20:.0f} MiB"
    assert len(str(info.value)) < 2000, "error messages show bounded values"
    return info.value


# ----------------------------------------------------------------------------------------------
# A small pickle assembler (protocol 2 opcodes), so the files hold exactly what each case needs


def op_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def op_str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def op_int(n: int) -> bytes:
    if 0 <= n < 1 << 31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8b" + struct.pack("<i", len(raw)) + raw  # LONG4


def op_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def op_call(fn: bytes, *args: bytes) -> bytes:
    return fn + op_tuple(*args) + b"R"


def op_dict(pairs: dict) -> bytes:
    return b"}(" + b"".join(op_str(k) + v for k, v in pairs.items()) + b"u"


def put(i: int) -> bytes:
    return b"r" + struct.pack("<I", i)


def get(i: int) -> bytes:
    return b"j" + struct.pack("<I", i)


PROTO, STOP = b"\x80\x02", b"."


def storage(key: str, numel: int) -> bytes:
    return op_tuple(op_str("storage"), op_global("torch", "FloatStorage"), op_str(key), op_str("cpu"),
                    op_int(numel)) + b"Q"


def tensor(storage_ops: bytes, size: tuple, stride: tuple) -> bytes:
    return op_call(op_global("torch._utils", "_rebuild_tensor_v2"), storage_ops, op_int(0),
                   op_tuple(*map(op_int, size)), op_tuple(*map(op_int, stride)), b"\x89", b"}")


def qinco_module(state_items: bytes) -> bytes:
    """A model_qinco.QINCo record whose attribute dict is built from state_items (SETITEMS body)."""
    return op_global("model_qinco", "QINCo") + b")\x81" + b"}(" + state_items + b"ub"


def write_pt(path, pkl: bytes, records: dict | None = None, compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compress) as z:
        z.writestr("archive/data.pkl", pkl)
        for name, data in (records or {}).items():
            z.writestr(f"archive/{name}", data)
    return path


# ----------------------------------------------------------------------------------------------
# Resource exhaustion from tiny files


def test_storage_record_referenced_by_thousands_of_tensors(tmp_path):
    shared = storage("0", 1 << 12) + put(0)
    tensors = b"".join(tensor(get(0), (1 << 12,), (1,)) + b"a" for _ in range(5000))
    pkl = PROTO + shared + b"0]" + tensors + STOP  # POP the storage, then a list filled by APPEND
    path = write_pt(tmp_path / "refs.pt", pkl, {"data/0": np.zeros(1 << 12, "<f4").tobytes()})
    within_budget(read_objects, path, match="referenced more than")


def test_deflate_bomb(tmp_path):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", PROTO + tensor(storage("0", 1), (1,), (1,)) + STOP)
        with z.open("archive/data/0", "w") as f:
            chunk = bytes(1 << 20)
            for _ in range(256):  # 256 MiB of zeros in about 256 KB
                f.write(chunk)
    assert path.stat().st_size < 1 << 20
    within_budget(read_objects, path, match="compression bomb")


def test_record_larger_than_its_budget(tmp_path):
    path = write_pt(tmp_path / "big.pt", PROTO + tensor(storage("0", 1), (1,), (1,)) + STOP,
                    {"data/0": np.zeros(1 << 18, "<f4").tobytes()})
    small = limits.Limits(max_record_bytes=1 << 19)
    within_budget(read_objects, path, small, match="too large")
    small = limits.Limits(max_total_bytes=1 << 20)
    within_budget(read_objects, path, small, match="exceed the budget")


def test_tensors_materialised_past_the_total_budget(tmp_path):
    shared = storage("0", 1 << 16) + put(0)
    tensors = b"".join(tensor(get(0), (1 << 16,), (1,)) + b"a" for _ in range(100))
    path = write_pt(tmp_path / "many.pt", PROTO + shared + b"0]" + tensors + STOP,
                    {"data/0": np.ones(1 << 16, "<f4").tobytes()})
    within_budget(read_objects, path, limits.Limits(max_total_bytes=8 << 20), match="exceed the budget")


def test_too_many_zip_records(tmp_path):
    path = tmp_path / "entries.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", PROTO + b"N" + STOP)
        for i in range(2000):
            z.writestr(f"archive/x{i}", b"")
    within_budget(read_objects, path, limits.Limits(max_records=1000), match="records")


def test_string_referenced_many_times_in_an_error_message(tmp_path):
    s = op_str("x" * 10_000) + put(0)
    big = b"]" + b"(" + s + get(0) * 200_000 + b"e"
    pkl = PROTO + qinco_module(op_str("d") + big) + STOP
    err = within_budget(load_pt, write_pt(tmp_path / "s.pt", pkl), match="attribute 'd'")
    assert "200,001 items" in str(err)


def colliding_keys(n: int, kind: str = "int") -> list[bytes]:
    """Opcodes of n keys that all hash alike (ints k * (2**61 - 1), or floats k * 2**61)."""
    if kind == "int":
        return [op_int(i * (2**61 - 1)) for i in range(1, n + 1)]
    return [b"G" + struct.pack(">d", float(i) * 2.0**61) for i in range(1, n + 1)]


def colliding_dict(n: int, kind: str = "int") -> bytes:
    return PROTO + b"}(" + b"".join(k + b"N" for k in colliding_keys(n, kind)) + b"u" + STOP


@pytest.mark.parametrize("kind", ["int", "float"])
def test_colliding_dict_keys(tmp_path, kind):
    within_budget(read_objects, write_pt(tmp_path / "keys.pt", colliding_dict(40_000, kind)), match="dict key")


def test_colliding_set_elements(tmp_path):
    pkl = PROTO + op_call(op_global("__builtin__", "set"), b"(" + b"".join(colliding_keys(20_000)) + b"l") + STOP
    within_budget(read_objects, write_pt(tmp_path / "set.pt", pkl), match="set element")
    pkl = PROTO + b"\x8f(" + b"".join(colliding_keys(20_000)) + b"\x90" + STOP  # protocol 4 EMPTY_SET, ADDITEMS
    within_budget(read_objects, write_pt(tmp_path / "set4.pt", pkl), match="set element")


def test_pickle_opcode_and_container_budgets(tmp_path):
    ops = write_pt(tmp_path / "ops.pt", PROTO + b"N0" * 50_000 + b"N" + STOP)
    within_budget(read_objects, ops, limits.Limits(max_pickle_ops=10_000), match="opcodes")
    items = write_pt(tmp_path / "items.pt", PROTO + b"N" + put(0) + b"](" + get(0) * 50_000 + b"e" + STOP)
    within_budget(read_objects, items, limits.Limits(max_container_items=10_000), match="more than 10,000")
    within_budget(read_objects, items, limits.Limits(max_items=10_000), match="container elements")
    big = write_pt(tmp_path / "big.pkl.pt", PROTO + op_str("y" * 100_000) + STOP)
    within_budget(read_objects, big, limits.Limits(max_pickle_bytes=50_000), match="too large|budget")


def test_time_budget(tmp_path):
    path = write_pt(tmp_path / "slow.pt", PROTO + b"N0" * 50_000 + b"N" + STOP)
    within_budget(read_objects, path, limits.Limits(max_seconds=0.0), match="longer than")


def test_huge_integer_attribute(tmp_path):
    pkl = PROTO + qinco_module(b"".join(op_str(k) + op_int(v) for k, v in
                                        dict(d=1 << 100_000, K=16, M=3, L=1, h=8).items())) + STOP
    err = within_budget(load_pt, write_pt(tmp_path / "long.pt", pkl), match="over the budget")
    assert "bits" in str(err)


def test_million_steps_is_refused_before_any_loop(tmp_path):
    pkl = PROTO + qinco_module(b"".join(op_str(k) + op_int(v) for k, v in
                                        dict(d=8, K=16, M=10**6, L=1, h=8).items())) + STOP
    within_budget(load_pt, write_pt(tmp_path / "m.pt", pkl), match="M = 1000000")


@pytest.mark.parametrize("size,stride", [((1 << 40,), (0,)), ((1,) * 100, (1,) * 100), ((-1,), (1,))])
def test_absurd_tensor_shapes(tmp_path, size, stride):
    sizes = op_tuple(*(op_int(v) if v >= 0 else b"J" + struct.pack("<i", v) for v in size))
    pkl = PROTO + op_call(op_global("torch._utils", "_rebuild_tensor_v2"), storage("0", 4), op_int(0), sizes,
                          op_tuple(*map(op_int, stride)), b"\x89", b"}") + STOP
    path = write_pt(tmp_path / "shape.pt", pkl, {"data/0": bytes(16)})
    within_budget(read_objects, path)


# ----------------------------------------------------------------------------------------------
# Raw exceptions that must be CheckpointError


def test_deeply_nested_lists_as_module_attribute(tmp_path):
    nested = b"(" * 100_000 + b"l" * 100_000
    pkl = PROTO + qinco_module(op_str("d") + nested) + STOP
    within_budget(load_pt, write_pt(tmp_path / "deep.pt", pkl), match="nests")


def test_shared_subtrees_do_not_blow_up_the_depth_walk(tmp_path):
    body = b"]" + put(0)
    for i in range(1, 40):  # l_i = [l_{i-1}, l_{i-1}]: 2^40 paths, 40 nodes
        body += b"(" + get(i - 1) + get(i - 1) + b"l" + put(i)
    read = read_objects(write_pt(tmp_path / "dag.pt", PROTO + body + STOP))
    assert isinstance(read, list)


@pytest.mark.parametrize("data", [b"\x80\x02", b"\x80\x02\xff.", b"\x80\x02j\x00\x00\x00\x7f.", b"\x80\x02(t" * 3],
                         ids=["no-stop", "bad-opcode", "missing-memo", "unbalanced"])
def test_corrupt_streams(tmp_path, data):
    within_budget(read_objects, write_pt(tmp_path / "c.pt", data))


# ----------------------------------------------------------------------------------------------
# Non-regular files


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_devices_are_refused(device):
    if not os.path.exists(device):
        pytest.skip(f"no {device}")
    within_budget(qj.load, device, match="not a regular file")
    within_budget(load_pt, device, match="not a regular file")


def test_fifo_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    within_budget(qj.load, fifo, match="not a regular file")
    within_budget(load_pt, fifo, match="not a regular file")
    d = tmp_path / "codec"
    d.mkdir()
    os.mkfifo(d / "qinco.json")
    within_budget(qj.load, d, match="not a regular file")


# ----------------------------------------------------------------------------------------------
# Nothing the file does survives it


def test_refused_pickle_cannot_change_the_loader(tmp_path):
    before = read_objects(TINY)
    defaults = stand_ins.rebuild_tensor_v2.__defaults__
    attacks = [
        # BUILD on a stand-in function, with a slot state rewriting its defaults
        op_global("torch._utils", "_rebuild_tensor_v2") + op_tuple(b"N", op_dict({"__defaults__": op_tuple(b"N")}))
        + b"b",
        # BUILD on a stand-in module class
        op_global("torch.nn.modules.linear", "Linear") + op_dict({"torch_class": op_str("evil")}) + b"b",
        # SETITEM on a stand-in function
        op_global("torch._utils", "_rebuild_parameter") + op_str("x") + b"N" + b"s",
        # NEWOBJ of a stand-in function
        op_global("builtins", "set") + b")\x81",
        # REDUCE of a builtin that was not resolved through the whitelist (an OrderedDict with arguments)
        op_call(op_global("collections", "OrderedDict"), b"]"),
    ]
    for i, attack in enumerate(attacks):
        within_budget(read_objects, write_pt(tmp_path / f"a{i}.pt", PROTO + attack + STOP), match="refused|not a dict")
    assert stand_ins.rebuild_tensor_v2.__defaults__ == defaults
    after = read_objects(TINY)
    assert type(after) is not type(before) and type(after).torch_class == type(before).torch_class
    cfg, params, scale = load_pt(TINY)
    assert cfg.M == 3 and scale == 2.75


# ----------------------------------------------------------------------------------------------
# Codec directories


@pytest.fixture
def codec_dir(tmp_path):
    return Path(qj.save(random_codec(qj.QincoConfig(d=8, K=16, M=3, L=1, h=8)), tmp_path / "c"))


def _edit_meta(path: Path, edit) -> None:
    meta = json.loads((path / "qinco.json").read_text())
    text = edit(meta)
    (path / "qinco.json").write_text(text if isinstance(text, str) else json.dumps(meta))


@pytest.mark.parametrize("edit,match", [
    (lambda m: "[1, 2]", "JSON list"),
    (lambda m: "null", "JSON NoneType"),
    (lambda m: '"codec"', "JSON str"),
    (lambda m: "[" * 100_000 + "]" * 100_000, "nest"),
    (lambda m: '{"a":' * 20 + "1" + "}" * 20, "nest"),
    (lambda m: json.dumps(m)[:-5], "not valid JSON"),
    (lambda m: json.dumps(m).replace(json.dumps(m["scale"]), "NaN"), "not valid JSON"),
    (lambda m: json.dumps(m).replace('"M": 3', '"M": ' + "9" * 5000), "not valid JSON"),
    (lambda m: m.update(scale=True), "'scale' is True"),
    (lambda m: m.update(scale="2"), "'scale'"),
    (lambda m: m.update(scale=-1.0), "'scale'"),
    (lambda m: m.update(scale=1e400), "not valid JSON|'scale'"),
    (lambda m: m.pop("scale"), "'scale' is None"),
    (lambda m: m.update(format=["x" * 5000] * 100), "unknown codec format"),
    (lambda m: m.update(config=[1, 2]), "'config'"),
    (lambda m: m["config"].update(M=10**6), "M = 1000000"),
    (lambda m: m["config"].update(d=1 << 16, K=1 << 16, M=1000, h=1 << 16), "over the budget"),
    (lambda m: m["config"].update(M=0), "M must be >= 1"),
    (lambda m: m["config"].update(M=2.0), "'M' is 2.0"),
    (lambda m: m["config"].update(L=True), "'L' is True"),
    (lambda m: m["config"].update(lowrank=1), "lowrank"),
    (lambda m: m["config"].pop("h"), "'h' is None"),
    (lambda m: m["config"].update(extra=1), "config.extra"),
    (lambda m: m["config"].update(K=32), "codebook0 has shape"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_metadata(codec_dir, edit, match):
    _edit_meta(codec_dir, edit)
    within_budget(qj.load, codec_dir, match=match)


def test_metadata_over_its_size_budget(codec_dir):
    (codec_dir / "qinco.json").write_text(json.dumps({"format": "x", "pad": "p" * (2 << 20)}))
    within_budget(qj.load, codec_dir, match="over the budget")


def test_non_finite_parameters_are_refused_at_save_and_load(tmp_path):
    codec = random_codec(qj.QincoConfig(d=8, K=16, M=3, L=1, h=8))
    params = jax.tree.map(np.array, codec.params)
    params["step_2"]["concat"]["kernel"][1, 2] = np.inf
    bad = qj.Codec(codec.config, params, codec.scale)
    with pytest.raises(qj.QincoInputError, match="step_2/concat/kernel"):
        qj.save(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and os.listdir(tmp_path) == []
    # a directory written by other means is refused at load
    good = Path(qj.save(codec, tmp_path / "c"))
    shutil.rmtree(good / "params")
    checkpoint._checkpointer().save(str(good / "params"), params)
    within_budget(qj.load, good, match="step_2/concat/kernel holds NaN or inf")


def test_params_directory_with_a_link_or_fifo(codec_dir, tmp_path):
    os.symlink("/dev/zero", codec_dir / "params" / "zero")
    within_budget(qj.load, codec_dir, match="not a regular file")
    os.unlink(codec_dir / "params" / "zero")
    os.mkfifo(codec_dir / "params" / "fifo")
    within_budget(qj.load, codec_dir, match="not a regular file")


def test_params_directory_over_budget(codec_dir):
    with pytest.raises(qj.CheckpointError, match="bytes"):
        checkpoint._load_dir(str(codec_dir), limits.Limits(max_total_bytes=1000))
    with pytest.raises(qj.CheckpointError, match="files"):
        checkpoint._load_dir(str(codec_dir), limits.Limits(max_records=3))


# ----------------------------------------------------------------------------------------------
# Peak RSS of a fresh process over a batch of bombs


RSS_SCRIPT = r"""
import os, resource, sys, time
import qinco_jax as qj
qj.load(sys.argv[1])  # warm up (imports, compilation) before measuring


def status(key):
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(key + ":"))


def reset_peak():
    # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status("VmRSS"), lambda: status("VmHWM")
    except OSError:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return base, lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


grow, t0 = 0, time.monotonic()
for path in sys.argv[2:]:
    base, peak = reset_peak()
    try:
        qj.load(path)
    except qj.CheckpointError:
        pass
    else:
        raise SystemExit(f"{path} loaded")
    grow = max(grow, peak() - base)
print(grow, time.monotonic() - t0)
"""


def test_peak_rss_growth_over_all_bombs(tmp_path):
    made = {}
    for name, fn in [("refs", test_storage_record_referenced_by_thousands_of_tensors), ("deflate", test_deflate_bomb),
                     ("deep", test_deeply_nested_lists_as_module_attribute),
                     ("string", test_string_referenced_many_times_in_an_error_message)]:
        sub = tmp_path / name
        sub.mkdir()
        fn(sub)  # writes the file (and checks it once in this process)
        made[name] = next(sub.glob("*.pt"))
    keys = write_pt(tmp_path / "keys.pt", colliding_dict(40_000))
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    paths = [str(p) for p in (*made.values(), keys, fifo, "/dev/zero")]
    p = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(TINY), *paths], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "XLA_FLAGS": ""})
    assert p.returncode == 0, p.stderr[-3000:]
    grow_kib, seconds = p.stdout.split()
    assert int(grow_kib) < 128 << 10, f"peak RSS grew by {int(grow_kib) >> 10} MiB"
    assert float(seconds) < 60
