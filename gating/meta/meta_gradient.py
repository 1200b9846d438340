"""Meta-gradients: d L(Adapt(theta, phi; S); Q) / d(theta, phi), from one per-task objective.

One task's query loss as a function of its learned parameters is :func:`_objective` (second
order: through ``gating.meta.adapt.adapt``; first order: at the adapted point, the inner steps
constants). A client's tasks differentiate it one by one with autograd (:func:`meta_gradients`)
or ``vmap`` ``torch.func.grad`` of it over the tasks (:func:`meta_gradients_batched`,
``task.batched``: fewer, larger kernels). The loop takes autograd for the outermost derivative
because ``torch.func.grad`` always builds a graph of its own backward (so that it nests): there,
up to 1.5x the time and the memory for nothing (BENCHMARKS.md, "Meta-gradient cost"). Under
``vmap`` the gate noise is drawn with ``randomness="different"``: independent per task, as in the
loop, but not the same numbers the loop draws from the same seed (tests/test_meta_vmap.py compares
the two with fixed noise). Every task of a batched call must have the same support and query
sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gating.meta.adapt import (
    HEAD,
    Batch,
    MetaConfig,
    Params,
    accuracy,
    adapt,
    owner_group,
    task_loss,
)
from gating.model import (
    BACKBONE,
    GatedModel,
    LayerTrace,
    deployed_flops_ratio,
    flops_ratio,
)


@dataclass
class MetaStep:
    grads: Params  # per learned name (backbone.*, gate.* when gating, step.* under Meta-SGD)
    query_loss: float
    query_accuracy: float
    flops_ratio: float  # of the gates the query pass ran (relaxed or sampled in training)
    deployed_flops_ratio: float  # of the deterministic gates a deployed node would run


def learnable(params: Mapping[str, Tensor], cfg: MetaConfig) -> list[str]:
    """The names a meta-gradient is taken for: the backbone, the gates when gating, and the
    step sizes of those (Meta-SGD)."""
    return [n for n in params if cfg.gating or owner_group(n) == BACKBONE]


def query_ratios(
    model: GatedModel, trace: list[LayerTrace], cfg: MetaConfig
) -> tuple[float, float]:
    """(flops_ratio, deployed_flops_ratio) of a query pass; (1, 1) for the dense network."""
    if not cfg.gating:
        return 1.0, 1.0
    return flops_ratio(model.spec, trace), deployed_flops_ratio(model.spec, trace)


Objective = Callable[[Params, Params, Batch, Batch], tuple[Tensor, tuple]]


def _objective(model: GatedModel, cfg: MetaConfig) -> Objective:
    """One task's (query loss, (its value, query logits, gate masks and open probabilities)) as
    a pure function of (learned parameters, the others, support, query). First order: the
    learned parameters given are already the adapted ones (:func:`_variables`)."""
    outer_reg = cfg.outer_regularized

    def objective(learned: Params, fixed: Params, support: Batch, query: Batch) -> tuple:
        params = {**fixed, **learned}
        if not cfg.first_order:
            params = adapt(model, params, support, cfg)
        loss, out = task_loss(model, params, query, cfg, outer_reg, support, shape=True)
        gates = (
            [(layer.mask.detach(), layer.prob.detach()) for layer in out.trace]
            if cfg.gating
            else []
        )
        return loss, (loss.detach(), out.logits.detach(), gates)

    return objective


def _variables(
    model: GatedModel, params: Params, support: Batch, cfg: MetaConfig
) -> tuple[Params, Params]:
    """(learned, fixed): where the objective is differentiated. First order: the adapted point,
    reached without a graph (the inner steps are constants)."""
    if cfg.first_order:
        params = {name: p.detach() for name, p in adapt(model, params, support, cfg).items()}
    names = learnable(params, cfg)
    learned = {name: params[name] for name in names}
    return learned, {name: p for name, p in params.items() if name not in learned}


def _step(
    model: GatedModel, cfg: MetaConfig, grads: Params, aux: tuple, query_y: Tensor
) -> MetaStep:
    """One task's :class:`MetaStep` from its meta-gradient and the query pass's outputs."""
    loss, logits, gates = aux
    ratio, deployed = query_ratios(model, [LayerTrace(mask=m, prob=p) for m, p in gates], cfg)
    return MetaStep(
        grads={
            n: torch.zeros_like(g) if cfg.zero_head and n in HEAD else g for n, g in grads.items()
        },
        query_loss=float(loss),
        query_accuracy=accuracy(logits, query_y),
        flops_ratio=ratio,
        deployed_flops_ratio=deployed,
    )


def meta_gradients(
    model: GatedModel,
    initial: Mapping[str, Tensor],
    support: Batch,
    query: Batch,
    cfg: MetaConfig,
) -> MetaStep:
    """d L(Adapt(theta, phi; S); Q) / d(theta, phi) for one task."""
    params = {name: t.detach() for name, t in initial.items()}
    learned, fixed = _variables(model, params, support, cfg)
    learned = {name: p.detach().requires_grad_(True) for name, p in learned.items()}
    loss, aux = _objective(model, cfg)(learned, fixed, support, query)
    # None: a parameter the loss does not reach (the zeroed head), as torch.func.grad's zeros
    found = torch.autograd.grad(loss, list(learned.values()), allow_unused=True)
    grads = {
        name: torch.zeros_like(p) if g is None else g
        for (name, p), g in zip(learned.items(), found, strict=True)
    }
    return _step(model, cfg, grads, aux, query.y)


def meta_gradients_batched(
    model: GatedModel,
    initial: Mapping[str, Tensor],
    episodes: Sequence[tuple[Batch, Batch]],
    cfg: MetaConfig,
) -> list[MetaStep]:
    """``[meta_gradients(model, initial, s, q, cfg) for s, q in episodes]`` in one vmapped pass."""
    params = {name: t.detach() for name, t in initial.items()}
    objective = torch.func.grad(_objective(model, cfg), has_aux=True)

    def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple:
        support, query = Batch(sx, sy), Batch(qx, qy)
        return objective(*_variables(model, params, support, cfg), support, query)

    stacked = [
        torch.stack([s.x for s, _ in episodes]),
        torch.stack([s.y for s, _ in episodes]),
        torch.stack([q.x for _, q in episodes]),
        torch.stack([q.y for _, q in episodes]),
    ]
    grads, (losses, logits, gates) = torch.func.vmap(one_task, randomness="different")(*stacked)
    return [
        _step(
            model,
            cfg,
            {n: g[i] for n, g in grads.items()},
            (losses[i], logits[i], [(m[i], p[i]) for m, p in gates]),
            stacked[3][i],
        )
        for i in range(len(episodes))
    ]
