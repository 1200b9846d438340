"""A sampled client's half of a round: what every strategy's update takes and gives, and the
meta-gradient update the MAML family shares.

An update function takes the round's meta-initialization and the node's task (a
:class:`ClientRound`) and returns the direction the server averages, the example count it is
weighted by and what the client saw (a :class:`ClientUpdate`). Each strategy's record
(``gating.federated.strategies``) names its function; the ClientApp, the bare loop and the
tests call :func:`client_update`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from gating.data import NodeTask
from gating.federated.settings import (
    episode_rng,
    meta_config,
    model_for,
    model_spec,
    resolve_device,
    seed_torch,
)
from gating.federated.strategies import strategy_of
from gating.meta import Batch, LocalStep, meta_gradients, meta_gradients_batched

Params = dict[str, Tensor]


@dataclass
class ClientUpdate:
    update: Params  # per learned parameter: the direction the server averages
    examples: int  # the weight of this update in the server's mean
    loss: float  # on the client's query data, after adaptation (or local training)
    accuracy: float
    flops_ratio: float  # realized / dense MACs of those forward passes (1.0 when dense)
    # what the deterministic gates a deployed node runs would cost on those queries; the
    # server's budget controller reads it (1.0 when dense)
    deployed_flops_ratio: float = 1.0


@dataclass(frozen=True)
class ClientRound:
    """Everything a client's update depends on."""

    cfg: DictConfig
    task: NodeTask
    params: Params  # the round's meta-initialization
    server_round: int
    reg_weight: float  # λ of this round (the server applies the warm-up)

    @property
    def device(self) -> torch.device:
        return resolve_device(self.cfg.device)

    def initial(self) -> Params:
        """The meta-initialization on the client's device."""
        return {n: t.to(self.device) for n, t in self.params.items()}

    def episodes(self) -> Callable[[], tuple[Batch, Batch]]:
        """Fresh (support, query) draws on the client's device, seeded by (seed, partition,
        round); seeds the gate noise the same way, so any round of any node is reproducible
        on its own (on a given device: CUDA draws other noise than the CPU)."""
        keys = (self.cfg.seed, self.task.partition_id, self.server_round)
        seed_torch(*keys)
        rng = episode_rng(*keys)
        device = self.device

        def draw() -> tuple[Batch, Batch]:
            episode = self.task.episode(rng)
            return (
                Batch(episode.support_x.to(device), episode.support_y.to(device)),
                Batch(episode.query_x.to(device), episode.query_y.to(device)),
            )

        return draw


def on_cpu(update: Params) -> Params:
    """Payloads travel as CPU arrays."""
    return {n: t.detach().cpu() for n, t in update.items()}


def meta_gradient_update(job: ClientRound) -> ClientUpdate:
    """MetaGater and FedMeta: the mean meta-gradient over ``task.tasks_per_client`` episodes
    (one vmapped computation with ``task.batched``)."""
    cfg, spec = job.cfg, job.task.spec
    model = model_for(model_spec(cfg, job.task))
    meta_cfg = meta_config(cfg, job.reg_weight, job.server_round)
    draw = job.episodes()
    initial = job.initial()
    episodes = [draw() for _ in range(cfg.task.tasks_per_client)]
    if cfg.task.batched:
        steps = meta_gradients_batched(model, initial, episodes, meta_cfg)
    else:
        steps = [meta_gradients(model, initial, s, q, meta_cfg) for s, q in episodes]
    return ClientUpdate(
        update=on_cpu(
            {n: torch.stack([s.grads[n] for s in steps]).mean(0) for n in steps[0].grads}
        ),
        examples=len(steps) * spec.ways * spec.queries,  # strategies.meta_gradient_examples
        loss=float(np.mean([s.query_loss for s in steps])),
        accuracy=float(np.mean([s.query_accuracy for s in steps])),
        flops_ratio=float(np.mean([s.flops_ratio for s in steps])),
        deployed_flops_ratio=float(np.mean([s.deployed_flops_ratio for s in steps])),
    )


def merged(support: Batch, query: Batch) -> Batch:
    """All the labelled examples of an episode, for the strategies that train on them."""
    return Batch(torch.cat([support.x, query.x]), torch.cat([support.y, query.y]))


def local_reply(step: LocalStep, examples: int) -> ClientUpdate:
    """What a strategy that trains locally sends: ``θ - θ_local``, dense (MAC ratio 1)."""
    return ClientUpdate(on_cpu(step.update), examples, step.loss, step.accuracy, 1.0)


def client_update(job: ClientRound) -> ClientUpdate:
    """The update that ``job.cfg.strategy.name`` sends (its record's ``update``)."""
    return strategy_of(job.cfg).update(job)
