"""Evaluate a QINCo codec: MSE, exact-search recalls, encode/decode time, faiss baselines, rate-distortion.

    python eval/main.py --model runs/demo --dataset synthetic --baselines      # after `python train/main.py`
    python eval/main.py --model runs/bigann --dataset bigann1M --data-dir data --baselines --nt-baselines 100000
    python eval/main.py --model bigann_8x8_L2.pt --dataset bigann1M --nb 100000   # official checkpoint
    python eval/main.py --model runs/mine --db base.fvecs --queries queries.fvecs --gt gt.ivecs \\
        --train learn.fvecs --nt 500000 --baselines PQ,OPQ,RQ,RQ-beam5 --out mine.json --plot mine.png

The database is encoded chunk by chunk (a memmap is streamed), then decoded, measured and searched
one chunk at a time: at most one chunk of decoded vectors is held (--keep-decoded writes them all to a
.npy file). Queries are searched exactly (L2) in the decoded database; without ground truth it is
computed exactly on the raw database. Only --baselines needs the training vectors. MSE is the per-vector squared L2 error in raw units, averaged over the database.
Timings are wall-clock per database vector, after one warm-up chunk (JIT compilation excluded).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

if __package__ in (None, ""):  # `python eval/main.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qinco_jax as qj  # noqa: E402
from eval import baselines, metrics, report  # noqa: E402
from qinco_jax import checks, data, runtime  # noqa: E402
from qinco_jax.checks import QincoInputError  # noqa: E402
from qinco_jax.progress import Progress  # noqa: E402

KS = (1, 10, 100)
COLUMNS = ("method", "bytes", "mse", "r1", "r10", "r100", "encode_us", "decode_us")
DECODE_CHUNK = 16384


def parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="training workdir, saved codec directory or official .pt file")
    g = ap.add_argument_group("data")
    g.add_argument("--dataset", help="synthetic (default), bigann1M, deep1M, fb_ssnpp, contriever1M, sift1M")
    g.add_argument("--data-dir", help="dataset root (else $QINCO_DATA_DIR, else ./data)")
    g.add_argument("--db", help="your database vectors (.fvecs .bvecs .fbin .u8bin .npy ...)")
    g.add_argument("--queries", help="query vectors (with --db)")
    g.add_argument("--gt", help="ground-truth ids (with --db; default: exact search in the raw database)")
    g.add_argument("--train", help="training vectors of the baselines (with --db)")
    g.add_argument("--nt", type=int, help="use the first nt training vectors (as given to train/main.py)")
    g.add_argument("--nb", type=int, help="use the first nb database vectors (synthetic: generate nb)")
    g = ap.add_argument_group("baselines")
    g.add_argument("--baselines", nargs="?", const=",".join(baselines.BASELINES), metavar="LIST",
                   help=f"also faiss baselines at the same code size: all of {','.join(baselines.BASELINES)} "
                        "or a comma-separated subset")
    g.add_argument("--nt-baselines", type=int, default=100_000,
                   help="train the baselines on at most this many training vectors (default 100000)")
    g.add_argument("--rd-lsq", action="store_true", help="include LSQ in the rate-distortion curves (slow)")
    g = ap.add_argument_group("output")
    g.add_argument("--name", help="label of the data in the report (default: --dataset, else the --db file's name)")
    g.add_argument("--out", help="results JSON (default: beside the model, else ./eval_results.json)")
    g.add_argument("--plot", help="rate-distortion PNG (default: the JSON path with .png)")
    g.add_argument("--keep-decoded", metavar="FILE.npy",
                   help="also write the decoded database (float32) to this .npy file (default: not kept)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return ap


def log(msg: str) -> None:
    """Progress messages go to stderr; stdout holds the results."""
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- inputs


def load_data(args) -> data.Dataset:
    """Database, queries, ground truth (if any) and training vectors named by the flags."""
    if args.db is None:
        for flag in ("queries", "gt", "train"):
            if getattr(args, flag):
                raise QincoInputError(f"--{flag} needs --db (or use --dataset alone)")
        name = args.dataset or "synthetic"
        if name == "synthetic":  # the same draw as train/main.py's default data
            return data.synthetic(seed=0, **{k: v for k, v in (("nt", args.nt), ("nb", args.nb)) if v is not None})
        return data.load_dataset(name, args.data_dir, nt=args.nt, nval=0, nb=args.nb, train=bool(args.baselines))
    if args.dataset:
        raise QincoInputError("give either --dataset or --db/--queries, not both")
    if args.queries is None:
        raise QincoInputError("--db needs --queries (the search queries)")
    if args.baselines and args.train is None:
        raise QincoInputError("--baselines with --db needs --train (the vectors to train the baselines on)")
    nt = args.nt if args.train else None
    return data.load_files(args.train or args.db, args.db, args.queries, args.gt, nt=nt, nval=0, nb=args.nb)


def check_inputs(codec: qj.Codec, ds: data.Dataset) -> np.ndarray | None:
    """Dimension, finiteness and ground-truth checks before any long computation; returns the checked gt."""
    if ds.xb is None or ds.xq is None:
        raise QincoInputError(f"{ds.name}: a database and queries are needed for the evaluation")
    d = shape(codec)[0]
    for what, x in (("database", ds.xb), ("queries", ds.xq)):
        if x.shape[1] != d:
            raise QincoInputError(f"the model encodes d={d} vectors but the {what} has dimension d={x.shape[1]}")
    checks.finite(ds.xq, "query vectors")
    checks.finite(ds.xb, "database vectors")
    if ds.gt is None:
        return None
    return metrics.check_groundtruth(ds.gt, ds.xb.shape[0], ds.xq.shape[0])


def baseline_names(spec: str | None) -> list[str]:
    """The baselines asked for by --baselines (a comma-separated list)."""
    names = [s.strip() for s in (spec or "").split(",") if s.strip()]
    unknown = [n for n in names if n not in baselines.BASELINES]
    if unknown:
        raise QincoInputError(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(baselines.BASELINES)}")
    return names


def baseline_train_set(xt: np.ndarray, n: int) -> np.ndarray:
    """At most n training vectors as float32 (a fixed random subset, read in file order)."""
    if n < 1:
        raise QincoInputError(f"--nt-baselines must be >= 1, got {n}")
    xt = data.sample_rows(xt, n)
    checks.finite(xt, "training vectors")
    return xt


def default_out(model: str, name: str) -> Path:
    """eval_<name>.json in a model directory or beside a model file; ./eval_results.json if not writable."""
    p = Path(model).absolute()
    out = p / f"eval_{name}.json" if p.is_dir() else p.with_name(f"{p.stem}_eval_{name}.json")
    return out if os.access(out.parent, os.W_OK) else Path("eval_results.json")


# ----------------------------------------------------------------------------- QINCo


def decoded_chunks(codec: qj.Codec, codes: np.ndarray, chunk: int = DECODE_CHUNK, timer: list | None = None):
    """(start, float32 reconstructions) of codes chunk by chunk; decoding seconds are added to timer[0]."""
    for i in range(0, codes.shape[0], chunk):
        t0 = time.perf_counter()
        xhat = qj.decode(codec, codes[i:i + chunk])
        if timer is not None:
            timer[0] += time.perf_counter() - t0
        yield i, xhat


def encode_db(codec: qj.Codec, xb, progress: bool) -> tuple[np.ndarray, float]:
    """Codes of the database (streamed in chunks) and the seconds it took, after a warm-up chunk."""
    qj.encode(codec, xb[: min(xb.shape[0], runtime.default_chunk())])
    t0 = time.perf_counter()
    codes, _ = qj.encode_with_error(codec, xb, progress=progress)
    return codes, time.perf_counter() - t0


def kept(chunks, path: str | None, n: int, d: int):
    """Pass (start, xhat) chunks through, also writing them to a float32 (n, d) .npy file when path is given."""
    if path is None:
        yield from chunks
        return
    Path(path).absolute().parent.mkdir(parents=True, exist_ok=True)
    out = np.lib.format.open_memmap(path, "w+", np.float32, (n, d))
    for start, xhat in chunks:
        out[start:start + xhat.shape[0]] = xhat
        yield start, xhat
    out.flush()
    del out


def progressed(chunks, n: int, enabled: bool, desc: str):
    """Pass (start, x) chunks through, advancing a progress bar."""
    with Progress(n, desc=desc, enabled=enabled) as bar:
        for start, x in chunks:
            yield start, x
            bar.update(x.shape[0])


def shape(codec) -> tuple[int, int, int]:
    """(d, code columns M, K of every code) of a Codec or a PQCodec (whose sub-codecs share one K)."""
    if isinstance(codec, qj.PQCodec):
        Ks = {c.config.K for c in codec.codecs}
        if len(Ks) > 1:
            raise QincoInputError(f"the PQ sub-codecs have different K {sorted(Ks)}: one code size is needed")
        return codec.d, codec.M, Ks.pop()
    return codec.config.d, codec.config.M, codec.config.K


def qinco_rd(codec: qj.Codec, codes: np.ndarray, xb, full_mse: float) -> list[float]:
    """MSE of the m-step reconstructions, m = 1..M (PQ: only m = M): the first m code columns, after the
    list id for IVF-QINCo (the list id is not counted in the code size)."""
    M = shape(codec)[1]
    if isinstance(codec, qj.PQCodec):  # its code columns are not successive refinements
        return [None] * (M - 1) + [full_mse]
    ivf = 1 if codec.config.nlist else 0
    return [metrics.stream_evaluate(xb, decoded_chunks(codec, codes[:, : ivf + m]))[0] for m in range(1, M)] + [full_mse]


def evaluate_qinco(codec: qj.Codec, ds: data.Dataset, gt, args) -> tuple[dict, list[float]]:
    """The QINCo table row and its rate-distortion MSEs (m = 1..M): the database is decoded and
    searched one chunk at a time."""
    n, d = ds.xb.shape
    log(f"encoding {n:,} database vectors")
    codes, enc_s = encode_db(codec, ds.xb, args.progress)
    next(decoded_chunks(codec, codes[: runtime.default_chunk()]))  # warm-up: compilation is not timed
    timer = [0.0]
    chunks = progressed(decoded_chunks(codec, codes, timer=timer), n, args.progress, "decode and search")
    ks = [k for k in KS if k <= n]
    err, I = metrics.stream_evaluate(ds.xb, kept(chunks, args.keep_decoded, n, d), ds.xq, max(ks))
    dec_s = timer[0]
    name = method_name(codec)
    row = {"method": name, "bytes": code_bytes(*shape(codec)[1:]), "mse": err}
    got = metrics.recalls(I, gt, ks)
    row.update({f"r{k}": got.get(k) for k in KS})
    row.update(encode_us=enc_s / n * 1e6, decode_us=dec_s / n * 1e6, encode_s=enc_s, decode_s=dec_s)
    log(f"{name}: MSE {err:.6g}, encode {enc_s:.3g}s, decode {dec_s:.3g}s; rate-distortion (m = 1..M steps)")
    return row, qinco_rd(codec, codes, ds.xb, err)


def method_name(codec) -> str:
    """The codec's row label: PQ-QINCo, QINCo2 or QINCo."""
    if isinstance(codec, qj.PQCodec):
        return "PQ-QINCo"
    return "QINCo2" if codec.config.variant == "qinco2" else "QINCo"


def code_bytes(M: int, K: int) -> float | int:
    """Bytes per vector of M codes of log2(K) bits (an int when whole)."""
    b = M * math.log2(K) / 8
    return int(b) if b == int(b) else b


# ----------------------------------------------------------------------------- baselines


def baseline_rows(names, xt, ds: data.Dataset, gt, M: int, nbits: int) -> list[dict]:
    """Table rows of the faiss baselines at M codes of nbits bits (n/a rows where unavailable)."""
    rows = []
    for name in names:
        log(f"{name}: training on {xt.shape[0]:,} vectors, encoding the database")
        t0 = time.perf_counter()
        try:
            b = baselines.train_baseline(name, xt, M, nbits)
        except baselines.BaselineUnavailable as e:
            log(f"{name}: n/a ({e})")
            rows.append({"method": name, "bytes": code_bytes(M, 1 << nbits), "note": str(e)})
            continue
        train_s = time.perf_counter() - t0
        row = baselines.evaluate_baseline(b, ds.xb, ds.xq, gt, [k for k in KS if k <= ds.xb.shape[0]])
        row.update(bytes=code_bytes(M, 1 << nbits), train_s=train_s)
        for k in KS:
            row.setdefault(f"r{k}", None)
        log(f"{name}: MSE {row['mse']:.6g}, trained in {train_s:.1f}s")
        rows.append(row)
    return rows


def faiss_nbits(K: int) -> int:
    """Bits per code of the faiss baselines; K must be a power of two."""
    nbits = int(round(math.log2(K)))
    if 1 << nbits != K:
        raise QincoInputError(f"faiss baselines need K to be a power of two, the model has K={K}")
    return nbits


def rd_curves(codec: qj.Codec, qinco_mses: list[float], rows: list[dict], xt, xb, rd_lsq: bool) -> dict:
    """{method: {'bytes': [...], 'mse': [...]}} at m = 1..M codes of log2(K) bits; m = M is the table's MSE."""
    _, M, K = shape(codec)
    nbytes = [m * math.log2(K) / 8 for m in range(1, M + 1)]
    names = [r["method"] for r in rows if r["method"] != "LSQ" or rd_lsq]
    if names:
        log(f"rate-distortion of {', '.join(names)}: 1..{M - 1} codes")
    known = {r["method"]: r.get("mse") for r in rows}
    mses = baselines.baseline_mse_by_bytes(names, xt, xb, M, faiss_nbits(K), known=known) if names else {}
    name = method_name(codec)
    return {name: {"bytes": nbytes, "mse": qinco_mses}, **{n: {"bytes": nbytes, "mse": m} for n, m in mses.items()}}


# ----------------------------------------------------------------------------- driver


def describe(args, codec: qj.Codec, ds: data.Dataset, gt_source: str) -> dict:
    """What was evaluated: model, architecture and data sizes."""
    name = args.name or args.dataset or (Path(args.db).stem if args.db else "synthetic")
    return {
        "model": os.path.abspath(args.model), "codec": repr(codec), **codec_fields(codec),
        "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
        "data": {"name": name, "d": int(ds.xb.shape[1]), "nb": int(ds.xb.shape[0]), "nq": int(ds.xq.shape[0]),
                 "groundtruth": gt_source},
    }


def codec_fields(codec) -> dict:
    """The JSON description of the codec: config and scale, or the PQ sub-codecs' and the rotation's shape."""
    if isinstance(codec, qj.PQCodec):
        return {"pq": [{"config": c.config.to_dict(), "scale": c.scale} for c in codec.codecs],
                "rotation": None if codec.rotation is None else list(codec.rotation.shape)}
    return {"config": codec.config.to_dict(), "scale": codec.scale}


def report_results(res: dict, args) -> None:
    """Print the table; write the JSON and the rate-distortion plot."""
    out = Path(args.out) if args.out else default_out(args.model, res["data"]["name"])
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    dat = res["data"]
    print(f"\n{dat['name']}: {dat['nb']:,} database vectors, {dat['nq']:,} queries (d={dat['d']}, ground truth: "
          f"{dat['groundtruth']}); {res['codec']}")
    print(report.format_table(res["table"], COLUMNS))
    curves = {k: (v["bytes"], v["mse"]) for k, v in res["rate_distortion"].items()}
    try:
        plot.parent.mkdir(parents=True, exist_ok=True)
        report.plot_rate_distortion(curves, plot, title=f"{dat['name']}: MSE vs bytes per vector")
        res["plot"] = str(plot.absolute())
    except RuntimeError as e:
        log(f"no plot: {e}")
    report.write_json(out, res)
    print(f"results: {out}" + (f"\nrate-distortion plot: {plot}" if "plot" in res else ""))


def run(args) -> dict:
    """Evaluate the codec (and the baselines) as the flags say; prints, writes and returns the results."""
    names = baseline_names(args.baselines)
    codec = qj.load(args.model)
    _, M, K = shape(codec)
    nbits = faiss_nbits(K) if names else None
    ds = load_data(args)
    gt = check_inputs(codec, ds)
    if gt is None:
        log(f"no ground truth: exact search of {ds.xq.shape[0]:,} queries in the raw database")
        gt = metrics.exact_groundtruth(ds.xq, ds.xb, max(KS))
    res = describe(args, codec, ds, "from the dataset" if ds.gt is not None else "exact search on the raw database")
    row, rd = evaluate_qinco(codec, ds, gt, args)
    xt = baseline_train_set(ds.xt, args.nt_baselines) if names else None
    rows = baseline_rows(names, xt, ds, gt, M, nbits) if names else []
    res.update(table=[row] + rows, nt_baselines=None if xt is None else int(xt.shape[0]))
    res["rate_distortion"] = rd_curves(codec, rd, rows, xt, ds.xb, args.rd_lsq)
    report_results(res, args)
    return res


def main(argv=None) -> None:
    """Command-line entry point: errors in the inputs exit with 'error: ...' and status 1."""
    args = parser().parse_args(argv)
    try:
        run(args)
    except (QincoInputError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
