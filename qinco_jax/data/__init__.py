"""Vector data: file formats (memory-mapped), the paper's datasets, synthetic demo data, epoch batches."""

from qinco_jax.data.datasets import (Dataset, batches, check_groundtruth, load_dataset, load_files, sample_rows,
                                     streamed_max)
from qinco_jax.data.formats import FORMATS, read_groundtruth, read_vectors, write_vectors
from qinco_jax.data.synth import synthetic

__all__ = [
    "FORMATS",
    "Dataset",
    "batches",
    "check_groundtruth",
    "load_dataset",
    "load_files",
    "read_groundtruth",
    "read_vectors",
    "sample_rows",
    "streamed_max",
    "synthetic",
    "write_vectors",
]
