"""Build a search index over QINCo codes and sweep its operating points against faiss baselines.

    python eval/search.py build --model runs/ivf --db base.u8bin --train learn.u8bin --nt 100000 --out idx
    python eval/search.py search --index idx --queries query.u8bin --gt gt.bin \\
        --nprobe 1,4,16,64 --nshort 10,100,1000 --baselines --ceiling --out idx/search.json

build: encodes the training vectors (the first --nt) and the database with the codec into memory-mapped code
files in resumable parts (a killed build, run again with the same arguments, continues from the last finished
part; under --distributed every process encodes its slice), fits additive tables to the training codes by least
squares, and writes a faiss index holding the database's QINCo codes (IVF codecs: IndexIVFResidualQuantizer
over the codec's IVF centroids; plain codecs: IndexResidualQuantizer, a flat additive scan). --pairwise N also
fits a pairwise additive decoder of N tables. The folder carries a copy of the codec (codec/) and records the
sha256 of index.faiss and paths relative to itself; search checks all of it (README, "Security and failure
model") and reads files outside the folder only when given as flags (--model, --db, --train).

search: for every nprobe x nshort x pairwise factor, the additive shortlist of nshort (x factor) candidates, the
pairwise stage (factor > 1), the QINCo decode of the nshort survivors and the exact L2 re-rank; it reports QPS,
R@1/10/100 before and after the re-rank and the time of each stage. --baselines adds faiss IVF-PQ, IVF-RQ and
IVF-PQfs of the same bytes per vector and the same IVF lists; --ceiling adds exact search over the fully decoded
QINCo database. Results go to a JSON file and a plot of QPS against R@1 and R@10 (Pareto fronts).
Timings are wall-clock over the whole query set, after a warm-up (JIT compilation excluded).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # `python eval/search.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qinco_jax as qj  # noqa: E402
from eval import baselines, metrics, report, search_timing  # noqa: E402
from qinco_jax import checks, data  # noqa: E402
from qinco_jax import search as S  # noqa: E402
from qinco_jax.search import scan as SC  # noqa: E402
from qinco_jax.search.faiss_file import sha256_file  # noqa: E402
from qinco_jax.checks import QincoInputError  # noqa: E402

KS = (1, 10, 100)
MODEL_COPY = "codec"  # the codec, saved inside the index folder
COLUMNS = ("method", "nprobe", "nshort", "pf", "qps", "r1", "r10", "r100", "r1_short", "r10_short",
           "t_coarse_ms", "t_short_ms", "t_pair_ms", "t_decode_ms", "t_rerank_ms")
COMPACT = ("method", "nprobe", "nshort", "pf", "qps", "r1", "r10", "r100")  # printed; every column goes to the JSON


STAGE: dict = {"what": "starting", "codes": None}  # where a build is, for the message on Ctrl-C


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def int_list(s: str) -> list[int]:
    try:
        out = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="encode the database and build the index",
                       description="Encode the training vectors and the database, fit the additive tables and write "
                       "the index folder (a rerun with the same arguments resumes an interrupted build).")
    b.add_argument("--model", required=True, help="saved codec directory, training workdir or .pt file (required)")
    b.add_argument("--db", required=True, help="database vectors (.fvecs .bvecs .fbin .u8bin .npy ...; memory-mapped) (required)")
    b.add_argument("--train", required=True, help="training vectors for the additive tables (required)")
    b.add_argument("--nt", type=int, default=100_000, help="use the first nt training vectors (default: 100000)")
    b.add_argument("--out", required=True, help="index folder (created; a rerun resumes the encoding) (required)")
    b.add_argument("--norm", default="qint8", choices=S.NORMS, help="stored norm encoding (default: qint8, 1 byte)")
    b.add_argument("--hnsw", type=int, default=0, help="HNSW coarse quantizer with this many links (default: 0, a "
                   "flat coarse quantizer)")
    b.add_argument("--term", default="float32", choices=SC.TERMS,
                   help="the scan's per-vector term ||x^||^2 - ||c||^2: float32 or one byte per vector (per-list "
                        "uniform grid) (default: float32)")
    b.add_argument("--pairwise", type=int, default=0,
                   help="fit a pairwise additive decoder of at most this many tables, refining the additive tables "
                   "(default: 0, none)")
    b.add_argument("--pairwise-sub", type=int, default=2, help="IVF sub-codes in the pairwise code pool (default: 2)")
    b.add_argument("--part-size", type=int, default=S.DEFAULT_PART,
                   help=f"vectors per resumable part (default: {S.DEFAULT_PART})")
    b.add_argument("--batch-size", type=int, help="vectors per jitted encode call (default: the codec's)")
    b.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() to learn each "
                   "process's rank; each process encodes its slice into its own files, process 0 waits for all of "
                   "them and builds the index (default: off)")
    b.add_argument("--coordinator-address", help="with --distributed: host:port of process 0 (default: "
                   "auto-detected on SLURM / TPU pods)")
    b.add_argument("--num-processes", type=int, help="with --distributed: number of processes (default: auto-detected)")
    b.add_argument("--process-id", type=int, help="with --distributed: this process's index (default: auto-detected)")
    b.add_argument("--wait-s", type=float, default=S.WAIT_S, help="process 0 fails when another process's encoding "
                   f"makes no progress for this many seconds; also jax's start-up timeout (default: {S.WAIT_S:g})")
    b.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars or lines (default: a bar on a terminal, a line every 10%% or 30 s otherwise)")
    s = sub.add_parser("search", help="sweep nprobe x nshort and report QPS and recalls",
                       description="Sweep nprobe x nshort (x pairwise factor) over an index folder and report QPS "
                       "and recalls; results go to a JSON file and a plot.")
    s.add_argument("--index", required=True, help="index folder from `build` (required)")
    s.add_argument("--model", help="the codec (default: the copy the build saved in the index folder)")
    s.add_argument("--queries", required=True, help="query vectors (.fvecs .bvecs .fbin .u8bin .npy ...) (required)")
    s.add_argument("--gt", help="ground-truth neighbour ids of the queries (.ivecs .ibin .npy; default: exact "
                   "search in the raw database given by --db)")
    s.add_argument("--nprobe", type=int_list, default=[1, 4, 16, 64],
                   help="inverted lists visited, comma-separated (IVF only; default: 1,4,16,64)")
    s.add_argument("--nshort", type=int_list, default=[10, 100, 1000],
                   help="shortlist sizes that QINCo re-ranks, comma-separated (default: 10,100,1000)")
    s.add_argument("--pairwise-factor", type=int_list, default=[1],
                   help="with a pairwise decoder: the additive stage keeps factor x nshort, comma-separated "
                   "(default: 1, no pairwise stage)")
    s.add_argument("--ef-search", type=int, help="efSearch of an HNSW coarse quantizer (default: faiss's, 16)")
    s.add_argument("--scan", type=lambda v: [x for x in v.split(",") if x], default=["jax"],
                   help="shortlist scanner(s), comma-separated: jax (one look-up table per query, jitted) and/or "
                        "faiss (faiss's IVF additive scanner, a table per probed list) (default: jax)")
    s.add_argument("--hnsw-coarse", type=int, default=0, metavar="LINKS",
                   help="also search IVF-QINCo with an HNSW coarse quantizer of this many links over the centroids "
                        "(default: 0, off)")
    s.add_argument("--reps", type=int, default=3, help="timed runs of every setting, interleaved (default: 3)")
    s.add_argument("--baselines", nargs="?", const=",".join(baselines.SEARCH_BASELINES), metavar="LIST",
                   help=f"faiss baselines of the same size: {','.join(baselines.SEARCH_BASELINES)} or a subset "
                   "(default: none; the flag alone: all)")
    s.add_argument("--nt-baselines", type=int, default=100_000,
                   help="training vectors of the baselines (default: 100000)")
    s.add_argument("--ceiling", action="store_true",
                   help="also exact search over the fully decoded QINCo database (default: off)")
    s.add_argument("--db", help="raw database, for the baselines and when there is no --gt (default: none; "
                   "the build's path is only followed when it lies inside the index folder)")
    s.add_argument("--train", help="training vectors of the baselines (default: as for --db)")
    s.add_argument("--threads", type=int, help="faiss OpenMP threads (default: the machine's cores; recorded)")
    s.add_argument("--out", help="results JSON (default: INDEX/search.json)")
    s.add_argument("--name", help="dataset name for the plot's title (default: the queries file's name)")
    s.add_argument("--plot", help="QPS-recall PNG (default: the JSON path with .png)")
    return ap


# ----------------------------------------------------------------------------- build


def _vectors(path: str, d: int, what: str, n: int | None = None) -> np.ndarray:
    x = data.read_vectors(path)
    if x.shape[1] != d:
        raise QincoInputError(f"the model encodes d={d} vectors but the {what} ({path}) has dimension {x.shape[1]}")
    if n is not None:
        if n < 1:
            raise QincoInputError(f"--nt must be >= 1, got {n}")
        x = x[:n]
    return x


def process_rank(args) -> tuple[int, int]:
    """(process index, process count) of this build: (0, 1), or under --distributed those that
    jax.distributed.initialize() gives. The coordination service is shut down again at once: the processes
    share nothing but their files (a crashed process cannot hang the others in jax's barriers)."""
    import jax
    from jax._src import distributed

    if not args.distributed:
        return 0, 1
    kw = {k: v for k, v in (("coordinator_address", args.coordinator_address),
                            ("num_processes", args.num_processes), ("process_id", args.process_id)) if v is not None}
    jax.distributed.initialize(**kw, initialization_timeout=max(1, int(args.wait_s)))
    # read before any backend starts, so that encoding then runs on this process's own devices only
    r, R = distributed.global_state.process_id, distributed.global_state.num_processes
    jax.distributed.shutdown()
    return int(r), int(R)


def build(args) -> dict:
    r, R = process_rank(args)
    codec = qj.load(args.model)
    cfg = codec.config
    xb = _vectors(args.db, cfg.d, "database")
    xt = _vectors(args.train, cfg.d, "training vectors", args.nt)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    centroids = S.ivf_centroids(codec)
    times = {}
    t0 = time.perf_counter()
    fp = S.fingerprint(codec)
    for what, x, sub in (("training", xt, "train_codes"), ("database", xb, S.DB_CODES)):
        STAGE.update(what=f"encoding the {what} vectors", codes=out / sub)
        st = S.codes_status(out / sub) if (out / sub).is_dir() else None
        if st and st["settings"] and st["settings"]["fingerprint"] != fp:
            raise QincoInputError(f"{out} holds {what} codes of another model (codec fingerprint "
                                  f"{st['settings']['fingerprint'][:12]}, this model's {fp[:12]}): build "
                                  "into another --out folder, or delete this one")
        if st and st["done"]:
            log(f"{what}: {st['done']:,} of {st['n']:,} vectors already encoded, continuing")
        log(f"encoding {x.shape[0]:,} {what} vectors into {out / sub}" + (f" (process {r} of {R})" if R > 1 else ""))
        t = time.perf_counter()
        S.encode_database(codec, x, out / sub, part_size=args.part_size, batch_size=args.batch_size,
                          progress=args.progress, process_index=r, process_count=R, finish=False)
        times[f"encode_{what}_s"] = time.perf_counter() - t
    if r != 0:
        log(f"process {r}: its slices are encoded; process 0 builds the index")
        return {}
    for sub in ("train_codes", S.DB_CODES):
        if R > 1:
            log(f"waiting for the {R - 1} other processes to finish {out / sub}")
            STAGE.update(what="waiting for the other processes' codes", codes=out / sub)
        S.finish_codes(out / sub, process_count=R, wait_s=args.wait_s)
    STAGE.update(what="fitting the tables and writing the index (the encoded codes are kept)", codes=None)
    ct = S.open_codes(out / "train_codes", codec)
    db = S.open_codes(out / S.DB_CODES, codec)
    log(f"least-squares additive tables from {ct.shape[0]:,} training codes")
    t = time.perf_counter()
    tables = S.lstsq_tables(ct, xt, cfg.K, centroids=centroids, progress=args.progress)
    times["lstsq_s"] = time.perf_counter() - t
    steps = np.asarray(ct.steps)
    target = S.targets(xt, None if ct.lists is None else np.asarray(ct.lists), centroids)
    mse_train = float(np.mean(np.sum(np.square(S.additive_decode(tables, steps) - target), axis=1)))
    t = time.perf_counter()
    index = S.new_index(tables, centroids, norm=args.norm, train_norms=S.additive_norms(tables, steps),
                        hnsw=args.hnsw)
    S.add_codes(index, tables, db, progress=args.progress)
    times["index_s"] = time.perf_counter() - t
    pairwise, mse_pairwise = None, None
    if args.pairwise:
        log(f"pairwise decoder: {args.pairwise} tables")
        t = time.perf_counter()
        pairwise = S.train_pairwise(np.asarray(ct), xt, cfg.K, args.pairwise, centroids=centroids, base=tables,
                                    n_sub=args.pairwise_sub, progress=args.progress)
        times["pairwise_s"] = time.perf_counter() - t
        mse_pairwise = float(np.mean(np.sum(np.square(pairwise.decode(np.asarray(ct)) - np.asarray(xt, np.float32)),
                                            axis=1)))
    times["total_s"] = time.perf_counter() - t0
    # held-out errors: the first database vectors (not seen by the tables)
    nh = min(20_000, xb.shape[0])
    cb, xh = np.asarray(db[:nh]), np.asarray(xb[:nh], np.float32)
    held = {"additive": S.additive_decode(tables, cb[:, 1:] if centroids is not None else cb)
            + (centroids[cb[:, 0]] if centroids is not None else 0), "qinco": qj.decode(codec, cb)}
    if pairwise is not None:
        held["pairwise"] = pairwise.decode(cb)
    mse_db = {k: float(np.mean(np.sum(np.square(v - xh), axis=1))) for k, v in held.items()}
    model_copy = out / MODEL_COPY
    if not (model_copy.exists() and S.fingerprint(qj.load(model_copy)) == S.fingerprint(codec)):
        qj.save(codec, model_copy, overwrite=True)  # the folder carries its codec: moving or sharing it keeps search working
    info = {"model": MODEL_COPY, "model_source": S.relative_path(out, args.model), "db": S.relative_path(out, args.db),
            "train": S.relative_path(out, args.train),
            "nt": int(xt.shape[0]), "nb": int(xb.shape[0]), "norm": args.norm, "hnsw": args.hnsw,
            "code_bytes": int(index.code_size), "db_codes_bytes_per_vector": db.bytes_per_vector, "times": times,
            "additive_mse_train": mse_train,
            "pairwise_tables": args.pairwise, "pairwise_mse_train": mse_pairwise,
            "pairwise_tables_kept": 0 if pairwise is None else int(len(pairwise.pairs)),
            "mse_db_first": {"n": nh, **mse_db}}
    SC.save_lists(out / SC.SCAN_LISTS, SC.build_lists(db, tables, centroids, term=args.term))
    info.update(scan_term=args.term, scan_lists_sha256=sha256_file(out / SC.SCAN_LISTS))
    S.save_index(out, codec, index, tables, pairwise=pairwise, info=info)
    log(f"index: {index.ntotal:,} vectors, {index.code_size} bytes per code; additive MSE on the training set "
        f"{mse_train:.6g}" + (f", pairwise {mse_pairwise:.6g}" if pairwise is not None else "")
        + f"; {times['total_s']:.1f}s; MSE on the first {nh:,} database vectors: "
        + ", ".join(f"{k} {v:.6g}" for k, v in mse_db.items()))
    print(f"index: {out}")
    return info


# ----------------------------------------------------------------------------- search


def recall_cols(I: np.ndarray, gt: np.ndarray, n_valid: int, suffix: str = "") -> dict:
    """r1/r10/r100 (None where fewer than k candidates were kept)."""
    ks = [k for k in KS if k <= min(n_valid, I.shape[1])]
    got = metrics.recalls(I, gt, ks) if ks else {}
    return {f"r{k}{suffix}": got.get(k) for k in KS}


def qinco_settings(p: S.Pipeline, xq, gt, args) -> tuple[list, list]:
    """The QINCo settings (flat coarse quantizer and, with --hnsw-coarse, HNSW) and the shortlist-alone rows."""
    import faiss

    S.search(p, xq[:2], k=1, nshort=1, nprobe=1)  # touch the index and the jitted functions
    name = "IVF-QINCo" if p.ivf else "QINCo"
    settings, extra = search_timing.qinco_settings(p, xq, gt, args, recall_cols, name, log)
    if args.hnsw_coarse and p.ivf:
        hnsw = faiss.IndexHNSWFlat(p.codec.config.d, args.hnsw_coarse)
        hnsw.add(S.ivf_centroids(p.codec))
        ph = p.with_coarse(hnsw)
        a = argparse.Namespace(**{**vars(args), "scan": ["jax"]})
        more = search_timing.qinco_settings(ph, xq, gt, a, recall_cols, f"{name} HNSW{args.hnsw_coarse}", log)
        settings, extra = settings + more[0], extra + more[1]
    return settings, extra


def baseline_indexes(names, centroids, M, nbits, xt, xb) -> tuple[dict, list]:
    """{label: trained and filled faiss index} and the rows of the baselines that cannot be built."""
    indexes, notes = {}, []
    for name in names:
        label = baselines.search_baseline_name(name, 0 if centroids is None else centroids.shape[0], M, nbits)
        log(f"{label}: training on {xt.shape[0]:,} vectors, adding {xb.shape[0]:,}")
        try:
            index = baselines.train_search_baseline(name, xt, M, nbits, centroids)
        except baselines.BaselineUnavailable as e:
            log(f"{label}: n/a ({e})")
            notes.append({"method": label, "note": str(e)})
            continue
        baselines.add_in_chunks(index, xb)
        indexes[label] = index
    return indexes, notes


def ceiling_row(codec, db_codes, xq, gt) -> dict:
    """Exact search over the fully decoded QINCo database (the best any re-rank can do)."""
    xhat = np.empty((db_codes.shape[0], codec.config.d), np.float32)
    for i in range(0, db_codes.shape[0], 65536):
        xhat[i:i + 65536] = qj.decode(codec, np.asarray(db_codes[i:i + 65536]))
    t = time.perf_counter()
    _, I = metrics.knn_search(xq, xhat, max(KS))
    dt = time.perf_counter() - t
    row = {"method": "QINCo decoded, exact search (ceiling)", "qps": xq.shape[0] / dt}
    row.update(recall_cols(I, gt, max(KS)))
    return row


QPS_LEVELS = (100, 300, 1000, 3000, 10000, 30000)


def best_at_qps(rows: list[dict], k: int = 1, levels=QPS_LEVELS) -> list[dict]:
    """For each method, the best R@k among its settings that reach at least each QPS level (None if none)."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method and r.get(f"r{k}") is not None and r.get("qps")]
        row = {"method": method}
        for q in levels:
            ok = [r[f"r{k}"] for r in mine if r["qps"] >= q]
            row[f"qps>={q}"] = max(ok) if ok else None
        out.append(row)
    return out


def check_gt(gt, path, nb: int, nq: int) -> np.ndarray:
    """Ground truth checked for its kind as well as its shape: ids of distinct neighbours, not vectors."""
    gt = np.asarray(gt)
    if gt.dtype.itemsize == 1 and nb > 256:
        raise QincoInputError(f"--gt {path} holds bytes (dtype {gt.dtype}), which cannot be ids into {nb:,} vectors: "
                              "a vectors file (.bvecs / .u8bin) given as ground truth?")
    gt = metrics.check_groundtruth(gt, nb, nq)
    head = np.sort(gt[:1000, : min(10, gt.shape[1])], axis=1)
    if gt.shape[1] > 1 and np.mean(np.any(head[:, 1:] == head[:, :-1], axis=1)) > 0.5:
        raise QincoInputError(f"--gt {path}: most rows repeat an id among their first neighbours, which ground "
                              "truth never does: a vectors file given as ground truth?")
    return gt


def warn_zero_recall(rows: list[dict]) -> None:
    """A ground truth that belongs to other queries (or another order) gives zero recall: say so."""
    qinco = [r for r in rows if r["method"].startswith(("QINCo", "IVF-QINCo")) and "ceiling" not in r["method"]
             and r.get("r10") is not None]
    ceiling = next((r for r in rows if "ceiling" in r["method"]), None)
    if qinco and max(r["r10"] for r in qinco) == 0 and (ceiling is None or ceiling["r10"] > 0):
        log("warning: R@10 is zero for every setting" + (f" while the ceiling reaches {ceiling['r10']:.3f}"
                                                           if ceiling else "")
            + ": is --gt the ground truth of these queries, in the same order, over this database?")


def search_cmd(args) -> dict:
    import faiss
    import jax

    if args.reps < 1:
        raise QincoInputError(f"--reps must be >= 1, got {args.reps}")
    unknown = [v for v in args.scan if v not in S.SCANS]
    if unknown or not args.scan:
        raise QincoInputError(f"--scan: unknown scanner {unknown}; choose from {', '.join(S.SCANS)}")
    threads = args.threads or os.cpu_count()
    faiss.omp_set_num_threads(threads)
    meta = S.read_index_meta(args.index)
    model = args.model or S.folder_path(args.index, meta.get("model"), "model", "--model")
    if not args.model and not os.path.exists(model):
        raise QincoInputError(f"{args.index}: the codec saved in the index folder ({model}) is missing; pass --model "
                              f"PATH (the build used {str(meta.get('model_source', 'an unknown path'))[:200]}, "
                              "relative to the index folder)")
    codec = qj.load(model)
    p = S.load_pipeline(args.index, codec)
    cfg = codec.config
    xq = data.read_vectors(args.queries, mmap=False)
    if xq.shape[1] != cfg.d:
        raise QincoInputError(f"the queries ({args.queries}) have dimension {xq.shape[1]}, the index holds "
                              f"d={cfg.d} vectors")
    xq = np.ascontiguousarray(xq, np.float32)
    checks.finite_chunk(xq, 0, f"the queries ({args.queries})")  # before any long ground-truth pass
    if p.ivf and max(args.nprobe) > p.nlist:
        raise QincoInputError(f"--nprobe {max(args.nprobe)} is larger than the index's number of lists "
                              f"nlist={p.nlist}")
    names = [n.strip() for n in (args.baselines or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in baselines.SEARCH_BASELINES]
    if unknown:
        raise QincoInputError(f"unknown baseline(s) {', '.join(unknown)}; choose from "
                              f"{', '.join(baselines.SEARCH_BASELINES)}")
    xb = None
    if names or args.gt is None:
        db = args.db or S.folder_path(args.index, meta.get("db"), "raw database", "--db")
        xb = data.read_vectors(db)
        if xb.shape[0] != p.index.ntotal:
            raise QincoInputError(f"the database {db} holds {xb.shape[0]:,} vectors, the index "
                                  f"{p.index.ntotal:,}")
    if args.gt is None:
        log("no ground truth: exact search in the raw database")
        gt = metrics.exact_groundtruth(xq, xb, max(KS))
    else:
        gt = check_gt(data.read_groundtruth(args.gt), args.gt, p.index.ntotal, xq.shape[0])
    settings, extra = qinco_settings(p, xq, gt, args)
    notes = []
    if names:
        xt = data.read_vectors(args.train or S.folder_path(args.index, meta.get("train"), "training vectors",
                                                            "--train"))
        xt = np.ascontiguousarray(xt[: min(args.nt_baselines, xt.shape[0])], np.float32)
        nbits = int(round(np.log2(cfg.K)))
        indexes, notes = baseline_indexes(names, S.ivf_centroids(codec), cfg.M, nbits, xt, xb)
        settings += search_timing.baseline_settings(indexes, args.nprobe if p.ivf else [None], xq, gt, recall_cols)
    log(f"timing {len(settings)} settings, {args.reps} times each, interleaved")
    rows = search_timing.time_interleaved(settings + extra, xq.shape[0], args.reps, log) + notes
    if args.ceiling:
        rows.append(ceiling_row(codec, p.db_codes, xq, gt))
        log(f"ceiling: R@1 {rows[-1]['r1']:.3f}, R@10 {rows[-1]['r10']:.3f}")
    res = {"index": os.path.abspath(args.index), "model": os.path.abspath(model), "config": cfg.to_dict(),
           "nq": int(xq.shape[0]), "ntotal": int(p.index.ntotal), "nlist": p.nlist,
           "code_bytes": meta.get("code_bytes"), "build": meta.get("times"), "rows": rows,
           "faiss_threads": faiss.omp_get_max_threads(), "cpu_count": os.cpu_count(), "reps": args.reps,
           "loadavg": os.getloadavg(), "jax_backend": jax.default_backend()}
    res["decode_flops_per_candidate"] = p.reranker.flops_per_candidate()
    res["matmul_gflops"] = search_timing.matmul_rate()
    log(f"QINCo decode: {res['decode_flops_per_candidate'] or float('nan'):,.0f} FLOPs per candidate; "
        f"in-run float32 matmul rate {res['matmul_gflops']:.1f} GFLOP/s on {jax.default_backend()}")
    for r in rows:
        if "decode_share_of_matmul" in r:
            log(f"  {r['method']}, nprobe {r['nprobe']}, nshort {r['nshort']}: decode {np.median(r['decode_us_per_cand_runs']):.2f} "
                f"µs per candidate, {r['decode_gflops']:.0f} GFLOP/s, {r['decode_share_of_matmul']:.0%} of the matmul "
                f"rate measured after each staged run (median {r['matmul_gflops_paired']:.0f} GFLOP/s)")
    out = Path(args.out) if args.out else Path(args.index) / "search.json"
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    warn_zero_recall(rows)
    print(report.format_table([r for r in rows if "no re-rank" not in r["method"]], COMPACT))
    print(f"({len(rows)} settings; per-stage times and the shortlists' recalls are in the JSON)")
    for k in (1, 10):
        res[f"best_r{k}_at_qps"] = best_at_qps(rows, k)
        print(f"\nbest R@{k} at a given QPS or more:")
        print(report.format_table(res[f"best_r{k}_at_qps"], ["method"] + [f"qps>={q}" for q in QPS_LEVELS]))
    curves: dict = {}
    for r in rows:
        curves.setdefault(r["method"], []).append(r)
    try:
        plot.parent.mkdir(parents=True, exist_ok=True)
        name = args.name or Path(args.queries).stem
        report.plot_qps_recall(curves, plot, title=f"{name}: {p.index.ntotal:,} vectors, {meta.get('code_bytes')} "
                               f"bytes per code, {faiss.omp_get_max_threads()} threads (labels: nprobe, nshort)")
        res["plot"] = str(plot.absolute())
    except RuntimeError as e:
        log(f"no plot: {e}")
    report.write_json(out, res)
    print(f"results: {out}" + (f"\nplot: {plot}" if "plot" in res else ""))
    return res


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    try:
        build(args) if args.cmd == "build" else search_cmd(args)
    except (QincoInputError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print(f"\ninterrupted: {interrupted_at(args)}", file=sys.stderr)
        sys.exit(130)


def interrupted_at(args) -> str:
    """One line on where a command stopped and how to go on."""
    if args.cmd != "build":
        return "the search was stopped; nothing was written"
    where = STAGE["what"]
    if STAGE["codes"] is not None:
        try:
            st = S.codes_status(STAGE["codes"])
            where += f" ({st['done']:,} of {st['n']:,} rows finished)"
        except (QincoInputError, OSError):
            pass
    return f"stopped while {where}; run the same command again to resume (finished parts are kept)"


if __name__ == "__main__":
    main()
