"""Reptile (Nichol et al. 2018) of the dense backbone.

A sampled node runs a target node's ``Adapt`` (``adapt.inner_steps`` steps of α) on all the
labelled examples of an episode, support and query, and sends θ - W; the server's optimizer
steps along the mean. Its YAML sets several inner steps: with one, Reptile is joint training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from omegaconf import DictConfig
from torch import Tensor

from gating.federated.settings import meta_config, model_for, model_spec
from gating.federated.strategies import GATE_KEYS, LOCAL_KEYS, SENDS_LOCAL_WEIGHTS, Strategy
from gating.federated.updates import ClientRound, ClientUpdate, local_reply, merged
from gating.meta import Batch, LocalStep, MetaConfig, accuracy, adapt, task_loss
from gating.model import BACKBONE, GatedModel, group_of


def reptile_update(
    model: GatedModel, initial: Mapping[str, Tensor], episodes: Sequence[Batch], cfg: MetaConfig
) -> LocalStep:
    """Per episode W = ``Adapt(θ; episode)``; the mean of θ - W over the episodes. Loss and
    accuracy: on each episode after its adaptation, averaged."""
    start = {n: t.detach() for n, t in initial.items()}
    learned = [n for n in start if group_of(n) == BACKBONE]
    updates, losses, correct = [], [], []
    for batch in episodes:
        adapted = adapt(model, start, batch, cfg)
        updates.append({n: start[n] - adapted[n] for n in learned})
        with torch.no_grad():
            loss, out = task_loss(model, adapted, batch, cfg, regularize=False)
        losses.append(float(loss))
        correct.append(accuracy(out.logits, batch.y))
    return LocalStep(
        update={n: torch.stack([u[n] for u in updates]).mean(0) for n in learned},
        loss=sum(losses) / len(losses),
        accuracy=sum(correct) / len(correct),
    )


def client_update(job: ClientRound) -> ClientUpdate:
    """One episode per ``task.tasks_per_client``, each adapted from the meta-initialization."""
    cfg = job.cfg
    draw = job.episodes()
    step = reptile_update(
        model_for(model_spec(cfg, job.task)),
        job.initial(),
        [merged(*draw()) for _ in range(cfg.task.tasks_per_client)],
        meta_config(cfg, job.reg_weight),
    )
    return local_reply(step, examples(cfg))


def examples(cfg: DictConfig) -> int:
    return cfg.task.tasks_per_client * cfg.task.ways * (cfg.task.shots + cfg.task.queries)


STRATEGY = Strategy(
    name="reptile",
    update=client_update,
    examples=examples,
    fixes=SENDS_LOCAL_WEIGHTS,  # W starts from the meta-initialization's own head
    unread=(*GATE_KEYS, *LOCAL_KEYS, "meta.first_order"),
)
