"""QINCo2 encode throughput: QINCo2-S at A=16, B=32 (the presets' search) beside greedy QINCo v1, in
vectors/s and as a share of the machine's matmul rate measured in the same run.

    python eval/bench_qinco2.py                   # d=128, M=8, K=256, random weights, CPU
    python eval/bench_qinco2.py --n 65536 --batch-size 4096 --matmul-n 8192   # an accelerator
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

import qinco_jax as qj
from qinco_jax import model, runtime
from train.config import architecture

from eval.bench_codec import best_of, matmul_gflops


def _codec(cfg: qj.QincoConfig, seed: int = 0) -> qj.Codec:
    params = jax.device_get(model.init_params(cfg, jax.random.key(seed)))
    rng = np.random.default_rng(seed)  # non-zero QINCo2 blocks, so every part of the step does work
    params = jax.tree.map(lambda a: a + rng.normal(scale=0.05, size=a.shape).astype(np.float32), params)
    return qj.Codec(cfg, params, 1.0)


def time_encode(codec: qj.Codec, x: np.ndarray, repeats: int, batch_size: int | None, **search) -> dict:
    qj.encode(codec, x[: 2 * (batch_size or 1024)], batch_size=batch_size, **search)  # compile
    t = best_of(lambda: qj.encode(codec, x, batch_size=batch_size, **search), repeats)
    A, B = runtime.search_policy(codec.config, search.get("beam"), search.get("candidates"))
    flops = codec.config.encode_flops_per_vector(A, B)
    return {"A": A, "B": B, "vps": len(x) / t, "us_per_vector": 1e6 * t / len(x), "gflops": flops * len(x) / t / 1e9}


def run(d: int, n: int, repeats: int, batch_size: int | None = None, matmul_n: int = 2048) -> dict:
    rng = np.random.default_rng(1)
    v2 = _codec(qj.QincoConfig(**architecture("qinco2-S", d)))
    v1 = _codec(qj.QincoConfig(d=d, K=256, M=8, L=2, h=256))
    x = rng.normal(size=(n, d)).astype(np.float32)
    res = {"d": d, "n": n, "platform": jax.local_devices()[0].platform, "matmul_gflops": matmul_gflops(matmul_n)}
    res["qinco2_S_A16_B32"] = time_encode(v2, x, repeats, batch_size, beam=32, candidates=16)
    res["qinco1_greedy"] = time_encode(v1, x, repeats, batch_size)
    res["matmul_gflops_after"] = matmul_gflops(matmul_n)
    for k in ("qinco2_S_A16_B32", "qinco1_greedy"):
        res[k]["share_of_matmul"] = res[k]["gflops"] / max(res["matmul_gflops"], res["matmul_gflops_after"])
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, help="vectors per jitted call (default: the codec's)")
    ap.add_argument("--matmul-n", type=int, default=2048, help="size of the square matmul that gives the baseline rate")
    ap.add_argument("--out", help="write the result as JSON")
    args = ap.parse_args(argv)
    res = run(args.d, args.n, args.repeats, args.batch_size, args.matmul_n)
    print(json.dumps(res, indent=1))
    if args.out:
        from qinco_jax.files import write_json

        write_json(args.out, res)


if __name__ == "__main__":
    main()
