"""Meta-gradients against independent references: finite differences, a hand-unrolled update."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from conf.choices import NormKind
from gating.meta import (
    MetaConfig,
    adapt,
    meta_gradients,
    query_metrics,
    task_loss,
    with_step_sizes,
)
from gating.model import LayerTrace, NormStats, gate_regularizer
from tests.support import STRAIGHT_THROUGH_META, assert_matches_central_differences


@pytest.fixture(scope="module")
def task(digits_episodes):
    """One 3-way float64 task on digits (classes 3, 7, 1): 2 support, 4 query images each."""
    return digits_episodes[0]


CONFIGS = {
    order: replace(STRAIGHT_THROUGH_META, order=order) for order in ("backbone_first", "gate_first")
}


def meta_objective(model, params, support, query, cfg, noise_seed) -> torch.Tensor:
    """L(Adapt(theta, phi; S); Q) as a plain function of the initial parameters; with metabn
    the query pass normalizes with the support set's statistics (under the adapted weights)."""
    torch.manual_seed(noise_seed)
    adapted = adapt(model, params, support, cfg)
    return task_loss(model, adapted, query, cfg, regularize=True, support=support)[0]


@pytest.mark.parametrize("norm", list(NormKind))
@pytest.mark.parametrize("order", list(CONFIGS))
def test_second_order_meta_gradient_matches_finite_differences(task, tiny_model, order, norm):
    support, query = task
    # soft gates: smooth, so central differences apply
    cfg = replace(CONFIGS[order], train_gates="soft", norm=norm)
    model, params = tiny_model()
    torch.manual_seed(5)
    step = meta_gradients(model, params, support, query, cfg)
    assert set(step.grads) == set(params)
    assert_matches_central_differences(
        step.grads,
        params,
        lambda probe: meta_objective(model, probe, support, query, cfg, noise_seed=5).item(),
    )


def hand_unrolled(model, params, support, query, cfg: MetaConfig, first_order: bool):
    """The two-stage update written out explicitly, independent of ``gating.meta.adapt``."""
    names_b = [n for n in params if n.startswith("backbone.")]
    names_g = [n for n in params if n.startswith("gate.")]
    theta = {n: params[n].clone().requires_grad_(True) for n in names_b}
    phi = {n: params[n].clone().requires_grad_(True) for n in names_g}

    def loss(th, ph, batch):
        """CE + λR on ``batch``; on the queries (metabn) the support set runs first in the
        same pass and the norms take the statistics of its rows only."""
        n = len(support.x) if batch is query else 0
        out = functional_call(
            model,
            {**th, **ph},
            (torch.cat([support.x, batch.x]) if n else batch.x,),
            {"mode": "hard", "temperature": cfg.temperature, "stats": NormStats(rows=n or None)},
        )
        trace = [LayerTrace(t.mask[n:], t.prob[n:]) for t in out.trace]
        reg = gate_regularizer(model.spec, trace, cfg.target_ratio)
        return F.cross_entropy(out.logits[n:], batch.y) + cfg.reg_weight * reg

    def step(group: dict, other: dict, lr: float, backbone: bool):
        group = {n: v.view_as(v) for n, v in group.items()}  # the partial gradient in this group
        args = (group, other) if backbone else (other, group)
        grads = torch.autograd.grad(
            loss(*args, support), list(group.values()), create_graph=not first_order
        )
        return {n: v - lr * g for (n, v), g in zip(group.items(), grads, strict=True)}

    if cfg.order == "backbone_first":
        theta_new = step(theta, phi, cfg.backbone_lr, backbone=True)
        phi_new = step(phi, theta_new, cfg.gate_lr, backbone=False)
    else:
        phi_new = step(phi, theta, cfg.gate_lr, backbone=False)
        theta_new = step(theta, phi_new, cfg.backbone_lr, backbone=True)
    if first_order:
        theta_new = {n: v.detach().requires_grad_(True) for n, v in theta_new.items()}
        phi_new = {n: v.detach().requires_grad_(True) for n, v in phi_new.items()}
        wrt = {**theta_new, **phi_new}
    else:
        wrt = {**theta, **phi}
    grads = torch.autograd.grad(loss(theta_new, phi_new, query), list(wrt.values()))
    return dict(zip(wrt.keys(), grads, strict=True))


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("order", list(CONFIGS))
def test_meta_gradient_equals_hand_unrolled_update_with_hard_gates(
    task, tiny_model, order, first_order
):
    support, query = task
    cfg = replace(CONFIGS[order], first_order=first_order)
    model, params = tiny_model(seed=1)
    torch.manual_seed(9)
    step = meta_gradients(model, params, support, query, cfg)
    torch.manual_seed(9)
    reference = hand_unrolled(model, params, support, query, cfg, first_order)
    assert set(step.grads) == set(reference)
    for name, grad in reference.items():
        torch.testing.assert_close(step.grads[name], grad, rtol=1e-9, atol=1e-12)


def test_first_and_second_order_differ_and_dense_mode_has_no_gate_gradients(task, tiny_model):
    support, query = task
    model, params = tiny_model(seed=2)
    cfg = CONFIGS["backbone_first"]
    torch.manual_seed(4)
    second = meta_gradients(model, params, support, query, cfg).grads
    torch.manual_seed(4)
    first = meta_gradients(model, params, support, query, replace(cfg, first_order=True)).grads
    assert any(not torch.allclose(second[n], first[n]) for n in params)
    dense = meta_gradients(model, params, support, query, replace(cfg, gating=False))
    assert set(dense.grads) == {n for n in params if n.startswith("backbone.")}
    assert dense.flops_ratio == 1.0


def test_one_adaptation_step_learns_the_support_set(task, tiny_model):
    support, _ = task
    model, params = tiny_model(seed=3)
    cfg = replace(CONFIGS["backbone_first"], inner_steps=5, reg_weight=0.0)
    start = {n: t.detach().clone().requires_grad_(True) for n, t in params.items()}
    adapted = {n: t.detach() for n, t in adapt(model, start, support, cfg).items()}
    before = query_metrics(model, params, support, support, cfg)
    after = query_metrics(model, adapted, support, support, cfg)
    assert after["loss"] < before["loss"]
    assert len(after["layer_active"]) == 2


@pytest.mark.parametrize("first_order", [False, True])
def test_zero_head_starts_every_task_from_a_zero_head(task, tiny_model, first_order):
    """adapt.zero_head: the meta-initialization's head is never used (its meta-gradient is
    zero) and the rest still gets the exact meta-gradient of that objective."""
    support, query = task
    model, params = tiny_model(seed=3)
    params = {n: v.requires_grad_(True) for n, v in params.items()}
    cfg = replace(CONFIGS["backbone_first"], zero_head=True, first_order=first_order)
    cfg = replace(cfg, train_gates="soft")
    torch.manual_seed(5)
    step = meta_gradients(model, params, support, query, cfg)
    for name in ("backbone.head.weight", "backbone.head.bias"):
        assert torch.count_nonzero(step.grads[name]) == 0
    other = {n: v + 1.0 if "head" in n else v for n, v in params.items()}
    torch.manual_seed(5)
    assert meta_objective(model, other, support, query, cfg, 5).item() == pytest.approx(
        meta_objective(model, params, support, query, cfg, 5).item(), rel=1e-12
    )
    if not first_order:
        body = {n: v for n, v in params.items() if "head" not in n}
        assert_matches_central_differences(
            {n: step.grads[n] for n in body},
            body,
            lambda probe: meta_objective(
                model, {**params, **probe}, support, query, cfg, noise_seed=5
            ).item(),
        )


def varied_step_sizes(params, cfg, seed: int = 1):
    """Meta-SGD's parameters with every coordinate's step size different (0.5 to 1.5 of its
    stage's), so that using one step size for another would show."""
    generator = torch.Generator().manual_seed(seed)
    return {
        n: p * (0.5 + torch.rand(p.shape, generator=generator, dtype=p.dtype))
        if n.startswith("step.")
        else p
        for n, p in with_step_sizes(params, cfg).items()
    }


def test_meta_sgd_steps_each_coordinate_by_its_own_step_size(task, tiny_model):
    """Dense, one step: Adapt(theta) - theta = -alpha (elementwise) grad L(theta; S), the gradient
    by plain autograd; at the starting step sizes (all α) it is the plain Adapt."""
    support, _ = task
    cfg = replace(CONFIGS["backbone_first"], gating=False)
    model, params = tiny_model()
    stepped = varied_step_sizes(params, cfg)
    adapted = adapt(model, stepped, support, cfg)
    theta = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    out = functional_call(model, theta, (support.x,), {"mode": "off"})
    names = [n for n in params if n.startswith("backbone.")]
    grads = torch.autograd.grad(F.cross_entropy(out.logits, support.y), [theta[n] for n in names])
    for name, grad in zip(names, grads, strict=True):
        expected = params[name] - stepped[f"step.{name}"] * grad
        torch.testing.assert_close(adapted[name], expected, rtol=1e-10, atol=1e-12)
    plain = adapt(model, params, support, cfg)
    at_start = adapt(model, with_step_sizes(params, cfg), support, cfg)
    for name in plain:
        torch.testing.assert_close(at_start[name], plain[name], rtol=0, atol=0)


@pytest.mark.parametrize("gating", [False, True], ids=["metasgd", "gated"])
def test_meta_sgd_meta_gradient_matches_finite_differences(task, tiny_model, gating):
    """d L(Adapt(theta, phi, alpha; S); Q) / d(theta, phi, alpha) against central differences,
    the step sizes (of the gates too, when gating) included."""
    support, query = task
    cfg = replace(CONFIGS["backbone_first"], train_gates="soft", gating=gating)
    model, params = tiny_model()
    stepped = varied_step_sizes(params, cfg)
    if not gating:
        stepped = {n: p for n, p in stepped.items() if "gate." not in n}
    torch.manual_seed(5)
    step = meta_gradients(model, stepped, support, query, cfg)
    assert set(step.grads) == set(stepped)
    assert any(n.startswith("step.gate.") for n in step.grads) == gating
    assert_matches_central_differences(
        step.grads,
        stepped,
        lambda probe: meta_objective(model, probe, support, query, cfg, noise_seed=5).item(),
    )
