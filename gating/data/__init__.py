"""Datasets and the federated split into per-node N-way tasks (plain numpy/torch, no Flower)."""

from gating.data.datasets import (
    DATASET_NAMES,
    FASHION_MNIST_DIR,
    DatasetError,
    ImageDataset,
    clear_dataset_cache,
    load_dataset,
    read_idx,
)
from gating.data.tasks import (
    Episode,
    NodeTask,
    TaskSpec,
    build_node_task,
    node_role,
    split_classes,
    task_from_site_data,
)

__all__ = [
    "DATASET_NAMES",
    "FASHION_MNIST_DIR",
    "DatasetError",
    "Episode",
    "ImageDataset",
    "NodeTask",
    "TaskSpec",
    "build_node_task",
    "clear_dataset_cache",
    "load_dataset",
    "node_role",
    "read_idx",
    "split_classes",
    "task_from_site_data",
]
