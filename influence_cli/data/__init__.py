"""Datasets from a data spec: sources, subsets, label noise, transforms and loaders.

Every example keeps its *global index*, its position in the original source before
any subsetting, so that scores, reports and shards always name the same example.
In-memory sources (IDX files, tensors files, CSV files, torchvision arrays, factory tensors)
hold one raw tensor and serve whole batches through `IndexedDataset.__getitems__`;
lazy sources (image folders, factory datasets) load one example at a time.
"""

from influence_cli.data.dataset import BUILTIN_SOURCES, IndexedDataset, example_image, load_dataset
from influence_cli.data.loading import collate_batch, make_loader, shard_bounds

__all__ = [
    "BUILTIN_SOURCES", "IndexedDataset", "collate_batch", "example_image", "load_dataset", "make_loader", "shard_bounds",
]  # fmt: skip
