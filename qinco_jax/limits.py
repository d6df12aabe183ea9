"""Resource budgets of every checkpoint read (.pt archives and codec directories).

A file that needs more than a budget is refused with CheckpointError before the memory or time is
spent. The defaults are far above what any official checkpoint needs: the largest, QINCo2-L at
16 bytes on Contriever, has about 100M float32 parameters (~400 MB) in a few thousand tensors and a
data.pkl of well under 1 MB. Peak memory of a load stays within a small multiple (about 3x) of
`max_total_bytes`.
"""

from __future__ import annotations

import dataclasses
import time

from qinco_jax.checks import CheckpointError, short


@dataclasses.dataclass(frozen=True)
class Limits:
    """Budgets of one checkpoint read. All sizes in bytes."""

    max_file_bytes: int = 8 << 30  # size of a .pt file on disk
    max_records: int = 100_000  # records (zip entries / files) in an archive or a params directory
    max_directory_bytes: int = 64 << 20  # size of a zip's central directory
    max_record_bytes: int = 2 << 30  # one decompressed record (a storage)
    max_compression_ratio: int = 64  # decompressed / compressed size of a record (torch stores them uncompressed)
    max_total_bytes: int = 4 << 30  # everything decompressed and every tensor materialised, in total
    max_pickle_bytes: int = 16 << 20  # data.pkl (a real model's is well under 1 MB)
    max_pickle_ops: int = 4_000_000  # opcodes run (each creates at most one object)
    max_items: int = 4_000_000  # elements put in containers, in total
    max_container_items: int = 1_000_000  # elements of one list / tuple / dict / set
    max_refs_per_record: int = 256  # tensors or storages that reference one storage record
    max_depth: int = 64  # nesting of containers and module records
    max_params: int = 1 << 30  # parameters a codec configuration may declare (4 GiB of float32)
    max_dim: int = 1 << 16  # d and h of a configuration
    max_steps: int = 1024  # M (a file's M sizes loops and shape computations)
    max_blocks: int = 256  # L
    max_json_bytes: int = 1 << 20  # a codec directory's metadata file
    max_index_bytes: int = 64 << 20  # any other file of a params directory but its array data (orbax's _METADATA...)
    max_json_depth: int = 16
    max_seconds: float = 300.0  # wall-clock time of one read

    def deadline(self) -> "Deadline":
        return Deadline(self.max_seconds)


DEFAULT = Limits()


class Deadline:
    """The time budget of one read: check() raises once it is spent."""

    def __init__(self, seconds: float):
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def check(self, what: str) -> None:
        if time.monotonic() > self.end:
            raise CheckpointError(f"{what}: reading took longer than the {self.seconds:g} s budget; refused")


class Budget:
    """A running total against a limit (bytes decompressed, items stored...)."""

    def __init__(self, limit: int, what: str):
        self.limit, self.what, self.used = limit, what, 0

    def take(self, n: int, where: str) -> None:
        self.used += n
        if self.used > self.limit:
            raise CheckpointError(f"{where}: {self.what} exceed the budget of {self.limit:,}; refused")


def check_config(cfg, what: str, limits: Limits = DEFAULT) -> None:
    """Refuse a model configuration from a file whose size is out of budget, before any shape is computed.

    cfg: a QincoConfig (d, K, M, L, h, nlist and num_params()).
    """
    for name, hi in (("d", limits.max_dim), ("h", limits.max_dim), ("emb", limits.max_dim), ("M", limits.max_steps),
                     ("L", limits.max_blocks)):
        value = getattr(cfg, name)
        if value > hi:
            raise CheckpointError(f"{what}: {name} = {short(value)} is over the budget of {hi:,}; refused")
    n = cfg.num_params() + cfg.nlist * cfg.d  # the frozen IVF centroids count too
    if n > limits.max_params:
        raise CheckpointError(f"{what}: the configuration declares {n:,} parameters, over the budget of "
                              f"{limits.max_params:,}; refused")
