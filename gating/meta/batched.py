"""Meta-gradients of several tasks at once: ``torch.func.vmap`` over the tasks of one client.

The same computation as :func:`gating.meta.adapt.meta_gradients` per task (the two-stage ``Adapt``,
then the query loss's gradient through it: second order, or first order at the adapted point),
written with ``torch.func.grad`` so that ``vmap`` can batch it; second order comes from nesting
the inner ``grad`` inside the outer one. The gate noise is drawn with
``randomness="different"``: independent per task, as in the loop, but not the same numbers the
loop draws from the same seed (tests/test_meta_vmap.py compares the two with fixed noise).
Every task of a call must have the same support and query sizes (episodes of one node do).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from gating.meta.adapt import (
    HEAD,
    Batch,
    MetaConfig,
    MetaStep,
    Params,
    accuracy,
    query_ratios,
    stages,
    start_of_task,
    task_loss,
)
from gating.model import BACKBONE, GatedModel, LayerTrace, group_of


def _stage(
    model: GatedModel, params: Params, group: str, lr: float, support: Batch, cfg: MetaConfig
) -> Params:
    """``inner_steps`` gradient steps on one group (as ``gating.meta.adapt._sgd_stage``); the step
    stays differentiable when an outer ``torch.func.grad`` is tracing it."""
    regularize = cfg.inner_regularized
    names = [name for name in params if group_of(name) == group]
    for _ in range(cfg.inner_steps):

        def loss(sub: Params, params: Params = params) -> Tensor:
            return task_loss(model, {**params, **sub}, support, cfg, regularize)[0]

        grads = torch.func.grad(loss)({name: params[name] for name in names})
        params = {**params, **{name: params[name] - lr * grads[name] for name in names}}
    return params


def adapt(model: GatedModel, params: Params, support: Batch, cfg: MetaConfig) -> Params:
    """The two-stage adaptation of ``gating.meta.adapt.adapt``, in ``torch.func`` form."""
    params = start_of_task(params, cfg)
    for group, lr in stages(cfg):
        params = _stage(model, params, group, lr, support, cfg)
    return params


def _task_fn(model: GatedModel, learnable: list[str], cfg: MetaConfig) -> Callable[..., tuple]:
    """One task's (meta-gradient, (query loss, query logits, gate masks and open
    probabilities)) as a pure function."""
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
        fixed = {name: p for name, p in params.items() if name not in learnable}
        if cfg.first_order:  # the query gradient at the adapted point, the inner steps constant
            adapted = {name: p.detach() for name, p in adapt(model, params, support, cfg).items()}
            rest = {name: p for name, p in adapted.items() if name not in learnable}

            def at_adapted(sub: Params) -> tuple[Tensor, tuple]:
                return query_loss({**rest, **sub}, query, support)

            return torch.func.grad(at_adapted, has_aux=True)(
                {name: adapted[name] for name in learnable}
            )

        def through_adapt(sub: Params) -> tuple[Tensor, tuple]:
            return query_loss(adapt(model, {**fixed, **sub}, support, cfg), query, support)

        return torch.func.grad(through_adapt, has_aux=True)(
            {name: params[name] for name in learnable}
        )

    return one_task


def meta_gradients_batched(
    model: GatedModel,
    initial: Mapping[str, Tensor],
    episodes: Sequence[tuple[Batch, Batch]],
    cfg: MetaConfig,
) -> list[MetaStep]:
    """``[gating.meta.adapt.meta_gradients(model, initial, s, q, cfg) for s, q in episodes]`` in one
    vmapped pass (fewer, larger kernels: faster when a client meta-learns on several tasks)."""
    params = {name: t.detach() for name, t in initial.items()}
    learnable = [n for n in params if cfg.gating or group_of(n) == BACKBONE]
    stacked = [
        torch.stack([s.x for s, _ in episodes]),
        torch.stack([s.y for s, _ in episodes]),
        torch.stack([q.x for _, q in episodes]),
        torch.stack([q.y for _, q in episodes]),
    ]
    batched = torch.func.vmap(
        _task_fn(model, learnable, cfg), in_dims=(None, 0, 0, 0, 0), randomness="different"
    )
    grads, (losses, logits, gates) = batched(params, *stacked)
    query_y = stacked[3]
    steps = []
    for index in range(len(episodes)):
        trace = [LayerTrace(mask=m[index], prob=p[index]) for m, p in gates]
        correct = accuracy(logits[index], query_y[index])
        ratio, deployed = query_ratios(model, trace, cfg)
        steps.append(
            MetaStep(
                grads={
                    name: torch.zeros_like(grads[name][index])
                    if cfg.zero_head and name in HEAD
                    else grads[name][index]
                    for name in learnable
                },
                query_loss=float(losses[index]),
                query_accuracy=correct,
                flops_ratio=ratio,
                deployed_flops_ratio=deployed,
            )
        )
    return steps
