"""Data: lazy HDF5/Zarr pair datasets, patches, splits, streamed normalisation, a Zarr result writer,
pairs simulated on the fly."""
from .arrays import ArraySource, open_array, storage_format
from .loader import BatchLoader
from .normalization import DataMoments, Normalization, compute_normalization, data_moments
from .pairs import PairDataset, open_pairs
from .quality import DataWarning, warn_about_data
from .shard import Shard
from .simulated import SimulatedPairs, load_entry_point, simulated_set
from .split import train_validation_split
from .writer import ZarrResultWriter, chunk_aligned_range

__all__ = [
    "ArraySource", "open_array", "storage_format", "PairDataset", "open_pairs", "Normalization",
    "compute_normalization", "data_moments", "DataMoments", "Shard", "DataWarning", "warn_about_data",
    "train_validation_split", "BatchLoader", "ZarrResultWriter", "chunk_aligned_range",
    "SimulatedPairs", "simulated_set", "load_entry_point",
]
