"""Vector data: file formats (memory-mapped), the paper's datasets, synthetic demo data, epoch batches."""

from qinco_jax.data.datasets import Dataset, batches, check_groundtruth, load_dataset, load_files
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
    "synthetic",
    "write_vectors",
]
