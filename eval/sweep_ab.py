"""Speed against accuracy of the encoder's search: one trained codec encoded with several (A, B) settings
(A codes pre-selected per beam, beam width B), each giving the MSE of the encoded vectors and the encode
throughput. Greedy search over all K codes (A=K, B=1) is in the default list.

    python eval/sweep_ab.py --model runs/devsift8_qinco2s --db ../shared/data/devsift/base.u8bin --nb 5000 \\
        --out docs/sweep_ab_devsift.json --plot docs/sweep_ab_devsift.png
    python eval/sweep_ab.py --model runs/mine --db base.fvecs --settings 256:1,16:8,32:64

All settings encode the same first nb vectors. Throughput is wall-clock on this machine after one warm-up
call (JIT compilation excluded); the in-run matmul rate is reported beside it, as these figures only
compare within a run. A codec trained without pre-selection (A=0) only takes A=0 (all K codes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

DEFAULT_SETTINGS = ("K:1", "4:1", "8:1", "16:1", "8:4", "16:8", "16:16", "16:32", "32:32", "32:64")


def parse_settings(text: str, K: int) -> list[tuple[int, int]]:
    """'A:B,A:B,...' (A may be the letter K) -> [(A, B), ...]; raises ValueError naming a bad item."""
    out = []
    for item in text.split(","):
        item = item.strip()
        parts = item.split(":")
        if len(parts) != 2:
            raise ValueError(f"--settings: {item!r} is not A:B (for example 16:32)")
        try:
            A = K if parts[0].strip().upper() == "K" else int(parts[0])
            B = int(parts[1])
        except ValueError:
            raise ValueError(f"--settings: {item!r} is not two integers A:B") from None
        if (A, B) not in out:
            out.append((A, B))
    if not out:
        raise ValueError("--settings is empty")
    return out


def sweep(codec, x: np.ndarray, settings, progress: bool = True) -> list[dict]:
    """One row per (A, B): MSE (raw units), vectors/s, µs/vector and network evaluations per step."""
    import qinco_jax as qj
    from qinco_jax import runtime

    cfg = codec.config
    rows = []
    for A, B in settings:
        runtime.search_policy(cfg, B, A)  # a clear error before any work
        chunk = runtime._encode_chunk(cfg, None, len(x), A, B)
        qj.encode(codec, x[:chunk], beam=B, candidates=A)  # compile this search's function
        t0 = time.perf_counter()
        codes, err = qj.encode_with_error(codec, x, beam=B, candidates=A, progress=progress)
        dt = time.perf_counter() - t0
        dec = np.asarray(qj.decode(codec, codes), np.float64)
        mse_dec = float(((dec - np.asarray(x, np.float64)) ** 2).sum(1).mean())
        row = {"A": A, "B": B, "evals_per_step": B * (A or cfg.K), "mse": float(err.mean()), "mse_decoded": mse_dec,
               "vps": len(x) / dt, "us_per_vector": 1e6 * dt / len(x)}
        rows.append(row)
        print(f"A={A:4d} B={B:3d}  MSE {row['mse']:.6g}  {row['vps']:9.1f} vectors/s", file=sys.stderr)
    return rows


def plot(rows: list[dict], path: str, title: str = "") -> None:
    from eval.report import figure

    fig = figure((6.4, 4.8))
    ax = fig.add_subplot()
    ax.plot([r["vps"] for r in rows], [r["mse"] for r in rows], "o")
    for r in rows:
        ax.annotate(f"A={r['A']},B={r['B']}", (r["vps"], r["mse"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("encode throughput (vectors/s)")
    ax.set_ylabel("MSE")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path + ".tmp", dpi=100, format="png")
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="training workdir, saved codec directory or official .pt file")
    ap.add_argument("--db", required=True, help="vectors to encode (.fvecs .bvecs .fbin .u8bin .npy ...)")
    ap.add_argument("--nb", type=int, default=5000, help="encode the first nb vectors (default 5000)")
    ap.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                    help="comma-separated A:B pairs; A=K means all codes (default: %(default)s)")
    ap.add_argument("--out", help="results JSON")
    ap.add_argument("--plot", help="PNG of MSE against encode vectors/s")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.nb < 1:
        ap.error(f"--nb must be >= 1, got {args.nb}")

    import qinco_jax as qj
    from qinco_jax import checks
    from qinco_jax.data import read_vectors

    from eval.bench_codec import matmul_gflops
    from eval.report import format_table, write_json

    try:
        codec = qj.load(args.model)
        if not isinstance(codec, qj.Codec):
            raise checks.QincoInputError(f"{args.model}: the (A, B) sweep takes a plain QINCo codec")
        settings = parse_settings(args.settings, codec.config.K)
        x = read_vectors(args.db)
        x = checks.vectors(x[: args.nb], codec.config.d, what=args.db)
        rows = sweep(codec, x, settings, progress=not args.no_progress)
    except (checks.QincoInputError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = {"model": args.model, "db": args.db, "nb": len(x), "config": codec.config.to_dict(),
           "matmul_gflops": matmul_gflops(), "rows": rows}
    print(format_table(rows, ("A", "B", "evals_per_step", "mse", "vps", "us_per_vector")))
    print(f"in-run float32 matmul rate: {res['matmul_gflops']:.1f} GFLOP/s")
    if args.out:
        write_json(args.out, res)
    if args.plot:
        try:
            name = os.path.basename(os.path.normpath(args.model))
            plot(rows, args.plot, f"{name}: search settings ({len(x)} vectors)")
        except RuntimeError as e:
            print(f"no plot: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
