"""The architecture of a QINCo codec (v1 or QINCo2): QincoConfig."""

from __future__ import annotations

import dataclasses

VARIANTS = ("qinco1", "qinco2")


@dataclasses.dataclass(frozen=True)
class QincoConfig:
    """Architecture of a QINCo codec.

    Args:
      d: vector dimension.
      K: codebook size per step (256 gives one byte per step).
      M: number of quantization steps (codes per vector).
      L: residual blocks per step network.
      h: hidden width of the residual blocks (QINCo2's dh; also the rank of QINCo-LR's concat block).
      lowrank: QINCo-LR: the concat Linear 2d->d becomes 2d->h->d without bias (qinco1 only).
      variant: "qinco1" (the ICML 2024 step) or "qinco2" (embedding width de, outer skip).
      de: QINCo2 embedding width (None: d, with identity projections).
      A: default pre-selected candidates per beam; A > 0 gives each step a pre-selection codebook
        (0: no pre-selection, all K candidates are evaluated).
      B: default beam width (1: greedy).
      nlist: 0 for plain QINCo. > 0 for IVF-QINCo (the original's IVFQINCo): step 0 is a frozen table
        of nlist centroids (code column 0 is the list id) followed by M full QINCo steps, so codes have
        M + 1 columns.
    """

    d: int
    K: int = 256
    M: int = 8
    L: int = 2
    h: int = 256
    lowrank: bool = False
    variant: str = "qinco1"
    de: int | None = None
    A: int = 0
    B: int = 1
    nlist: int = 0

    def __post_init__(self):
        for name, low in (("d", 1), ("K", 2), ("M", 1), ("L", 0), ("h", 1), ("A", 0), ("B", 1), ("nlist", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"QincoConfig.{name} must be an int, got {value!r}")
            if value < low:
                raise ValueError(f"QincoConfig.{name} must be >= {low}, got {value}")
        if self.K > 65536:
            raise ValueError(f"QincoConfig.K must be <= 65536 (codes are stored as uint16), got {self.K}")
        if not isinstance(self.lowrank, bool):
            raise TypeError(f"QincoConfig.lowrank must be a bool, got {self.lowrank!r}")
        if self.nlist >= 1 << 31:
            raise ValueError(f"QincoConfig.nlist must be < 2**31 (list ids are int32), got {self.nlist}")
        if self.variant not in VARIANTS:
            raise ValueError(f"QincoConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.de is not None:
            if isinstance(self.de, bool) or not isinstance(self.de, int) or self.de < 1:
                raise ValueError(f"QincoConfig.de must be a positive int or None, got {self.de!r}")
            if self.variant == "qinco1" and self.de != self.d:
                raise ValueError(f"QincoConfig.de = {self.de}: QINCo v1 steps work in width d = {self.d}")
        if self.A > self.K:
            raise ValueError(f"QincoConfig.A = {self.A} pre-selected candidates is more than the K = {self.K} codes")
        if self.A and self.variant != "qinco2":
            raise ValueError(f"QincoConfig.A = {self.A}: pre-selection codebooks are a QINCo2 feature (variant='qinco2')")
        if self.variant == "qinco2" and self.lowrank:
            raise ValueError("QincoConfig.lowrank (QINCo-LR) is a QINCo v1 variant, not available with qinco2")

    @property
    def num_codes(self) -> int:
        """Columns of a full code matrix: M, plus the list id for IVF."""
        return self.M + 1 if self.nlist else self.M

    @property
    def num_steps(self) -> int:
        """Neural steps after step 0 (step_1 .. step_{num_steps})."""
        return self.num_codes - 1

    @property
    def emb(self) -> int:
        """Width of the step networks (de for QINCo2, d for v1)."""
        return self.de or self.d

    @property
    def dh(self) -> int:
        """Hidden width of the residual blocks (QINCo2's name for h)."""
        return self.h

    @property
    def preselect(self) -> bool:
        """Whether the steps carry a pre-selection codebook."""
        return self.A > 0

    @property
    def code_dtype(self):
        """Smallest unsigned integer type that holds every code (the IVF list ids included)."""
        import numpy as np

        top = max(self.K, self.nlist)
        return np.uint8 if top <= 256 else np.uint16 if top <= 65536 else np.uint32

    def step_params(self) -> int:
        """Trainable parameters of one networked step's network (codebooks excluded)."""
        d, e, h = self.d, self.emb, self.h
        if self.variant == "qinco2":
            return (e + d) * e + e + 2 * self.L * e * h + (2 * d * e if e != d else 0)
        concat = 2 * d * h + h * d if self.lowrank else 2 * d * d + d
        return concat + 2 * self.L * d * h

    def num_params(self) -> int:
        """Number of trainable parameters (same count as the original's; IVF centroids are frozen
        and not counted: the parameter tree holds nlist * d more)."""
        books = self.K * self.d * (2 if self.preselect else 1)
        first = 0 if self.nlist else self.K * self.d
        return first + self.num_steps * (books + self.step_params())

    def encode_flops_per_vector(self, A: int | None = None, B: int | None = None) -> int:
        """Multiply-adds x2 of encoding with the split concat algebra (the dominant terms).

        A, B: the search (default the config's); per-step work independent of the vectors is left out.
        """
        A = self.A if A is None else A
        B = self.B if B is None else B
        d, e, K, h = self.d, self.emb, self.K, self.h
        out_proj = 2 * e * d if e != d else 0
        # per candidate: the residual blocks (the first block's input projection is split per
        # codeword / per beam), the out-projection and the distance
        per_cand = 2 * e * h * max(0, 2 * self.L - 1) + (h if self.L else 0) + 3 * d + out_proj
        per_beam = 2 * (2 * d * h if self.lowrank else d * e) + (2 * e * h if self.L else 0)
        per_beam += 3 * K * d if A else 0  # pre-selection distances
        first = 2 * self.nlist * d if self.nlist else 3 * K * d
        return first + self.num_steps * B * ((A or K) * per_cand + per_beam)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QincoConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown QincoConfig fields: {sorted(unknown)}")
        return cls(**d)
