"""Encode / decode throughput of qinco_jax against faiss.QINCo (same weights, same run) and the
machine's matmul rate.

    python eval/bench_codec.py                      # d=128 K=256 M=8 L=2 h=256, float32, CPU
    python eval/bench_codec.py --n 2048 --sweep     # also try several chunk sizes
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import qinco_jax as qj
from qinco_jax import faiss_ops, model, runtime


def best_of(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls (seconds)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_gflops(n: int = 2048, repeats: int = 3) -> float:
    """float32 n x n x n matmul rate of this machine through XLA."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    return 2 * n**3 / best_of(lambda: f(a).block_until_ready(), repeats) / 1e9


def random_codec(cfg: qj.QincoConfig, seed: int = 0) -> qj.Codec:
    """Random weights, codebooks scaled like data (so encoding does real work)."""
    params = model.init_params(cfg, jax.random.key(seed))
    return qj.Codec(cfg, jax.device_get(params), 1.0)


def run(cfg: qj.QincoConfig, n: int, repeats: int, chunks: list[int]) -> dict:
    """Time faiss.QINCo and qinco_jax encode/decode on the same n vectors."""
    codec = random_codec(cfg)
    x = np.asarray(qj.decode(codec, np.random.default_rng(1).integers(0, cfg.K, (n, cfg.M))))
    x += np.random.default_rng(2).normal(scale=0.1, size=x.shape).astype(np.float32)
    q = faiss_ops.to_faiss(codec)
    res = {"config": cfg.to_dict(), "n": n, "threads": jax.local_devices()[0].platform}
    t_f = best_of(lambda: faiss_ops.faiss_encode(q, x), max(1, repeats - 1))
    codes_f = faiss_ops.faiss_encode(q, x)
    res["matmul_gflops"] = matmul_gflops()
    res["faiss_encode_vps"] = n / t_f
    res["faiss_decode_vps"] = n / best_of(lambda: faiss_ops.faiss_decode(q, codes_f), repeats)
    flops = cfg.encode_flops_per_vector()
    res["encode"] = {}
    for chunk in chunks:
        qj.encode(codec, x, batch_size=chunk)  # compile
        t = best_of(lambda: qj.encode(codec, x, batch_size=chunk), repeats)
        res["encode"][chunk] = {"vps": n / t, "gflops": flops * n / t / 1e9}
    codes = qj.encode(codec, x)
    res["codes_equal_faiss"] = float((codes == codes_f).mean())
    qj.decode(codec, codes)
    res["decode_vps"] = n / best_of(lambda: qj.decode(codec, codes), repeats)
    best = max(res["encode"].values(), key=lambda r: r["vps"])
    res["encode_vs_faiss"] = best["vps"] / res["faiss_encode_vps"]
    res["encode_vs_matmul"] = best["gflops"] / res["matmul_gflops"]
    res["decode_vs_faiss"] = res["decode_vps"] / res["faiss_decode_vps"]
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("d", 128), ("K", 256), ("M", 8), ("L", 2), ("h", 256), ("n", 2048), ("repeats", 3)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--sweep", action="store_true", help="try several chunk sizes")
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args(argv)
    cfg = qj.QincoConfig(d=a.d, K=a.K, M=a.M, L=a.L, h=a.h)
    chunks = [256, 1024, 4096] if a.sweep else [runtime.default_chunk()]
    res = run(cfg, a.n, a.repeats, chunks)
    print(f"config {cfg}, n={a.n}")
    print(f"machine matmul (XLA, 2048^3 float32): {res['matmul_gflops']:.1f} GFLOP/s")
    print(f"faiss.QINCo encode: {res['faiss_encode_vps']:.1f} vectors/s, decode {res['faiss_decode_vps']:.0f} vectors/s")
    for chunk, r in res["encode"].items():
        print(f"qinco_jax encode (chunk {chunk}): {r['vps']:.1f} vectors/s, {r['gflops']:.1f} GFLOP/s")
    print(f"qinco_jax decode: {res['decode_vps']:.0f} vectors/s")
    print(
        f"ratios: encode {res['encode_vs_faiss']:.2f}x faiss, {100 * res['encode_vs_matmul']:.0f}% of matmul rate; "
        f"decode {res['decode_vs_faiss']:.2f}x faiss; codes equal to faiss on {100 * res['codes_equal_faiss']:.2f}%"
    )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
