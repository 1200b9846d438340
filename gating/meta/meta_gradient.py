"""Meta-gradients: d L(Adapt(theta, phi; S); Q) / d(theta, phi), one pure per-task function.

One task's meta-gradient is :func:`_task_fn`, written with ``torch.func.grad`` around
``gating.meta.adapt.adapt`` (second order: the inner ``grad`` nested inside the outer one; first
order: the query gradient at the adapted point, the inner steps constants). A client's tasks run
it in a loop (:func:`meta_gradients`) or ``vmap``-ed over the tasks
(:func:`meta_gradients_batched`, ``task.batched``: fewer, larger kernels). Under ``vmap`` the gate
noise is drawn with ``randomness="different"``: independent per task, as in the loop, but not the
same numbers the loop draws from the same seed (tests/test_meta_vmap.py compares the two with
fixed noise). Every task of a batched call must have the same support and query sizes.
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


def _task_fn(model: GatedModel, names: list[str], cfg: MetaConfig) -> Callable[..., tuple]:
    """One task's (meta-gradient, (query loss, query logits, gate masks and open
    probabilities)) as a pure function of (params, support x, support y, query x, query y)."""
    outer_reg = cfg.outer_regularized

    def query_loss(adapted: Params, query: Batch, support: Batch) -> tuple[Tensor, tuple]:
        loss, out = task_loss(model, adapted, query, cfg, outer_reg, support, shape=True)
        gates = (
            [(layer.mask.detach(), layer.prob.detach()) for layer in out.trace]
            if cfg.gating
            else []
        )
        return loss, (loss.detach(), out.logits.detach(), gates)

    def one_task(params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple:
        support, query = Batch(sx, sy), Batch(qx, qy)
        fixed = {name: p for name, p in params.items() if name not in names}
        if cfg.first_order:  # the query gradient at the adapted point, the inner steps constant
            adapted = {name: p.detach() for name, p in adapt(model, params, support, cfg).items()}
            rest = {name: p for name, p in adapted.items() if name not in names}

            def at_adapted(sub: Params) -> tuple[Tensor, tuple]:
                return query_loss({**rest, **sub}, query, support)

            return torch.func.grad(at_adapted, has_aux=True)({n: adapted[n] for n in names})

        def through_adapt(sub: Params) -> tuple[Tensor, tuple]:
            return query_loss(adapt(model, {**fixed, **sub}, support, cfg), query, support)

        return torch.func.grad(through_adapt, has_aux=True)({n: params[n] for n in names})

    return one_task


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
    grads, aux = _task_fn(model, learnable(params, cfg), cfg)(
        params, support.x, support.y, query.x, query.y
    )
    return _step(model, cfg, grads, aux, query.y)


def meta_gradients_batched(
    model: GatedModel,
    initial: Mapping[str, Tensor],
    episodes: Sequence[tuple[Batch, Batch]],
    cfg: MetaConfig,
) -> list[MetaStep]:
    """``[meta_gradients(model, initial, s, q, cfg) for s, q in episodes]`` in one vmapped pass."""
    params = {name: t.detach() for name, t in initial.items()}
    stacked = [
        torch.stack([s.x for s, _ in episodes]),
        torch.stack([s.y for s, _ in episodes]),
        torch.stack([q.x for _, q in episodes]),
        torch.stack([q.y for _, q in episodes]),
    ]
    batched = torch.func.vmap(
        _task_fn(model, learnable(params, cfg), cfg),
        in_dims=(None, 0, 0, 0, 0),
        randomness="different",
    )
    grads, (losses, logits, gates) = batched(params, *stacked)
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
