"""The codes store's writer: a database encoded by a codec in resumable parts, one contiguous slice per process.

Each process writes only its own files (its step codes, its list ids and its done marker; see
qinco_jax.search.codes for the layout), so processes on different hosts may share a network file system. Process
0 then waits, within a bounded time without progress, for every process's marker to report its slice done and
writes the manifest; a process that crashed or never started is a TimeoutError naming it and how far it got.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

import qinco_jax as qj
from qinco_jax import checks
from qinco_jax.checks import QincoInputError, short
from qinco_jax.files import read_bounded_json, write_json
from qinco_jax.progress import Progress
from qinco_jax.search.codes import (CODES_FORMAT, MANIFEST, MAX_PROCESSES, PART_FORMAT, SETTINGS, check_part,
                                    check_settings, describe, markers_in, no_link, npy_header, open_part, part_path,
                                    part_shape, process_slice, read_manifest, read_marker, settings_of)

DEFAULT_PART = 65536
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # a link planted in the folder is an error, never written through
WAIT_S = 1800.0  # process 0 gives up on a process whose marker has not moved for this long


def _check_folder(out_dir: str, settings: dict) -> None:
    """Refuse a folder that holds another build: a manifest with other settings, the earlier one-file format,
    or markers of a build with another process count."""
    mpath = os.path.join(out_dir, MANIFEST)
    if os.path.lexists(mpath):
        old = read_manifest(out_dir)
        diff = [k for k in SETTINGS if old[k] != settings[k]]
        if diff:
            what = "; ".join(f"{k}: {short(old[k], 14)} there, {short(settings[k], 14)} now" for k in diff)
            other = "made with another codec" if "fingerprint" in diff else "with other settings"
            raise QincoInputError(f"{out_dir} holds a codes build {other} ({what}); use another folder or delete it")
    elif os.path.lexists(os.path.join(out_dir, "codes.npy")):
        check_settings({"format": "qinco_jax.codes/1"}, out_dir, CODES_FORMAT)  # the earlier format's error
    others = sorted(R for R in markers_in(out_dir) if R != settings["process_count"])
    if others:
        raise QincoInputError(f"{out_dir} holds parts of a codes build with process_count {others[0]} "
                              f"(this build has {settings['process_count']}); use another folder or delete it")


def _open_part(path: str, dtype: np.dtype, shape: tuple, fresh: bool) -> tuple[int, int]:
    """(fd, header length) of a part file for writing: made anew (header, then the full size) when fresh, else
    checked to be the one this build made."""
    if fresh:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | NOFOLLOW, 0o644)
        header = npy_header(dtype, shape)
        os.pwrite(fd, header, 0)
        os.ftruncate(fd, len(header) + int(np.prod(shape)) * dtype.itemsize)
        return fd, len(header)
    if not os.path.lexists(path):
        raise QincoInputError(f"{path} is missing, but this process's done marker says part of it is written; "
                              "delete the folder and rebuild")
    fd = os.open(path, os.O_RDWR | NOFOLLOW)
    with os.fdopen(os.dup(fd), "rb") as f:
        try:
            return fd, check_part(f, path, dtype, shape)
        except BaseException:
            os.close(fd)
            raise


def encode_database(codec, x, out_dir, *, part_size: int = DEFAULT_PART, process_index: int | None = None,
                    process_count: int | None = None, batch_size: int | None = None, progress: bool = False,
                    finish: bool = True, wait_s: float = WAIT_S, poll_s: float = 1.0) -> str:
    """Encode x with the codec into the codes folder out_dir, in parts; resumable.

    Process `process_index` of `process_count` (default: jax's) encodes the contiguous rows
    process_slice(n, r, R) into its own files, part by part: after each part the codes are written and synced
    and `part.r{r}of{R}.json` records the rows finished, so a killed build that is called again with the same
    arguments continues from the last finished part. With finish (the default), process 0 then waits for every
    process (finish_codes) and writes `manifest.json`. Calling again with another codec, database size, part
    size or process count on the same folder is an error. Read the result with `open_codes`.

    Returns the folder's absolute path.
    """
    x = checks.vectors(x, codec.config.d, "database vectors")
    part_size = checks.batch_size(part_size, "part_size")
    R = jax.process_count() if process_count is None else int(process_count)
    r = jax.process_index() if process_index is None else int(process_index)
    n = x.shape[0]
    if not 1 <= R <= min(n, MAX_PROCESSES) or not 0 <= r < R:
        raise QincoInputError(f"process_index must be in [0, process_count) and process_count in [1, "
                              f"{min(n, MAX_PROCESSES):,}] (at most one process per vector), got {r} of {R}")
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    settings = settings_of(codec, n, part_size, R)
    _check_folder(out_dir, settings)
    lo, hi = process_slice(n, r, R)
    mark = read_marker(out_dir, r, settings)
    done = lo if mark is None else mark["rows_done"]
    marker = {"format": PART_FORMAT, **settings, "process_index": r, "lo": lo, "hi": hi}
    fds = {}
    try:
        for what in ("steps.npy", "lists.npy") if settings["nlist"] else ("steps.npy",):
            dtype, shape = part_shape(settings, r, what)
            fds[what] = (*_open_part(part_path(out_dir, r, R, what), dtype, shape, done == lo), dtype)
        if mark is None:
            write_json(part_path(out_dir, r, R, "json"), {**marker, "rows_done": lo})  # started
        with Progress(hi - lo, desc=f"encode p{r}", enabled=progress, initial=done - lo) as bar:  # rate: new rows
            for start in range(done, hi, part_size):
                stop = min(hi, start + part_size)
                codes = qj.encode(codec, x[start:stop], batch_size=batch_size)
                cols = {"steps.npy": codes[:, 1:] if settings["nlist"] else codes, "lists.npy": codes[:, 0]}
                for what, (fd, head, dtype) in fds.items():
                    a = np.ascontiguousarray(cols[what], dtype)
                    os.pwrite(fd, a.tobytes(), head + (start - lo) * a[:1].nbytes)
                    os.fsync(fd)
                write_json(part_path(out_dir, r, R, "json"), {**marker, "rows_done": stop})
                bar.update(stop - start)
    finally:
        for fd, _, _ in fds.values():
            os.close(fd)
    if finish and r == 0:
        finish_codes(out_dir, process_count=R, wait_s=wait_s, poll_s=poll_s)
    return out_dir


def finish_codes(out_dir, *, process_count: int | None = None, wait_s: float = WAIT_S, poll_s: float = 1.0) -> str:
    """Wait for every process of the build in out_dir to finish its slice, check every part and write the
    manifest (what process 0 does at the end of encode_database).

    A process whose done marker has not moved for wait_s seconds (crashed, hung, or never started) is a
    TimeoutError naming the processes not done and how far each got; rerunning the build resumes it.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    found = markers_in(out_dir)
    R = process_count if process_count is not None else (min(found) if len(found) == 1 else None)
    if R is None or R not in found or 0 not in found[R]:
        raise QincoInputError(f"{out_dir}: no codes build of {process_count or 'any number of'} processes to "
                              "finish (process 0 has not started it); run encode_database first")
    path = part_path(out_dir, 0, R, "json")
    settings = check_settings(read_bounded_json(no_link(path, "codes done marker"), "codes done marker"), path,
                              PART_FORMAT)
    poll_s = max(0.01, min(poll_s, wait_s / 10))
    seen: dict[int, tuple] = {}
    while True:
        now = time.monotonic()
        procs = [read_marker(out_dir, q, settings) for q in range(R)]
        late = []
        for q, p in enumerate(procs):
            got = None if p is None else p["rows_done"]
            if q not in seen or seen[q][0] != got:
                seen[q] = (got, now)
            if p is None or got < p["hi"]:
                late.append(q)
        if not late:
            break
        stalled = [q for q in late if now - seen[q][1] > wait_s]
        if stalled:
            raise TimeoutError(
                f"codes build in {out_dir}: {len(stalled)} process(es) made no progress for {wait_s:g} s "
                f"(crashed, hung or never started): {describe(procs, stalled[:8])}"
                + (f"; {len(late)} of {R} processes not done" if len(late) > len(stalled) else "")
                + "; run the build again on every process, with the same arguments, to resume it")
        time.sleep(poll_s)
    for q in range(R):  # every part whole before the manifest says so
        for what in ("steps.npy", "lists.npy") if settings["nlist"] else ("steps.npy",):
            p = part_path(out_dir, q, R, what)
            with open_part(p) as f:
                check_part(f, p, *part_shape(settings, q, what))
    write_json(os.path.join(out_dir, MANIFEST), {"format": CODES_FORMAT, **settings})
    return out_dir
