"""Run settings of a training job (the model's architecture is a QincoConfig inside)."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # data: a named paper dataset, user files, or the built-in synthetic set
    dataset: str = "synthetic"
    data_dir: str | None = None  # else $QINCO_DATA_DIR, else ./data
    train: str | None = None  # user training file (any supported format)
    db: str | None = None
    queries: str | None = None
    gt: str | None = None
    nt: int | None = None  # training vectors (default: all but the validation set)
    nval: int | None = None  # validation vectors, the last of the training file (10,000; 5,000 for sift1M)
    nb: int | None = None  # database size limit
    # model (K, M, L, h, lowrank; d comes from the data)
    # --model PRESET fills the architecture from MODEL_PRESETS (QINCo2 presets also their lr); the model
    # flags override it
    preset: str | None = None
    variant: str = "qinco1"  # qinco1 (QINCo v1 step and recipe) or qinco2 (QINCo2 step and recipe)
    de: int | None = None  # QINCo2 embedding width (None: d)
    A: int = 0  # candidates pre-selected per beam (0: none; > 0 gives the steps pre-selection codebooks)
    B: int = 1  # beam width (1: greedy)
    train_A: int | None = None  # the search of the training step, when cheaper than the model's (None: A, B)
    train_B: int | None = None
    init: str = "original"  # or "rq-exact" (the command line's default on real data): the untrained model is the RQ
    K: int = 256
    M: int = 8
    L: int = 2
    h: int = 256
    lowrank: bool = False
    ivf: int = 0  # IVF-QINCo with this many centroids (0: plain QINCo); set from the file with ivf_centroids
    ivf_centroids: str | None = None  # IVF centroids (nlist, d), raw units; default: faiss k-means on the training set
    pq: int | None = None  # PQ-QINCo: this many contiguous sub-vector blocks, one QINCo (of M codes) each
    opq: bool = False  # PQ-QINCo: a faiss OPQ rotation before the split
    # recipe
    lr: float = 1e-3
    batch_size: int = 1024  # global batch, split over all devices of all processes
    epochs: int = 1000
    seed: int = 1234
    rq_beam_size: int | None = None  # None: 1, or the better of 1 and min(B, 8) for --init rq-exact with B > 1
    baseline_nt: int = 100_000  # the end-of-run faiss RQ baselines train on at most this many vectors (0: none)
    rq_nt: int = 1_000_000  # the RQ initialisation trains on at most this many training vectors (as QINCo2)
    persistent_adam: bool = False  # the original re-creates Adam every epoch
    # run
    workdir: str = "runs/default"
    resume: bool = False
    progress: bool = True
    # multi-host
    distributed: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def training_model(self, d: int):
        """The QincoConfig of the training step's search: the model's, with --train-A / --train-B."""
        mcfg = self.model(d)
        if self.train_A is None and self.train_B is None:
            return mcfg
        return dataclasses.replace(mcfg, A=self.train_A or mcfg.A, B=self.train_B or mcfg.B)

    def model(self, d: int):
        from qinco_jax import QincoConfig

        return QincoConfig(d=d, K=self.K, M=self.M, L=self.L, h=self.h, lowrank=self.lowrank, nlist=self.ivf,
                           variant=self.variant, de=self.de, A=self.A, B=self.B)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def problems(self) -> list[str]:
        """Every flag whose value cannot work, as '--flag: why' (pure Python: runs before anything
        is imported, loaded or written)."""
        out = []

        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                out.append(f"{flag(name)} {short_value(getattr(self, name))}: {why}")

        def integer(name: str, low: int, high: int | None = None, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high)
            need(ok, name, f"must be an integer >= {low}" + (f" and <= {high:,}" if high is not None else ""))

        integer("K", 2, 65536)
        if isinstance(self.K, int) and 2 <= self.K <= 65536:
            need(self.K & (self.K - 1) == 0, "K", "must be a power of two (the codebooks are trained as log2(K)-bit RQ)")
        integer("M", 1, 1024)
        integer("L", 0, 256)
        integer("h", 1, 65536)
        integer("ivf", 0)
        need(self.preset is None or self.preset in MODEL_PRESETS, "preset", f"must be one of {sorted(MODEL_PRESETS)}")
        need(self.variant in ("qinco1", "qinco2"), "variant", "must be qinco1 or qinco2")
        need(init_name(self.init) in INITS, "init", f"must be one of {INITS}")
        integer("de", 1, 65536, optional=True)
        integer("B", 1)
        integer("A", 0)
        integer("train_A", 1, optional=True)
        integer("train_B", 1, optional=True)
        for name in ("train_A", "train_B"):
            need(getattr(self, name) is None or self.variant == "qinco2", name, "is a QINCo2 option (--model qinco2-*)")
        if isinstance(self.train_A, int) and isinstance(self.A, int):
            need(self.A > 0, "train_A", "needs a model with pre-selection (--A > 0)")
            need(self.train_A <= self.K, "train_A", f"must be at most --K {self.K}")
        if isinstance(self.A, int) and isinstance(self.K, int):
            need(self.A <= self.K, "A", f"must be at most --K {self.K} (candidates among the K codes)")
            need(self.A == 0 or self.variant == "qinco2", "A", "pre-selection needs a QINCo2 model (--model qinco2-*)")
        need(not (self.lowrank and self.variant == "qinco2"), "lowrank", "QINCo-LR is a QINCo v1 variant")
        for name in ("nt", "nval", "nb", "num_processes"):
            integer(name, 1, optional=True)
        integer("process_id", 0, optional=True)
        if isinstance(self.num_processes, int) and isinstance(self.process_id, int):
            need(self.process_id < self.num_processes, "process_id", f"must be below --num-processes {self.num_processes}")
        integer("batch_size", 1)
        integer("epochs", 1)
        integer("seed", 0, 2**32 - 1)
        integer("rq_beam_size", 1, optional=True)
        need(isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool) and math.isfinite(self.lr)
             and self.lr > 0, "lr", "must be a positive finite number")
        need(isinstance(self.workdir, str) and self.workdir.strip() != "", "workdir", "must name a folder")
        for name in ("db", "queries", "gt"):
            need(getattr(self, name) is None or self.train is not None, name, "is only used with --train")
        need(self.train is None or self.dataset == "synthetic", "dataset", "give either --dataset or --train, not both")
        return out


def flag(name: str) -> str:
    """The command-line spelling of a TrainConfig field (batch_size -> --batch-size)."""
    return "--" + name.replace("_", "-")


def short_value(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


# The built-in demo: synthetic 32-d data, sized to train in a few minutes on a 2-core laptop.
DEMO = dict(dataset="synthetic", K=64, M=4, L=2, h=64, lr=1e-3, epochs=100, workdir="runs/demo", init="original")


# Architecture presets of the QINCo2 code (its config/model_args/*.yaml), as TrainConfig fields; d
# comes from the data. The qinco2-* presets train with QINCo2's recipe and learning rate.
MODEL_PRESETS = {
    "qinco1": dict(variant="qinco1", L=16, h=256, A=0, B=1, M=8, K=256),
    "qinco2-S": dict(variant="qinco2", L=2, de=128, h=256, A=16, B=32, M=8, K=256, lr=8e-4),
    "qinco2-M": dict(variant="qinco2", L=4, de=384, h=384, A=16, B=32, M=8, K=256, lr=8e-4),
    "qinco2-L": dict(variant="qinco2", L=16, de=384, h=384, A=16, B=32, M=8, K=256, lr=8e-4),
}
INITS = ("original", "rq-exact")  # as qinco_jax.initialise.INITS (not imported here: --help runs without JAX)
INIT_ALIASES = {"default": "original"}  # the original init's name before rq-exact became the default on real data


def init_name(init):
    """The init's name, with the old alias "default" read as "original"."""
    return INIT_ALIASES.get(init, init) if isinstance(init, str) else init



# The command line's choices on real data where they differ from TrainConfig's (README, "Which init is the default")
REAL_DEFAULTS = dict(init="rq-exact")
RQ_EXACT_V1_LR = 3e-4  # QINCo v1 from the exact RQ start: 1e-3 first moves it uphill (README, "Training")
# QINCo2 on real data trains with a search of at most this many candidates and this beam when neither --train-A
# nor --train-B is given: at a fixed wall clock A 8, B 8 ended 12.5% lower than the preset's A 16, B 32 under the
# preset's own search (README, "Training search for a fixed budget")
TRAIN_SEARCH_MAX = 8


def training_search(merged: dict) -> dict:
    """train_A / train_B for a QINCo2 run on real data that gives neither: min(A, TRAIN_SEARCH_MAX) and
    min(B, TRAIN_SEARCH_MAX), None where that is the model's own (and for A = 0, no pre-selection)."""
    A, B = merged.get("A", TrainConfig.A), merged.get("B", TrainConfig.B)
    if merged.get("variant", TrainConfig.variant) != "qinco2" or not (isinstance(A, int) and isinstance(B, int)):
        return {}
    tA = min(A, TRAIN_SEARCH_MAX) if A > 0 else A
    tB = min(B, TRAIN_SEARCH_MAX)
    return dict(train_A=tA if tA != A else None, train_B=tB if tB != B else None)


def preset_fields(name: str) -> dict:
    """TrainConfig fields of a model preset (an unknown name is left to TrainConfig.problems)."""
    return {"preset": name, **MODEL_PRESETS.get(name, {})}


def architecture(name: str, d: int) -> dict:
    """QincoConfig fields of a preset for dimension d (the recipe's fields left out)."""
    return {"d": d, **{k: v for k, v in MODEL_PRESETS[name].items() if k != "lr"}}
