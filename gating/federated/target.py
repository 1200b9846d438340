"""A target node's one ``Adapt``, as its ClientApp evaluates it: the single place that rebuilds it.

Evaluation (the figures a run reports), the export tool, the gate maps and the inference
benchmarks all need the same adapted network; computing it here once keeps what they show equal
to what the run reported (same fixed episode, same gate-noise seed stream, same λ, same frozen
norm statistics).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import Tensor

from gating.data import NodeTask
from gating.federated.settings import meta_config, model_for, model_spec, seed_torch
from gating.meta import Batch, MetaConfig, adapt, deployed_stats, network_params
from gating.model import GatedModel, ModelSpec, NormStats

Params = dict[str, Tensor]


@dataclass(frozen=True)
class AdaptedNode:
    """A target node after its ``Adapt``, with everything needed to classify as it does."""

    task: NodeTask
    spec: ModelSpec
    model: GatedModel
    meta_cfg: MetaConfig
    support: Batch
    query: Batch
    initial: Params  # the meta-initialization it adapted from (detached, on its device)
    adapted: Params  # the network after the one two-stage Adapt (no step sizes)
    stats: NormStats  # where a deployed node's norms take statistics from, one input at a time


def adapt_target_node(
    cfg: DictConfig,
    task: NodeTask,
    params: Mapping[str, Tensor],
    server_round: int,
    reg_weight: float,
    device: torch.device | str = "cpu",
) -> AdaptedNode:
    """One ``Adapt`` of ``task``'s node from ``params`` on its fixed support episode, exactly as
    its ClientApp evaluates it in ``server_round`` with λ = ``reg_weight``; the caller's torch
    random state is left as it was."""
    spec = model_spec(cfg, task)
    model = model_for(spec)
    meta_cfg = meta_config(cfg, reg_weight)
    episode = task.fixed_episode()
    support = Batch(episode.support_x.to(device), episode.support_y.to(device))
    query = Batch(episode.query_x.to(device), episode.query_y.to(device))
    initial = {n: t.detach().to(device=device, dtype=torch.float32) for n, t in params.items()}
    device = torch.device(device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        # the gate noise of this node's evaluation in this round (its training update: key 0)
        seed_torch(cfg.seed, task.partition_id, server_round, 1)
        adapted = network_params(adapt(model, initial, support, meta_cfg))
    stats = deployed_stats(model, adapted, support.x, meta_cfg)
    return AdaptedNode(task, spec, model, meta_cfg, support, query, initial, adapted, stats)
