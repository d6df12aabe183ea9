"""Run settings of a training job (the model's architecture is a QincoConfig inside)."""

from __future__ import annotations

import dataclasses

from qinco_jax.model import QincoConfig


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
    K: int = 256
    M: int = 8
    L: int = 2
    h: int = 256
    lowrank: bool = False
    ivf: int = 0  # IVF-QINCo with this many centroids (0: plain QINCo); set from the file with ivf_centroids
    ivf_centroids: str | None = None  # IVF centroids (nlist, d), raw units; default: faiss k-means on the training set
    # recipe
    lr: float = 1e-3
    batch_size: int = 1024  # global batch, split over all devices of all processes
    epochs: int = 1000
    seed: int = 1234
    rq_beam_size: int = 1
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

    def model(self, d: int) -> QincoConfig:
        return QincoConfig(d=d, K=self.K, M=self.M, L=self.L, h=self.h, lowrank=self.lowrank, nlist=self.ivf)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The built-in demo: synthetic 32-d data, sized to train in a few minutes on a 2-core laptop.
DEMO = dict(dataset="synthetic", K=64, M=4, L=2, h=64, lr=1e-3, epochs=100, workdir="runs/demo")
