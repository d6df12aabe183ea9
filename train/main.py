"""Train a QINCo codec.

    python train/main.py                                   # built-in synthetic data, a few minutes on a laptop
    python train/main.py --dataset bigann1M --nt 500000 --M 8 --L 2 --lr 1e-3 --workdir runs/bigann
    python train/main.py --train my_vectors.fvecs --M 8 --workdir runs/mine
    python train/main.py --workdir runs/bigann --resume    # continue a killed run
    python train/main.py --train my_vectors.fvecs --ivf 4096 --M 8 --workdir runs/ivf   # IVF-QINCo
    python train/main.py --dataset bigann1M --model qinco2-S --epochs 20 --workdir runs/q2s  # QINCo2 (--A --B --de --dh)

Defaults are given as "real data" / "synthetic demo" where they differ (the demo is a small model
that trains in minutes). Running the same command again in the same --workdir continues an
unfinished run, or shows the results of a finished one; a different command there is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

if __package__ in (None, ""):  # `python train/main.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.config import (DEMO, MODEL_PRESETS, REAL_DEFAULTS, RQ_EXACT_V1_LR, TrainConfig, flag, init_name,  # noqa: E402
                          preset_fields, training_search)

_REAL = TrainConfig()


def _default(name: str, real: str | None = None, demo: str | None = None) -> str:
    """'(default: X)' or '(default: X on real data, Y on the synthetic demo)'."""
    real = real if real is not None else str(getattr(_REAL, name))
    demo = demo if demo is not None else str(DEMO.get(name, getattr(_REAL, name)))
    return f"(default: {real})" if real == demo else f"(default: {real} on real data, {demo} on the synthetic demo)"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("data")
    g.add_argument("--dataset", help="synthetic, bigann1M, deep1M, fb_ssnpp, contriever1M, sift1M (default: synthetic)")
    g.add_argument("--data-dir", help="dataset root (default: $QINCO_DATA_DIR, else ./data)")
    g.add_argument("--train", help="your own training vectors (.fvecs .bvecs .fbin .u8bin .npy ...) (default: none)")
    g.add_argument("--db", help="database vectors, with --train (default: none)")
    g.add_argument("--queries", help="query vectors, with --train (default: none)")
    g.add_argument("--gt", help="ground-truth neighbour ids, with --train (default: none)")
    g.add_argument("--nt", type=int, help="training vectors (default: all but the validation set on real data, "
                                          "20,000 on the synthetic demo)")
    g.add_argument("--nval", type=int, help="validation vectors, the last of the training data (default: 10,000; "
                                            "5,000 for sift1M; 2,000 on the synthetic demo)")
    g.add_argument("--nb", type=int, help="database vectors (default: the dataset's, e.g. 1M; 20,000 on the demo)")
    g = ap.add_argument_group("model")
    g.add_argument("--K", type=int, help="codebook size per step, a power of two " + _default("K"))
    g.add_argument("--M", type=int, help="quantization steps (codes per vector) " + _default("M"))
    g.add_argument("--L", type=int, help="residual blocks per step " + _default("L"))
    g.add_argument("--h", type=int, help="hidden width of the residual blocks " + _default("h"))
    g.add_argument("--lowrank", action="store_true", default=None, help="QINCo-LR concat block (default: off)")
    g.add_argument("--model", dest="preset", metavar="PRESET",
                   help=f"architecture preset of the QINCo2 code, one of {', '.join(sorted(MODEL_PRESETS))}; qinco2-* "
                        "train with QINCo2's recipe (lr 8e-4); the model flags override it (default: none)")
    g.add_argument("--de", type=int, help="QINCo2 embedding width (default: d)")
    g.add_argument("--dh", dest="h", type=int, help="QINCo2 hidden width, the same as --h " + _default("h"))
    g.add_argument("--A", type=int, help="candidates pre-selected per beam, 0 for none " + _default("A"))
    g.add_argument("--B", type=int, help="beam width, 1 for greedy " + _default("B"))
    g.add_argument("--train-A", dest="train_A", type=int, help="QINCo2: candidates of the training step's search, "
                   "when it should be cheaper than the model's (encoding and validation keep --A) (default: min(--A, 8) on "
                   "real data, --A on the synthetic demo)")
    g.add_argument("--train-B", dest="train_B", type=int, help="QINCo2: beam of the training step's search "
                   "(default: min(--B, 8) on real data, --B on the synthetic demo; give both flags the model's "
                   "values for the official recipe's search)")
    g.add_argument("--init", help="rq-exact (the untrained model is exactly the RQ it starts from, and every weight "
                   "gets a gradient) or original (the originals' random step networks; 'default' is its old name) "
                   + _default("init", real=REAL_DEFAULTS["init"]))
    g.add_argument("--ivf", type=int, metavar="NLIST",
                   help="IVF-QINCo: step 0 is a frozen table of NLIST faiss k-means centroids of the training set "
                        "(default: 0, plain QINCo)")
    g.add_argument("--ivf-centroids", metavar="FILE.npy",
                   help="IVF-QINCo with these centroids ((nlist, d), raw units) instead of k-means (default: none)")
    g.add_argument("--pq", type=int, metavar="NSUB",
                   help="PQ-QINCo: one QINCo of --M codes per each of NSUB contiguous sub-vector blocks (default: off)")
    g.add_argument("--opq", action="store_true", default=None,
                   help="PQ-QINCo: a faiss OPQ rotation before the split (default: off)")
    g = ap.add_argument_group("recipe")
    g.add_argument("--lr", type=float, help="Adam learning rate " + _default("lr")[:-1]
                   + f"; {RQ_EXACT_V1_LR:g} for QINCo v1 from the rq-exact start, the default on real data)")
    g.add_argument("--batch-size", type=int, help="global batch, a multiple of the device count " + _default("batch_size"))
    g.add_argument("--epochs", type=int, help="maximum number of epochs " + _default("epochs"))
    g.add_argument("--seed", type=int, help="seed of the initialisation and the batch order " + _default("seed"))
    g.add_argument("--rq-beam-size", type=int, help="beam of the RQ that initialises the codebooks (default: 1; "
                   "with --init rq-exact and --B > 1, the better on validation of 1 and min(B, 8))")
    g.add_argument("--baseline-nt", type=int, help="the end-of-run faiss RQ baselines (beam 1 and 5) train on a "
                   "sample of at most this many training vectors; 0 skips them " + _default("baseline_nt"))
    g.add_argument("--rq-nt", type=int, help="the RQ initialisation trains on a fixed random sample of at most this "
                   "many training vectors, read from the memory-mapped file (as QINCo2) " + _default("rq_nt"))
    g.add_argument("--persistent-adam", action="store_true", default=None,
                   help="keep Adam's moments across epochs (default: off; the original resets them every epoch)")
    g = ap.add_argument_group("run")
    g.add_argument("--workdir", help="run folder " + _default("workdir"))
    g.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --workdir with its saved settings (only --epochs and where it runs "
                        "may change) (default: off)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars (default: shown)")
    g = ap.add_argument_group("multi-host")
    g.add_argument("--distributed", action="store_true", default=None,
                   help="call jax.distributed.initialize() (default: off)")
    g.add_argument("--coordinator-address", help="host:port of process 0 (default: auto-detected on SLURM / TPU pods)")
    g.add_argument("--num-processes", type=int, help="number of processes (default: auto-detected)")
    g.add_argument("--process-id", type=int, help="this process's index (default: auto-detected)")
    return ap


# what may change when a run is resumed (where it runs and for how long, not what it trains)
RESUMABLE = {"resume", "progress", "epochs", "data_dir", "distributed", "coordinator_address", "num_processes",
             "process_id", "workdir"}


def fail(msg: str):
    sys.exit(f"error: {msg}")


def saved_config(workdir: str) -> dict | None:
    """The settings saved in workdir/config.json; None when the folder holds no run."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        fail(f"cannot read {path} ({e}); move or delete {workdir} to start a new run there")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(saved, dict) or set(saved) - fields:
        fail(f"{path} is not a training run's config (unknown fields {sorted(set(saved) - fields)[:3]}); "
             f"move or delete {workdir} to start a new run there")
    if "init" in saved:  # runs saved before "original" was named so call it "default"
        saved["init"] = init_name(saved["init"])
    return saved


def _differences(saved: dict, cfg: dict) -> list[str]:
    def same(k) -> bool:
        if k == "ivf" and cfg[k] == 0 and cfg.get("ivf_centroids") and saved.get("ivf_centroids") == cfg["ivf_centroids"]:
            return True  # nlist was set from the centroid file when the run started
        return saved.get(k) == cfg[k]

    return [f"{flag(k)} {saved.get(k)!r} there, {cfg[k]!r} here" for k in sorted(cfg) if k not in RESUMABLE and not same(k)]


def checked(cfg: TrainConfig) -> TrainConfig:
    problems = cfg.problems()
    if problems:
        fail("; ".join(problems))
    return cfg


def config_from_args(argv=None) -> TrainConfig:
    """Flags override the demo defaults (synthetic data) or, with a real dataset, the original's.

    With --resume, the run's saved config.json is the base and only RESUMABLE flags may change.
    Without it, a --workdir that already holds a run continues it when the settings are the same
    (the same command run again), and is refused when they differ. Every check here runs before
    anything is imported, loaded or written.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    args = {k: v for k, v in vars(parser().parse_args(argv)).items() if v is not None and k in fields}
    if "init" in args:
        args["init"] = init_name(args["init"])
    real_data = args.get("train") or args.get("dataset", "synthetic") != "synthetic"
    workdir = args.get("workdir", _REAL.workdir if real_data and not args.get("resume") else DEMO["workdir"])
    saved = saved_config(workdir)
    if args.get("resume"):
        if saved is None:
            fail(f"--resume: {os.path.abspath(workdir)} holds no run to resume (no config.json); "
                 "start one without --resume")
        clash = [d for d in _differences(saved, {**saved, **args}) if d]
        if clash:
            fail(f"--resume continues the run saved in {os.path.join(workdir, 'config.json')} with its own "
                 "settings; these flags differ from it: " + ", ".join(clash))
        return checked(TrainConfig(**{**saved, **{k: v for k, v in args.items() if k in RESUMABLE}, "workdir": workdir}))
    preset = preset_fields(args["preset"]) if args.get("preset") else {}
    start = {}
    base = REAL_DEFAULTS if real_data else DEMO
    init = args.get("init", base.get("init", TrainConfig.init))
    if init == "rq-exact" and "lr" not in args and preset.get("variant", "qinco1") != "qinco2":
        start["lr"] = RQ_EXACT_V1_LR  # measured: 1e-3 climbs away from the exact RQ start (README, "Training")
    older = saved is not None and saved.get("train_A") is None and saved.get("train_B") is None
    if real_data and "train_A" not in args and "train_B" not in args and not older:
        # measured better at a fixed budget (README, "Training search"); a run saved with the model's own search
        # (as every run before this default) continues with it
        start.update(training_search({**base, **preset, **args}))
    cfg = checked(TrainConfig(**{**base, **preset, **start, **args}))
    if saved is None:
        return cfg
    clash = _differences(saved, cfg.to_dict())
    if clash:
        fail(f"{os.path.abspath(workdir)} already holds a different run ({'; '.join(clash)}). "
             f"Continue that run with --workdir {workdir} --resume, or choose another --workdir.")
    # the same run: continue it with its saved settings (e.g. nlist that was read from a centroid file)
    resumable = {k: v for k, v in args.items() if k in RESUMABLE}
    return checked(TrainConfig(**{**saved, **resumable, "workdir": workdir, "resume": True}))


def main(argv=None) -> None:
    cfg = config_from_args(argv)
    from qinco_jax import QincoInputError
    from train import loop, pq
    from train.epochs import TrainingError

    if cfg.opq and not cfg.pq:
        fail("--opq needs --pq NSUB")
    if cfg.pq and (cfg.ivf or cfg.ivf_centroids):
        fail("--pq and --ivf cannot be combined (PQ-QINCo sub-quantizers are plain QINCo)")
    try:
        pq.run(cfg) if cfg.pq else loop.run(cfg)
    except (QincoInputError, FileExistsError, FileNotFoundError, ValueError, TrainingError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        print(f"\ninterrupted: {interrupted_at(cfg.workdir)}; run the same command again (or add --resume) to "
              "continue from there", file=sys.stderr)
        sys.exit(130)


def interrupted_at(workdir) -> str:
    """Where a run stopped: its last finished epoch checkpoint (orbax keeps one folder per epoch)."""
    if not workdir:
        return "no workdir, nothing was kept"
    folder = os.path.join(workdir, "checkpoints")
    try:
        epochs = [int(e) for e in os.listdir(folder) if e.isdigit()]
    except OSError:
        epochs = []
    if not epochs:
        return f"no epoch had finished ({workdir} holds no checkpoint yet; a rerun starts from the beginning)"
    last = max(epochs)  # checkpoints are named by epoch; 0 is the initial model, before any step
    return f"{workdir} keeps a checkpoint of " + ("the initial model (epoch 0)" if last == 0 else f"epoch {last}")


if __name__ == "__main__":
    main()
