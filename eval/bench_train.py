"""Training throughput (vectors/s) of the pmap train step on this machine, beside its matmul rate.

    python eval/bench_train.py                 # the demo configuration and the paper's 8-byte one
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import qinco_jax as qj  # noqa: E402
from eval.bench_codec import matmul_gflops, random_codec  # noqa: E402
from qinco_jax import training  # noqa: E402

CONFIGS = {
    "demo (d=32 K=64 M=4 L=2 h=64)": qj.QincoConfig(d=32, K=64, M=4, L=2, h=64),
    "paper 8 bytes (d=128 K=256 M=8 L=2 h=256)": qj.QincoConfig(d=128, K=256, M=8, L=2, h=256),
}


def steps_per_second(cfg: qj.QincoConfig, batch: int, steps: int) -> float:
    """Timed pmap train steps on all local devices (after two warm-up steps)."""
    codec = random_codec(cfg)
    n_dev = jax.local_device_count()
    x = np.random.default_rng(0).normal(scale=0.3, size=(batch, cfg.d)).astype(np.float32)
    xs, ws = training.shard_batch(x, np.ones(batch, np.float32), n_dev)
    step = training.train_step(cfg)
    state = training.replicate(training.init_state(codec.params))
    for _ in range(2):  # warm-up: compilation and first-touch allocations
        state, loss = step(state, xs, ws, 1e-4)
    loss.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(steps):
        state, loss = step(state, xs, ws, 1e-4)
    loss.block_until_ready()
    return steps / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args(argv)
    rate = matmul_gflops()
    print(f"{jax.local_device_count()} device(s) ({jax.default_backend()}); matmul {rate:.1f} GFLOP/s")
    for name, cfg in CONFIGS.items():
        sps = steps_per_second(cfg, a.batch_size, a.steps)
        vps = sps * a.batch_size
        # the greedy encode dominates; the differentiable re-decode adds ~3x (M-1) single-candidate passes
        gflops = vps * cfg.encode_flops_per_vector() / 1e9
        print(f"{name}: {vps:,.0f} vectors/s ({sps:.2f} steps/s of {a.batch_size}); "
              f"encode part {gflops:.1f} GFLOP/s = {100 * gflops / rate:.0f}% of matmul")


if __name__ == "__main__":
    main()
