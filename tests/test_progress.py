"""Progress bars draw on terminals only, and the codec's repr is one short line."""

import io

import qinco_jax as qj
from qinco_jax.progress import Progress

from conftest import random_codec


class _Tty(io.StringIO):
    def isatty(self):
        return True


def _draw(enabled, stream, monkeypatch, stdout_tty=True):
    monkeypatch.setattr("sys.stdout", _Tty() if stdout_tty else io.StringIO())
    with Progress(10, desc="work", enabled=enabled, stream=stream, min_interval=0) as bar:
        for _ in range(10):
            bar.update(1, loss=0.5)
    return stream.getvalue()


def test_bar_only_on_a_terminal(monkeypatch):
    assert "work [" in _draw(True, _Tty(), monkeypatch)
    assert "\r" not in _draw(True, io.StringIO(), monkeypatch)  # the bar's stream is a file or a pipe
    assert "\r" not in _draw(True, _Tty(), monkeypatch, stdout_tty=False)  # stdout is redirected
    assert _draw(False, _Tty(), monkeypatch) == ""
    assert "10/10" in _draw("always", io.StringIO(), monkeypatch, stdout_tty=False)


def test_plain_lines_when_redirected_at_a_bounded_rate(monkeypatch):
    monkeypatch.setattr("sys.stdout", io.StringIO())
    out = io.StringIO()
    with Progress(1000, desc="quick", stream=out) as bar:
        for _ in range(1000):
            bar.update(1)
    assert out.getvalue() == ""  # a loop done within 10 s prints nothing
    with Progress(1000, desc="encode", stream=out) as bar:
        bar.t0 -= 60.0  # a long loop
        for _ in range(1000):
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert 9 <= len(lines) <= 11 and lines[0].startswith("encode: 10% (100/1,000)")  # one per 10%, and the end
    assert lines[-1].startswith("encode: 100% (1,000/1,000)") and "\r" not in out.getvalue()


def test_resumed_rate_counts_only_new_work(monkeypatch):
    monkeypatch.setattr("sys.stdout", io.StringIO())
    out = io.StringIO()
    bar = Progress(1000, desc="encode", stream=out, initial=500)
    bar.t0 -= 10.0  # about 10 s for the 500 new units
    bar.update(250)
    bar.update(250)
    bar.__exit__(None, None, None)
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("encode: 100% (1,000/1,000) 50/s") or last.startswith("encode: 100% (1,000/1,000) 49/s")


def test_codec_repr_is_short():
    r = repr(random_codec(qj.QincoConfig(d=16, K=16, M=3, L=2, h=24), scale=2.5))
    assert r == f"Codec(d=16, K=16, M=3, L=2, h=24, scale=2.5, {qj.QincoConfig(d=16, K=16, M=3, L=2, h=24).num_params():,} parameters)"
    assert "\n" not in r and len(r) < 100


def test_repr_names_a_qinco2_codec():
    cfg = qj.QincoConfig(d=16, K=16, M=3, L=1, h=24, variant="qinco2", de=32, A=4, B=8)
    r = repr(random_codec(cfg, scale=2.5))
    assert r.startswith("Codec(d=16, K=16, M=3, L=1, h=24, qinco2 de=32 A=4 B=8, scale=2.5, ") and len(r) < 120
