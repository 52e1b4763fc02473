"""The data layer: sources, grid operations, sample windows, statistics and torch datasets of one trial."""

from wxscale.data.dataset import DataBundle, EvaluationArrays, GridInfo, WindowDataset, build_datasets, grid_info
from wxscale.data.sources import open_source
from wxscale.data.stream import StreamingBundle, StreamingWindows, build_streaming, load_trial_data

__all__ = [
    "DataBundle",
    "EvaluationArrays",
    "GridInfo",
    "StreamingBundle",
    "StreamingWindows",
    "WindowDataset",
    "build_datasets",
    "build_streaming",
    "grid_info",
    "load_trial_data",
    "open_source",
]
