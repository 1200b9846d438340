"""Datasets and the federated split into per-node N-way tasks (plain numpy/torch, no Flower)."""

from __future__ import annotations

from typing import Any

from gating.data.datasets import (
    DATASET_NAMES,
    DEFAULT_IMAGEFOLDER_SIZE,
    FASHION_MNIST_DIR,
    IMAGEFOLDER_EXTENSIONS,
    DatasetError,
    ImageDataset,
    clear_dataset_cache,
    decode_pixels,
    encode_pixels,
    load_dataset,
    pixel_encoding,
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
    "DEFAULT_IMAGEFOLDER_SIZE",
    "FASHION_MNIST_DIR",
    "IMAGEFOLDER_EXTENSIONS",
    "DatasetError",
    "Episode",
    "ImageDataset",
    "NodeTask",
    "TaskSpec",
    "build_node_task",
    "class_split",
    "clear_dataset_cache",
    "decode_pixels",
    "encode_pixels",
    "load_dataset",
    "node_role",
    "pixel_encoding",
    "read_idx",
    "split_classes",
    "task_from_site_data",
]


def class_split(dataset: ImageDataset, spec: TaskSpec, seed: int) -> dict[str, Any]:
    """The classes training and target nodes draw from, by name, ready to be written as JSON.

    The same split :func:`build_node_task` uses (:func:`split_classes` of the dataset's class
    count, ``spec`` and ``seed``), so a run folder can record which classes were meta-training
    and which meta-test classes. Keys: ``dataset``, ``seed``, ``num_classes``,
    ``holdout_classes`` (the resolved fraction), ``disjoint`` (true when the two sides share no
    class), ``train`` and ``target`` (class names in class-id order). With ``disjoint`` false no
    class is held out (e.g. "auto" on fewer than 4 x ways classes): both lists then hold every
    class, and the two sides are disjoint in samples only.
    """
    train, target = split_classes(dataset.num_classes, spec, seed)
    return {
        "dataset": dataset.name,
        "seed": int(seed),
        "num_classes": dataset.num_classes,
        "holdout_classes": spec.holdout_class_fraction(dataset.num_classes),
        "disjoint": not bool(set(train.tolist()) & set(target.tolist())),
        "train": [dataset.class_names[c] for c in train.tolist()],
        "target": [dataset.class_names[c] for c in target.tolist()],
    }
