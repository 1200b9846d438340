"""A sampled client's half of a round, one function per kind of update (the registry below).

Each function takes the round's meta-initialization and the node's task and returns the
direction the server averages, the example count it is weighted by and what the client saw.
The ClientApp, the bare benchmark loop and the tests all call :func:`client_update`; a strategy's
``conf.choices.TRAITS`` entry says which kind of update it sends, so a strategy that sends an
existing kind needs no code here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from conf.choices import TRAITS, StrategyName, UpdateKind
from gating.data import NodeTask
from gating.federated.settings import (
    episode_rng,
    meta_config,
    model_for,
    model_spec,
    resolve_device,
    seed_torch,
)
from gating.meta import (
    Batch,
    fedavg_update,
    meta_gradients,
    meta_gradients_batched,
    perfedavg_update,
    reptile_update,
)

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


def _on_cpu(update: Params) -> Params:
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
        update=_on_cpu(
            {n: torch.stack([s.grads[n] for s in steps]).mean(0) for n in steps[0].grads}
        ),
        examples=len(steps) * spec.ways * spec.queries,
        loss=float(np.mean([s.query_loss for s in steps])),
        accuracy=float(np.mean([s.query_accuracy for s in steps])),
        flops_ratio=float(np.mean([s.flops_ratio for s in steps])),
        deployed_flops_ratio=float(np.mean([s.deployed_flops_ratio for s in steps])),
    )


def _merged(support: Batch, query: Batch) -> Batch:
    return Batch(torch.cat([support.x, query.x]), torch.cat([support.y, query.y]))


def fedavg_client_update(job: ClientRound) -> ClientUpdate:
    """FedAvg: ``local.steps`` SGD steps on fresh local batches; sends ``θ - θ_local``."""
    cfg = job.cfg
    model = model_for(model_spec(cfg, job.task))
    draw = job.episodes()
    step = fedavg_update(
        model,
        job.initial(),
        lambda: _merged(*draw()),
        meta_config(cfg, job.reg_weight),
        cfg.local.lr,
        cfg.local.steps,
    )
    return ClientUpdate(
        _on_cpu(step.update), cfg.local.steps * job.task.spec.ways, step.loss, step.accuracy, 1.0
    )


def perfedavg_client_update(job: ClientRound) -> ClientUpdate:
    """Per-FedAvg (Hessian-free, or first order with ``meta.first_order``); sends
    ``θ - θ_local``. Its inner step α is ``adapt.backbone_lr``, its outer step β ``local.lr``."""
    cfg = job.cfg
    model = model_for(model_spec(cfg, job.task))
    draw = job.episodes()
    step = perfedavg_update(
        model,
        job.initial(),
        lambda: (*draw(), draw()[0]),
        meta_config(cfg, job.reg_weight),
        alpha=cfg.adapt.backbone_lr,
        beta=cfg.local.lr,
        steps=cfg.local.steps,
        hessian_free=not cfg.meta.first_order,
        delta=cfg.local.hessian_delta,
    )
    return ClientUpdate(
        _on_cpu(step.update), cfg.local.steps * job.task.spec.ways, step.loss, step.accuracy, 1.0
    )


def reptile_client_update(job: ClientRound) -> ClientUpdate:
    """Reptile: per episode (``task.tasks_per_client``), the target nodes' ``Adapt`` on all its
    labelled examples (support and query); sends the mean ``θ - W``."""
    cfg = job.cfg
    draw = job.episodes()
    step = reptile_update(
        model_for(model_spec(cfg, job.task)),
        job.initial(),
        [_merged(*draw()) for _ in range(cfg.task.tasks_per_client)],
        meta_config(cfg, job.reg_weight),
    )
    return ClientUpdate(_on_cpu(step.update), expected_examples(cfg), step.loss, step.accuracy, 1.0)


def expected_examples(cfg: DictConfig) -> int:
    """The examples an honest client's update rests on: what the server bounds claims by."""
    update = TRAITS[StrategyName(cfg.strategy.name)].update
    if update is UpdateKind.reptile:
        return cfg.task.tasks_per_client * cfg.task.ways * (cfg.task.shots + cfg.task.queries)
    if TRAITS[StrategyName(cfg.strategy.name)].reads_local:
        return cfg.local.steps * cfg.task.ways
    return cfg.task.tasks_per_client * cfg.task.ways * cfg.task.queries


CLIENT_UPDATES: dict[UpdateKind, Callable[[ClientRound], ClientUpdate]] = {
    UpdateKind.meta_gradient: meta_gradient_update,
    UpdateKind.local_sgd: fedavg_client_update,
    UpdateKind.perfedavg_steps: perfedavg_client_update,
    UpdateKind.reptile: reptile_client_update,
}


def client_update(job: ClientRound) -> ClientUpdate:
    """The update that ``job.cfg.strategy.name`` sends (its ``conf.choices.TRAITS`` entry)."""
    return CLIENT_UPDATES[TRAITS[StrategyName(job.cfg.strategy.name)].update](job)
