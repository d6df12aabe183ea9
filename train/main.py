"""Train a QINCo codec.

    python train/main.py                                   # built-in synthetic data, a few minutes on a laptop
    python train/main.py --dataset bigann1M --nt 500000 --M 8 --L 2 --lr 1e-3 --workdir runs/bigann
    python train/main.py --train my_vectors.fvecs --M 8 --workdir runs/mine
    python train/main.py --workdir runs/bigann --resume    # continue a killed run
    python train/main.py --train my_vectors.fvecs --ivf 4096 --M 8 --workdir runs/ivf   # IVF-QINCo
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

if __package__ in (None, ""):  # `python train/main.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.config import DEMO, TrainConfig  # noqa: E402


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("data")
    g.add_argument("--dataset", help="synthetic (default), bigann1M, deep1M, fb_ssnpp, contriever1M, sift1M")
    g.add_argument("--data-dir", help="dataset root (else $QINCO_DATA_DIR, else ./data)")
    g.add_argument("--train", help="your own training vectors (.fvecs .bvecs .fbin .u8bin .npy ...)")
    g.add_argument("--db", help="database vectors (optional, with --train)")
    g.add_argument("--queries", help="query vectors (optional, with --train)")
    g.add_argument("--gt", help="ground-truth neighbour ids (optional, with --train)")
    for name, help_ in (("nt", "training vectors"), ("nval", "validation vectors (the last of the training data)"),
                        ("nb", "database vectors")):
        g.add_argument(f"--{name}", type=int, help=help_)
    g = ap.add_argument_group("model")
    for name in ("K", "M", "L", "h"):
        g.add_argument(f"--{name}", type=int)
    g.add_argument("--lowrank", action="store_true", default=None, help="QINCo-LR concat block")
    g.add_argument("--ivf", type=int, metavar="NLIST",
                   help="IVF-QINCo: step 0 is a frozen table of NLIST faiss k-means centroids of the training set")
    g.add_argument("--ivf-centroids", metavar="FILE.npy",
                   help="IVF-QINCo with these centroids ((nlist, d), raw units) instead of k-means")
    g = ap.add_argument_group("recipe")
    g.add_argument("--lr", type=float)
    g.add_argument("--batch-size", type=int, help="global batch (default 1024)")
    g.add_argument("--epochs", type=int, help="maximum number of epochs")
    g.add_argument("--seed", type=int)
    g.add_argument("--rq-beam-size", type=int, help="beam of the RQ that initialises the codebooks (default 1)")
    g.add_argument("--persistent-adam", action="store_true", default=None,
                   help="keep Adam's moments across epochs (the original resets them every epoch)")
    g = ap.add_argument_group("run")
    g.add_argument("--workdir")
    g.add_argument("--resume", action="store_true", default=None, help="continue the run in --workdir")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars")
    g = ap.add_argument_group("multi-host")
    g.add_argument("--distributed", action="store_true", default=None, help="call jax.distributed.initialize()")
    g.add_argument("--coordinator-address", help="host:port of process 0 (auto-detected on SLURM / TPU pods)")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)
    return ap


# what may change when a run is resumed (where it runs and for how long, not what it trains)
RESUMABLE = {"resume", "progress", "epochs", "data_dir", "distributed", "coordinator_address", "num_processes",
             "process_id"}


def resumed_config(args: dict) -> TrainConfig:
    """The saved run's settings, with only the flags that may change on resume applied."""
    workdir = args.get("workdir", DEMO["workdir"])
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"error: --resume: cannot read {path} ({e}); is {workdir} a training run?")
    clash = sorted(k for k, v in args.items() if k not in RESUMABLE | {"workdir"} and saved.get(k) != v)
    if clash:
        sys.exit(f"error: --resume continues the run saved in {path}; these flags differ from it: "
                 + ", ".join(f"--{k.replace('_', '-')} ({args[k]!r} vs saved {saved.get(k)!r})" for k in clash))
    return TrainConfig(**{**saved, **{k: v for k, v in args.items() if k in RESUMABLE}})


def config_from_args(argv=None) -> TrainConfig:
    """Flags override the demo defaults (synthetic data) or, with a real dataset, the original's.

    With --resume, the run's saved config.json is the base and only RESUMABLE flags may change.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    args = {k: v for k, v in vars(parser().parse_args(argv)).items() if v is not None and k in fields}
    if args.get("resume"):
        return resumed_config(args)
    real_data = args.get("train") or args.get("dataset", "synthetic") != "synthetic"
    return TrainConfig(**{**({} if real_data else DEMO), **args})


def main(argv=None) -> None:
    cfg = config_from_args(argv)
    from qinco_jax import QincoInputError
    from train import loop

    try:
        loop.run(cfg)
    except (QincoInputError, FileExistsError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
