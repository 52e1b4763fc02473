"""The data layer: sources, grid operations, sample windows, statistics and torch datasets of one trial."""

from wxscale.data.dataset import DataBundle, EvaluationArrays, GridInfo, WindowDataset, build_datasets, grid_info
from wxscale.data.sources import open_source

__all__ = [
    "DataBundle",
    "EvaluationArrays",
    "GridInfo",
    "WindowDataset",
    "build_datasets",
    "grid_info",
    "open_source",
]
