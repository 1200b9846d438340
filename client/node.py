"""What one node is: its task (from its partition or its own site data) and its model.

Everything here is cached per process and keyed by the values that determine it, because a
Ray worker serves many simulated nodes (DESIGN.md section 6: key caches by partition-id).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from client.data import NodeTask, TaskSpec, build_node_task, load_dataset
from client.meta import MetaConfig
from gating import GatedConvNet, ModelSpec


def task_spec(cfg: DictConfig) -> TaskSpec:
    holdout = cfg.task.holdout_classes
    return TaskSpec(
        ways=cfg.task.ways,
        shots=cfg.task.shots,
        queries=cfg.task.queries,
        train_pool=cfg.task.train_pool,
        target_nodes=cfg.federation.target_nodes,
        holdout_samples=cfg.task.holdout_samples,
        holdout_classes=holdout if holdout == "auto" else float(holdout),
    )


def node_task(cfg: DictConfig, node_config: dict[str, Any]) -> NodeTask:
    """This node's task: a simulation-style partition of the configured dataset."""
    partition_id = int(node_config["partition-id"])
    num_partitions = int(node_config["num-partitions"])
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


def model_spec(cfg: DictConfig, task: NodeTask) -> ModelSpec:
    channels, height, width = task.images.shape[1:]
    if height != width:
        raise ValueError(f"images must be square, got {height}x{width}")
    return ModelSpec(
        in_channels=channels,
        image_size=height,
        num_classes=cfg.task.ways,
        width=cfg.model.width,
        depth=cfg.model.depth,
        gate_hidden=cfg.model.gate_hidden,
        gate_bias=cfg.model.gate_bias,
    )


@lru_cache(maxsize=16)
def model_for(spec: ModelSpec) -> GatedConvNet:
    """A module used only as a function of given parameters (its own weights are never read)."""
    return GatedConvNet(spec)


def meta_config(cfg: DictConfig, reg_weight: float) -> MetaConfig:
    return MetaConfig(
        order=cfg.adapt.order,
        backbone_lr=cfg.adapt.backbone_lr,
        gate_lr=cfg.adapt.gate_lr,
        inner_steps=cfg.adapt.inner_steps,
        first_order=cfg.meta.first_order,
        gating=cfg.gating.enabled,
        target_ratio=cfg.gating.target_ratio,
        reg_weight=reg_weight,
        reg_where=cfg.gating.where,
        temperature=cfg.gating.temperature,
        train_gates=cfg.gating.train_gates,
    )


def seed_torch(*keys: int) -> None:
    """Seed torch (gate noise) from (seed, partition, round, ...): any node's round is
    reproducible on its own, which makes interrupted-and-resumed runs equal uninterrupted ones."""
    torch.manual_seed(int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0]))
