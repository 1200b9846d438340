"""Per-FedAvg (Fallah et al. 2020) of the dense backbone: Hessian-free (the Hessian-vector
product exact, or the paper's central difference with ``local.hessian_delta`` > 0), or first
order with ``meta.first_order``. Its inner step α is ``adapt.backbone_lr``, its outer step β
``local.lr``; θ - θ_local is sent."""

from __future__ import annotations

from gating.federated.settings import meta_config, model_for, model_spec
from gating.federated.strategies import GATE_KEYS, Strategy, local_training_examples
from gating.federated.updates import ClientRound, ClientUpdate, on_cpu
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
    return ClientUpdate(
        on_cpu(step.update), local_training_examples(cfg), step.loss, step.accuracy, 1.0
    )


STRATEGY = Strategy(
    name="perfedavg",
    update=client_update,
    examples=local_training_examples,
    # it trains the head it sends, and its update holds no step sizes
    fixes={"adapt.zero_head": False, "adapt.learn_step_sizes": False},
    unread=GATE_KEYS,
)
