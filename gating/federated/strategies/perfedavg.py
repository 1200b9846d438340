"""Per-FedAvg (Fallah et al. 2020) of the dense backbone: Hessian-free (the Hessian-vector
product exact, or the paper's central difference with ``local.hessian_delta`` > 0), or first
order with ``meta.first_order``. Its inner step α is ``adapt.backbone_lr``, its outer step β
``local.lr``; θ - θ_local is sent."""

from __future__ import annotations

from gating.federated.settings import meta_config, model_for, model_spec
from gating.federated.strategies import (
    GATE_KEYS,
    SENDS_LOCAL_WEIGHTS,
    Strategy,
    local_training_examples,
)
from gating.federated.updates import ClientRound, ClientUpdate, local_reply
from gating.meta import perfedavg_update


def client_update(job: ClientRound) -> ClientUpdate:
    cfg = job.cfg
    draw = job.episodes()
    step = perfedavg_update(
        model_for(model_spec(cfg, job.task)),
        job.initial(),
        lambda: (*draw(), draw()[0]),
        meta_config(cfg, job.reg_weight),
        alpha=cfg.adapt.backbone_lr,
        beta=cfg.local.lr,
        steps=cfg.local.steps,
        hessian_free=not cfg.meta.first_order,
        delta=cfg.local.hessian_delta,
    )
    return local_reply(step, local_training_examples(cfg))


STRATEGY = Strategy(
    name="perfedavg",
    update=client_update,
    examples=local_training_examples,
    fixes=SENDS_LOCAL_WEIGHTS,
    unread=GATE_KEYS,
)
