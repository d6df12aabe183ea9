"""Encode, decode and training throughput on an accelerator, as one prepared run.

    python eval/bench_device.py --out results/          # the paper's 8-byte model (d=128 K=256 M=8 L=2 h=256)

Every figure is also given against a baseline measured in the same run (the device's own matmul rate at
each precision), since absolute numbers move with the machine. It sweeps what decides speed on a GPU:
- the inner sub-batch (candidate tensors of `sub x K x max(d, h)` elements: cache-sized on a CPU, much larger
  on an accelerator) and the vectors per jitted call;
- the matmul precision: float32 ("highest"), TF32 ("tensorfloat32") and bfloat16 inputs with float32
  accumulation ("bfloat16"); codes are compared with the float32 codes, so a faster precision is only
  worth taking where it keeps them equal.
No faiss is needed, so it runs on a bare accelerator image with jax, flax, optax and orbax.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import qinco_jax as qj  # noqa: E402
from qinco_jax import runtime  # noqa: E402
from eval.bench_codec import best_of, random_codec  # noqa: E402
from eval.bench_train import steps_per_second  # noqa: E402
from qinco_jax import training  # noqa: E402

PRECISIONS = ("highest", "tensorfloat32", "bfloat16")


def log(msg: str) -> None:
    print(msg, flush=True)


def matmul_tflops(precision: str, n: int = 8192) -> float:
    """n^3 matmul rate (TFLOP/s) of float32 arrays at the given matmul precision."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    with jax.default_matmul_precision(precision):
        f = jax.jit(lambda a: a @ a)
        f(a).block_until_ready()
        return 2 * n**3 / best_of(lambda: f(a).block_until_ready(), 5) / 1e12


def set_sub_elems(sub_elems: int) -> None:
    """Inner sub-batch size of the jitted encoder (and train step); clears the compiled functions."""
    runtime.SUB_ELEMS = sub_elems
    runtime._encode_fn.cache_clear()
    training.train_step.cache_clear()


def time_encode(codec, x, chunk: int, precision: str, repeats: int):
    runtime.set_matmul_precision(precision)
    try:
        codes = qj.encode(codec, x, batch_size=chunk)  # compile + warm-up
        t = best_of(lambda: qj.encode(codec, x, batch_size=chunk), repeats)
    finally:
        runtime.set_matmul_precision("highest")
    return codes, t


def train_vps(cfg: qj.QincoConfig, batch: int, precision: str, steps: int = 10) -> float:
    with jax.default_matmul_precision(precision):
        return steps_per_second(cfg, batch, steps) * batch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=131072, help="vectors to encode")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunks", default="4096,16384,65536", help="vectors per jitted call")
    ap.add_argument("--sub-elems", default="20,24,26", help="log2 of the inner sub-batch element counts")
    ap.add_argument("--matmul-n", type=int, default=8192, help="size of the square matmul baseline")
    ap.add_argument("--train-batches", default="1024,8192", help="global batch sizes of the train-step timing")
    ap.add_argument("--out", default=".", help="folder for bench_device.json")
    a = ap.parse_args(argv)
    cfg = qj.QincoConfig(d=128, K=256, M=8, L=2, h=256)
    res = {"devices": [str(d) for d in jax.devices()], "jax": jax.__version__, "config": cfg.to_dict(), "n": a.n}
    log(f"devices {res['devices']}, jax {jax.__version__}")
    res["matmul_tflops"] = {p: matmul_tflops(p, a.matmul_n) for p in PRECISIONS}
    log(f"matmul {a.matmul_n}^3: " + ", ".join(f"{p} {v:.1f} TFLOP/s" for p, v in res["matmul_tflops"].items()))

    codec = random_codec(cfg)
    rng = np.random.default_rng(1)
    x = np.asarray(qj.decode(codec, rng.integers(0, cfg.K, (a.n, cfg.M))))
    x += rng.normal(scale=0.1, size=x.shape).astype(np.float32)
    flops = cfg.encode_flops_per_vector()

    # 1. the inner sub-batch and the chunk, in float32
    ref, sweep = None, []
    for e in (int(s) for s in a.sub_elems.split(",")):
        set_sub_elems(1 << e)
        for chunk in (int(c) for c in a.chunks.split(",")):
            try:
                codes, t = time_encode(codec, x, chunk, "highest", a.repeats)
            except Exception as err:  # out of device memory for the largest sizes
                log(f"sub 2^{e} chunk {chunk}: failed ({type(err).__name__})")
                continue
            ref = codes if ref is None else ref
            row = {"sub_elems_log2": e, "chunk": chunk, "us_per_vector": 1e6 * t / a.n,
                   "tflops": flops * a.n / t / 1e12, "codes_equal": float((codes == ref).mean())}
            sweep.append(row)
            log(f"encode float32, sub 2^{e}, chunk {chunk}: {row['us_per_vector']:.2f} us/vector, "
                f"{row['tflops']:.1f} TFLOP/s, codes equal {100 * row['codes_equal']:.3f}%")
    res["encode_sweep"] = sweep
    best = min(sweep, key=lambda r: r["us_per_vector"])
    set_sub_elems(1 << best["sub_elems_log2"])

    # 2. precisions at the best sizes
    res["encode_precision"] = {}
    for p in PRECISIONS:
        codes, t = time_encode(codec, x, best["chunk"], p, a.repeats)
        row = {"us_per_vector": 1e6 * t / a.n, "tflops": flops * a.n / t / 1e12,
               "share_of_matmul": flops * a.n / t / 1e12 / res["matmul_tflops"][p],
               "codes_equal_float32": float((codes == ref).mean()),
               "vectors_equal_float32": float((codes == ref).all(axis=1).mean())}
        res["encode_precision"][p] = row
        log(f"encode {p}: {row['us_per_vector']:.2f} us/vector ({row['tflops']:.1f} TFLOP/s, "
            f"{100 * row['share_of_matmul']:.0f}% of the {p} matmul rate); codes equal to float32: "
            f"{100 * row['codes_equal_float32']:.3f}% of entries, {100 * row['vectors_equal_float32']:.2f}% of vectors")

    # 3. decode
    qj.decode(codec, ref, batch_size=best["chunk"])
    t = best_of(lambda: qj.decode(codec, ref, batch_size=best["chunk"]), a.repeats)
    res["decode_us_per_vector"] = 1e6 * t / a.n
    log(f"decode: {res['decode_us_per_vector']:.3f} us/vector")

    # 4. training steps (global batch 1024 as the paper, and larger)
    res["train_vps"] = {}
    for batch in (int(b) for b in a.train_batches.split(",")):
        for p in ("highest", "tensorfloat32"):
            vps = train_vps(cfg, batch, p)
            res["train_vps"][f"{batch}/{p}"] = vps
            log(f"train step, batch {batch}, {p}: {vps:,.0f} vectors/s "
                f"({500_000 / vps:.1f} s per 500k-vector epoch)")

    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench_device.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
