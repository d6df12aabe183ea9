"""The codes store: compact per-process parts, the checks of every file it reads, the bounded wait of process 0,
and a 2-process build over jax.distributed on loopback."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax import codec as codec_mod
from qinco_jax import data
from qinco_jax import search as S
from qinco_jax.checks import QincoInputError
from qinco_jax.search.codes import MAX_PROCESSES
from tests.conftest import near_codes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IVF = qj.QincoConfig(d=8, K=16, M=3, L=1, h=16, nlist=300)  # list ids need uint16, step codes uint8


def ivf_codec(seed=0):
    return qj.Codec(IVF, jax.device_get(codec_mod.init_params(IVF, jax.random.key(seed))), 1.0)


def ivf_vectors(codec, n, seed=1):
    rng = np.random.default_rng(seed)
    codes = np.concatenate([rng.integers(0, IVF.nlist, (n, 1)), rng.integers(0, IVF.K, (n, IVF.M))], 1)
    return (qj.decode(codec, codes) + rng.normal(scale=0.05, size=(n, IVF.d))).astype(np.float32)


@pytest.fixture(scope="module")
def ivf():
    codec = ivf_codec()
    x = ivf_vectors(codec, 301)
    return codec, x, qj.encode(codec, x)


def test_compact_files_and_reader(tmp_path, ivf):
    """Step codes uint8, list ids uint16 in their own files, one set per process; open_codes reads them as the
    (n, 1 + M) matrix qj.encode gives, whatever the indexing."""
    codec, x, ref = ivf
    assert ref.dtype == np.uint16 and ref[:, 0].max() > 255  # list ids past uint8
    out = tmp_path / "c"
    for r in (2, 1, 0):  # process 0 last: it waits for the others and writes the manifest
        S.encode_database(codec, x, out, part_size=40, process_index=r, process_count=3)
    names = sorted(os.listdir(out))
    assert names == ["manifest.json"] + [f"part.r{r}of3.{w}" for r in range(3) for w in
                                         ("json", "lists.npy", "steps.npy")]
    for r, (lo, hi) in enumerate(S.process_slice(301, q, 3) for q in range(3)):
        steps = np.load(out / f"part.r{r}of3.steps.npy")
        lists = np.load(out / f"part.r{r}of3.lists.npy")
        assert steps.dtype == np.uint8 and lists.dtype == np.uint16 and steps.shape == (hi - lo, 3)
        np.testing.assert_array_equal(steps, ref[lo:hi, 1:])
        np.testing.assert_array_equal(lists, ref[lo:hi, 0])
    c = S.open_codes(out, codec)
    assert c.shape == ref.shape and c.dtype == ref.dtype and len(c) == 301 and c.bytes_per_vector == 3 + 2
    np.testing.assert_array_equal(np.asarray(c), ref)
    rows = np.array([300, 0, 100, 101, 99, 200, -1, 5])
    for key in (slice(None), slice(95, 205), slice(250, 10, -3), rows, rows[:, None], 100, -1, ref[:, 0] > 150,
                (slice(None), 0), (slice(None), slice(1, None)), (rows, 2), (7, 0)):
        np.testing.assert_array_equal(c[key], ref[key], err_msg=str(key))
    np.testing.assert_array_equal(c.steps[rows], ref[rows, 1:])
    np.testing.assert_array_equal(np.asarray(c.lists), ref[:, 0])
    with pytest.raises(IndexError):
        c[np.array([301])]
    st = S.codes_status(out)
    assert st["complete"] and st["done"] == 301 and [p["hi"] for p in st["processes"]] == [100, 200, 301]


def test_flat_codes_have_no_list_file(tmp_path, tiny_codec):
    x = near_codes(tiny_codec, 50)
    out = S.encode_database(tiny_codec, x, tmp_path / "f", part_size=16)
    assert sorted(os.listdir(out)) == ["manifest.json", "part.r0of1.json", "part.r0of1.steps.npy"]
    c = S.open_codes(out, tiny_codec)
    assert c.lists is None and c.bytes_per_vector == 3
    np.testing.assert_array_equal(c[np.array([3, 1])], qj.encode(tiny_codec, x[[3, 1]]))


def _complete(tmp_path, ivf, R=2):
    codec, x, _ = ivf
    out = tmp_path / "c"
    for r in reversed(range(R)):
        S.encode_database(codec, x, out, part_size=64, process_index=r, process_count=R)
    return out


def _edit(path, **fields):
    obj = json.loads(path.read_text())
    obj.update(fields)
    path.write_text(json.dumps(obj))


@pytest.mark.parametrize("field,value,match", [
    ("process_count", 10 ** 12, "'process_count' is 1000000000000, outside \\[1, 65536\\]"),
    ("process_count", 302, "'process_count' is 302, more than the 301 rows"),
    ("process_count", True, "'process_count' must be int, got True"),
    ("n", -5, "'n' is -5, outside"),
    ("n", "301", "'n' must be int"),
    ("M", 10 ** 9, "'M' is 1000000000, outside"),
    ("fingerprint", "x" * 64, "fingerprint"),
    ("steps_dtype", "<u2", "'steps_dtype' must be '|u1'"),
    ("lists_dtype", None, "'lists_dtype' must be '<u2'"),
    ("format", "something/3", "not a codes store file"),
])
def test_manifest_schema(tmp_path, ivf, field, value, match):
    out = _complete(tmp_path, ivf)
    _edit(out / S.MANIFEST, **{field: value})
    t = time.perf_counter()
    with pytest.raises(QincoInputError, match=match):
        S.codes_status(out)
    with pytest.raises(QincoInputError, match=match):
        S.open_codes(out)
    assert time.perf_counter() - t < 5


def test_huge_process_count_is_bounded_by_the_database(tmp_path, ivf):
    """process_count 10**12 with n 10**12 is still refused at once (process counts have a cap), never looped."""
    out = _complete(tmp_path, ivf)
    _edit(out / S.MANIFEST, n=10 ** 12, process_count=10 ** 12)
    t = time.perf_counter()
    with pytest.raises(QincoInputError, match=f"'process_count' is 1000000000000, outside \\[1, {MAX_PROCESSES}\\]"):
        S.codes_status(out)
    assert time.perf_counter() - t < 5
    (out / S.MANIFEST).write_text(" " * (17 << 20))
    with pytest.raises(QincoInputError, match="over the"):
        S.open_codes(out)


def test_done_markers_checked_against_their_own_slice(tmp_path, ivf):
    out = _complete(tmp_path, ivf)
    m0, m1 = out / "part.r0of2.json", out / "part.r1of2.json"
    good0, good = m0.read_text(), m1.read_text()
    # a marker claiming rows outside its slice cannot make a half-written part count as complete
    for m, fields, match in (
            (m0, {"rows_done": 301, "hi": 301}, "claims process 0, rows \\[0, 301\\); process 0 of 2 encodes "
                                                "\\[0, 150\\)"),
            (m0, {"rows_done": 151}, "'rows_done' is 151, outside the slice \\[0, 150\\] of process 0 of 2"),
            (m1, {"rows_done": 400}, "'rows_done' is 400, outside the slice \\[150, 301\\]"),
            (m1, {"lo": 0, "rows_done": 301}, "claims process 1, rows \\[0, 301\\)"),
            (m1, {"process_index": 0}, "claims process 0"),
            (m1, {"fingerprint": "0" * 64}, "belongs to another build \\(fingerprint"),
            (m1, {"rows_done": 1.5e2}, "'rows_done' must be int")):
        m0.write_text(good0)
        m1.write_text(good)
        _edit(m, **fields)
        with pytest.raises(QincoInputError, match=match):
            S.open_codes(out)
    m0.write_text(good0)
    m1.write_text(good)
    _edit(m1, rows_done=200)  # a slice not done: the folder is not complete, even with the manifest there
    st = S.codes_status(out)
    assert not st["complete"] and st["done"] == 150 + 50
    with pytest.raises(QincoInputError, match="unfinished \\(200 of 301.*process 1: 50 of its 151 rows"):
        S.open_codes(out)
    m1.unlink()
    with pytest.raises(QincoInputError, match="process 1: no done marker"):
        S.open_codes(out)


def test_part_files_checked_before_mapping(tmp_path, ivf):
    codec, _, ref = ivf
    out = _complete(tmp_path, ivf)
    steps, lists = out / "part.r1of2.steps.npy", out / "part.r1of2.lists.npy"
    good_s, good_l = steps.read_bytes(), lists.read_bytes()
    cases = [
        (steps, good_s[:-1], "holds 580 bytes, 581 expected"),
        (steps, good_s + b"\0", "holds 582 bytes, 581 expected"),
        (lists, b"", "no readable .npy header"),
        (lists, b"\x93NUMPY" + b"\xff" * 200, "no readable .npy header"),
    ]
    for a, what in ((ref[150:, 1:], "dtype uint16, shape \\(151, 3\\)"),
                    (ref[150:, 1:].astype(np.uint8).T.copy(), "dtype uint8, shape \\(3, 151\\)")):
        np.save(tmp_path / "x.npy", a)
        cases.append((steps, (tmp_path / "x.npy").read_bytes(), f"{what}; the build's settings say dtype uint8, "
                                                                 "shape \\(151, 3\\)"))
    np.save(tmp_path / "x.npy", np.asfortranarray(ref[150:, 1:]))
    cases.append((steps, (tmp_path / "x.npy").read_bytes(), "Fortran order"))
    for path, raw, match in cases:
        steps.write_bytes(good_s)
        lists.write_bytes(good_l)
        path.write_bytes(raw)
        with pytest.raises(QincoInputError, match=match):
            S.open_codes(out)
    steps.write_bytes(good_s)
    lists.unlink()
    os.mkfifo(lists)
    with pytest.raises(QincoInputError, match="not a regular file"):
        S.open_codes(out)
    lists.unlink()
    (tmp_path / "outside.npy").write_bytes(good_l)
    lists.symlink_to(tmp_path / "outside.npy")  # the same bytes, but outside the folder
    with pytest.raises(QincoInputError, match="is a symbolic link"):
        S.open_codes(out)
    lists.unlink()
    lists.write_bytes(good_l)
    np.testing.assert_array_equal(np.asarray(S.open_codes(out, codec)), ref)


def test_previous_format_folder_is_refused_with_the_fix(tmp_path, ivf):
    codec, x, ref = ivf
    old = tmp_path / "old"
    old.mkdir()
    np.save(old / "codes.npy", ref)
    (old / "manifest.json").write_text(json.dumps({"format": "qinco_jax.codes/1", "n": 301, "process_count": 1}))
    (old / "done.p0of1.json").write_text(json.dumps({"rows_done": 301, "lo": 0, "hi": 301}))
    for call in (lambda: S.open_codes(old), lambda: S.encode_database(codec, x, old)):
        with pytest.raises(QincoInputError, match="earlier format.*rebuild it: delete the folder"):
            call()
    (old / "manifest.json").unlink()
    with pytest.raises(QincoInputError, match="earlier format"):
        S.open_codes(old)


def test_other_process_count_leftovers_refused(tmp_path, ivf):
    codec, x, _ = ivf
    out = tmp_path / "c"
    S.encode_database(codec, x, out, part_size=64, process_index=1, process_count=2)
    with pytest.raises(QincoInputError, match="process_count 2 \\(this build has 3\\)"):
        S.encode_database(codec, x, out, part_size=64, process_index=0, process_count=3)
    with pytest.raises(QincoInputError, match="at most one process per vector"):
        S.encode_database(codec, x[:2], tmp_path / "d", process_index=0, process_count=3)


def test_process_0_waits_a_bounded_time(tmp_path, ivf, monkeypatch):
    """Process 0 of 2 fails within about wait_s when process 1 never starts, or stops part-way; a rerun of the
    missing process and of process 0 then completes the build."""
    codec, x, ref = ivf
    out = tmp_path / "c"
    t = time.perf_counter()
    with pytest.raises(TimeoutError, match="1 process\\(es\\) made no progress for 0.5 s.*process 1: no done "
                                           "marker.*run the build again"):
        S.encode_database(codec, x, out, part_size=64, process_index=0, process_count=2, wait_s=0.5, poll_s=0.05)
    assert time.perf_counter() - t < 30
    assert not (out / S.MANIFEST).exists()
    real = qj.encode

    def dies_after_one_part(c, xs, **kw):
        monkeypatch.setattr(qj, "encode", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        return real(c, xs, **kw)

    monkeypatch.setattr(qj, "encode", dies_after_one_part)
    with pytest.raises(KeyboardInterrupt):
        S.encode_database(codec, x, out, part_size=64, process_index=1, process_count=2)
    monkeypatch.setattr(qj, "encode", real)
    with pytest.raises(TimeoutError, match="process 1: 64 of its 151 rows \\[150, 301\\)"):
        S.finish_codes(out, wait_s=0.3, poll_s=0.05)
    with pytest.raises(QincoInputError, match="unfinished \\(214 of 301 rows.*process 1: 64 of its 151"):
        S.open_codes(out)
    S.encode_database(codec, x, out, part_size=64, process_index=1, process_count=2)
    S.encode_database(codec, x, out, part_size=64, process_index=0, process_count=2, wait_s=0.5)
    np.testing.assert_array_equal(np.asarray(S.open_codes(out, codec)), ref)


# ----------------------------------------------------------------------------- 2 processes on loopback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DYING = """
import os, sys
import qinco_jax as qj
from eval import search as cli
real, calls = qj.encode, []
def dying(c, x, **kw):  # this process dies (no clean-up) after its first part
    if calls:
        os._exit(9)
    calls.append(len(x))
    return real(c, x, **kw)
qj.encode = dying
cli.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def two_proc_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("twoproc")
    codec = ivf_codec(seed=3)
    xt, xb = ivf_vectors(codec, 700, seed=4), ivf_vectors(codec, 500, seed=5)
    qj.save(codec, root / "codec")
    data.write_vectors(root / "train.fvecs", xt)
    data.write_vectors(root / "db.fvecs", xb)
    (root / "dying.py").write_text(DYING)
    return root, codec, xt, xb


def _build_cmd(root, out, r, port, *extra, script=None):
    head = [sys.executable, str(script)] if script else [sys.executable, os.path.join(REPO, "eval", "search.py")]
    return head + ["build", "--model", str(root / "codec"), "--db", str(root / "db.fvecs"), "--train",
                   str(root / "train.fvecs"), "--out", str(out), "--part-size", "100", "--norm", "float",
                   "--no-progress", "--distributed", "--coordinator-address", f"127.0.0.1:{port}",
                   "--num-processes", "2", "--process-id", str(r), *extra]


def _run_two(cmds, timeout=240):
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    procs = [subprocess.Popen(c, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    try:
        return [(p.wait(timeout=timeout), *p.communicate()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.slow
def test_two_process_build_equals_one_process(two_proc_files):
    root, codec, xt, xb = two_proc_files
    out = root / "idx2"
    port = _free_port()
    (rc0, o0, e0), (rc1, o1, e1) = _run_two([_build_cmd(root, out, r, port) for r in (0, 1)])
    assert rc0 == 0 and rc1 == 0, (e0[-3000:], e1[-3000:])
    assert "process 1 of 2" in e1 and "process 0 builds the index" in e1
    assert sorted(f for f in os.listdir(out / S.DB_CODES) if f.endswith(".json")) == [
        "manifest.json", "part.r0of2.json", "part.r1of2.json"]
    np.testing.assert_array_equal(np.asarray(S.open_codes(out / S.DB_CODES, codec)), qj.encode(codec, xb))
    np.testing.assert_array_equal(np.asarray(S.open_codes(out / "train_codes", codec)), qj.encode(codec, xt))
    meta = S.read_index_meta(out)
    assert meta["ntotal"] == 500 and meta["db_codes_bytes_per_vector"] == 5
    S.load_pipeline(out, codec)


@pytest.mark.slow
def test_two_process_build_with_a_crashed_process_fails_in_bounded_time(two_proc_files):
    root, _, _, _ = two_proc_files
    out = root / "idx_crash"
    port = _free_port()
    t = time.perf_counter()
    (rc0, _, e0), (rc1, _, _) = _run_two([_build_cmd(root, out, 0, port, "--wait-s", "3"),
                                          _build_cmd(root, out, 1, port, script=root / "dying.py")], timeout=180)
    assert rc1 == 9 and rc0 == 1, e0[-3000:]
    assert "made no progress for 3 s" in e0 and "process 1: 100 of its 350 rows [350, 700)" in e0, e0[-3000:]
    assert time.perf_counter() - t < 150
    assert not (out / "train_codes" / S.MANIFEST).exists()
