"""What one node is: its task, from its partition of the run's dataset or its own site data.

Everything here is cached per process and keyed by the values that determine it, because a
Ray worker serves many simulated nodes (DESIGN.md section 6: key caches by partition-id).
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from gating.data import (
    DatasetError,
    ImageDataset,
    NodeTask,
    TaskSpec,
    build_node_task,
    load_dataset,
    task_from_site_data,
)
from gating.federated.settings import task_spec

#: node-config keys of a real site (a SuperNode with its own data); see docs/deploy.md.
DATA_PATH, ROLE, DATA_FORMAT, PARTITION_ID, NUM_PARTITIONS = (
    "data-path",
    "role",
    "data-format",
    "partition-id",
    "num-partitions",
)
SITE_ROLES = ("train", "target")


def node_task(cfg: DictConfig, node_config: dict[str, Any]) -> NodeTask:
    """This node's task: from its own site data when ``data-path`` is in its node config (a
    deployed SuperNode), else a simulation-style partition of the configured dataset."""
    if DATA_PATH in node_config:
        return site_task(cfg, node_config)
    missing = [k for k in (PARTITION_ID, NUM_PARTITIONS) if k not in node_config]
    if missing:
        raise ValueError(
            f"this node's --node-config lacks {', '.join(missing)}: give a real site "
            f'data-path="..." role="train"|"target", or partition-id=I num-partitions=N '
            "for a split of the run's dataset"
        )
    partition_id = int(node_config[PARTITION_ID])
    num_partitions = int(node_config[NUM_PARTITIONS])
    expected = cfg.federation.train_nodes + cfg.federation.target_nodes
    if num_partitions != expected:
        raise ValueError(
            f"this node was started with num-partitions={num_partitions}, but the run expects "
            f"federation.train_nodes + federation.target_nodes = {expected}"
        )
    return _cached_task(
        cfg.dataset.name,
        cfg.dataset.path,
        cfg.dataset.image_size,
        task_spec(cfg),
        cfg.seed,
        partition_id,
        num_partitions,
    )


def partition_task(cfg: DictConfig, partition: int) -> NodeTask:
    """Partition ``partition`` of the run's dataset, as a simulated node of this run holds it
    (``num-partitions`` = training + target nodes): what the tools rebuild a node from."""
    fed = cfg.federation
    return node_task(
        cfg,
        {PARTITION_ID: partition, NUM_PARTITIONS: fed.train_nodes + fed.target_nodes},
    )


def site_task(cfg: DictConfig, node_config: dict[str, Any]) -> NodeTask:
    """The task of a real site: its own files at ``data-path``, in its ``role``.

    ``data-format`` defaults to the run's ``dataset.name``, or, when that is ``digits`` (which
    has no files), is inferred from the path. ``partition-id`` (optional) names the site; without
    it the id is a hash of the site's data, stable across restarts and distinct between sites.
    Any problem raises a :class:`DatasetError` naming the node-config key: the server then
    leaves this node out and logs the reason.
    """
    path = str(node_config[DATA_PATH])
    role = str(node_config.get(ROLE, ""))
    if role not in SITE_ROLES:
        raise DatasetError(
            f'this site (data-path="{path}") needs role="train" or role="target" in its '
            f"--node-config, got {node_config.get(ROLE)!r}"
        )
    fmt = str(node_config.get(DATA_FORMAT) or site_format(cfg, path))
    site_id = node_config.get(PARTITION_ID)
    if site_id is not None and (isinstance(site_id, bool) or not isinstance(site_id, int)):
        raise DatasetError(f"node-config partition-id={site_id!r} must be a non-negative integer")
    try:
        return _cached_site_task(
            fmt,
            os.path.abspath(os.path.expanduser(path)),
            cfg.dataset.image_size,
            task_spec(cfg),
            cfg.seed,
            None if site_id is None else int(site_id),
            role,
        )
    except DatasetError as error:
        raise DatasetError(
            f'site data (node-config data-path="{path}", data-format="{fmt}"): {error}'
        ) from error


def site_format(cfg: DictConfig, path: str) -> str:
    """The format of a site's data when its node config names none (see :func:`site_task`):
    the run's dataset, or, for the embedded digits (no files), inferred from the path."""
    if cfg.dataset.name != "digits":
        return str(cfg.dataset.name)
    where = Path(os.path.expanduser(path))
    if where.is_file() and where.suffix == ".npz":
        return "npz"
    if where.is_dir():
        names = {p.name.removesuffix(".gz") for p in where.iterdir()}
        if "train-images-idx3-ubyte" in names:
            return "mnist"
        classes = [p for p in where.iterdir() if p.is_dir()]
        flat = any(f.is_file() for c in classes for f in c.iterdir())
        return "imagefolder" if flat else "omniglot"
    problem = "does not exist" if not where.exists() else "is neither a .npz file nor a folder"
    raise DatasetError(
        f'node-config data-path="{path}" {problem}; give a .npz file, a folder of MNIST-format '
        "IDX files, an image folder (class/*.png) or an Omniglot-style folder "
        '(alphabet/character/*.png), and data-format="..." if the run\'s dataset.name does '
        "not say which"
    )


@lru_cache(maxsize=8)
def _cached_site_task(
    fmt: str,
    path: str,
    image_size: int | None,
    spec: TaskSpec,
    seed: int,
    site_id: int | None,
    role: str,
) -> NodeTask:
    dataset = load_dataset(fmt, path, image_size)
    if site_id is None:
        site_id = data_site_id(dataset)
    return task_from_site_data(dataset, spec, seed, site_id, role)


def data_site_id(dataset: ImageDataset) -> int:
    """A stable id for a site that names none: a hash of its images and labels (31 bits, so it
    fits every integer field on the way to the server)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(np.ascontiguousarray(dataset.labels).tobytes())
    digest.update(np.ascontiguousarray(dataset.images).tobytes())
    return int.from_bytes(digest.digest(), "big") % 2**31


@lru_cache(maxsize=256)
def _cached_task(
    name: str,
    path: str | None,
    image_size: int | None,
    spec: TaskSpec,
    seed: int,
    partition_id: int,
    num_partitions: int,
) -> NodeTask:
    dataset = load_dataset(name, path, image_size)
    return build_node_task(dataset, spec, seed, partition_id, num_partitions)
