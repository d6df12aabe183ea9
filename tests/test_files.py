"""qinco_jax.files: atomic JSON writes and the bounded JSON reader."""

import os

import numpy as np
import pytest

from qinco_jax.checks import QincoInputError
from qinco_jax.files import MAX_JSON_DEPTH, read_bounded_json, write_json


def test_round_trip_with_numpy_values(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_json(path, {"n": np.int64(3), "x": np.arange(3, dtype=np.float32), "nested": {"ok": [1, {"b": None}]}})
    assert read_bounded_json(path, "test file") == {"n": 3, "x": [0.0, 1.0, 2.0], "nested": {"ok": [1, {"b": None}]}}
    assert os.listdir(tmp_path / "sub") == ["a.json"]  # no temporary file left behind


def test_refusals(tmp_path):
    with pytest.raises(QincoInputError, match="test file: .*missing.json does not exist"):
        read_bounded_json(tmp_path / "missing.json", "test file")
    with pytest.raises(QincoInputError, match="not a regular file"):
        read_bounded_json(tmp_path, "test file")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(QincoInputError, match="not a regular file"):  # refused without blocking on the open
        read_bounded_json(fifo, "test file")
    big = tmp_path / "big.json"
    big.write_text('{"a": "' + "x" * 100 + '"}')
    with pytest.raises(QincoInputError, match="over the 64 of a JSON file"):
        read_bounded_json(big, "test file", max_bytes=64)
    deep = tmp_path / "deep.json"
    deep.write_text('{"a": ' + "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH + "}")
    with pytest.raises(QincoInputError, match=f"nests more than {MAX_JSON_DEPTH} deep"):
        read_bounded_json(deep, "test file")
    deep.write_text("[" * 100_000 + "]" * 100_000)  # deeper than the parser's own recursion allows
    with pytest.raises(QincoInputError, match="nests more than"):
        read_bounded_json(deep, "test file")
    for text, match in (('[1, 2]', "holds a JSON list, expected an object"), ('{"a": ', "cannot read"),
                        (b'{"a": "\xff"}', "cannot read")):
        bad = tmp_path / "bad.json"
        bad.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(QincoInputError, match=match):
            read_bounded_json(bad, "test file")


def test_written_files_follow_the_umask(tmp_path):
    """Atomic writes go through mkstemp / mkdtemp (0600 / 0700); the result has the mode open() would give."""
    import qinco_jax as qj
    from qinco_jax.files import write_json

    from conftest import random_codec

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        qj.save(random_codec(), tmp_path / "codec")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "codec").stat().st_mode & 0o777 == 0o755
        os.umask(0o077)
        write_json(tmp_path / "b.json", {"x": 1})
        assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
