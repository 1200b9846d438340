"""FedAvg of the dense backbone: ``local.steps`` SGD steps on fresh local batches, θ - θ_local
sent; its YAML's server SGD with learning rate 1 makes the step exactly the model average."""

from __future__ import annotations

from gating.federated.settings import meta_config, model_for, model_spec
from gating.federated.strategies import (
    GATE_KEYS,
    SENDS_LOCAL_WEIGHTS,
    Strategy,
    local_training_examples,
)
from gating.federated.updates import ClientRound, ClientUpdate, local_reply, merged
from gating.meta import fedavg_update


def client_update(job: ClientRound) -> ClientUpdate:
    cfg = job.cfg
    draw = job.episodes()
    step = fedavg_update(
        model_for(model_spec(cfg, job.task)),
        job.initial(),
        lambda: merged(*draw()),
        meta_config(cfg, job.reg_weight),
        cfg.local.lr,
        cfg.local.steps,
    )
    return local_reply(step, local_training_examples(cfg))


STRATEGY = Strategy(
    name="fedavg",
    update=client_update,
    examples=local_training_examples,
    fixes=SENDS_LOCAL_WEIGHTS,
    unread=(*GATE_KEYS, "meta.first_order", "local.hessian_delta"),
)
