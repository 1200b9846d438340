"""Local updates of the dense baselines against hand computations (float64, real digits)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from gating.federated.strategies.reptile import reptile_update
from gating.meta import Batch, MetaConfig, fedavg_update, perfedavg_update
from gating.meta.local import hessian_vector_product
from gating.model import GatedConvNet, ModelSpec

CFG = MetaConfig(gating=False)


@pytest.fixture(scope="module")
def batches(digits) -> list[Batch]:
    x = torch.from_numpy(digits.images.copy()).double()
    y = torch.from_numpy(digits.labels.copy()) % 3
    return [Batch(x[i * 12 : (i + 1) * 12], y[i * 12 : (i + 1) * 12]) for i in range(9)]


def backbone_loss(model, params, theta: dict, batch: Batch) -> torch.Tensor:
    out = functional_call(model, {**params, **theta}, (batch.x,), {"mode": "off"})
    return F.cross_entropy(out.logits, batch.y)


def grad(model, params, theta: dict, batch: Batch, create_graph=False) -> dict:
    theta = {n: v if v.requires_grad else v.clone().requires_grad_(True) for n, v in theta.items()}
    grads = torch.autograd.grad(
        backbone_loss(model, params, theta, batch), list(theta.values()), create_graph=create_graph
    )
    return dict(zip(theta, grads, strict=True))


def start_theta(params):
    return {n: v.clone() for n, v in params.items() if n.startswith("backbone.")}


def test_fedavg_update_is_the_difference_after_plain_sgd(batches, tiny_model):
    model, params = tiny_model()
    feed = iter(batches[:3])
    step = fedavg_update(model, params, lambda: next(feed), CFG, lr=0.1, steps=3)
    theta = start_theta(params)
    for batch in batches[:3]:
        g = grad(model, params, theta, batch)
        theta = {n: (v - 0.1 * g[n]).detach() for n, v in theta.items()}
    assert set(step.update) == set(theta)
    for name, value in theta.items():
        torch.testing.assert_close(step.update[name], params[name] - value)


@pytest.mark.parametrize(
    ("hessian_free", "delta"),
    [(False, 0.0), (True, 0.0), (True, 1e-5)],
    ids=["first-order", "exact-hvp", "central-difference"],
)
def test_perfedavg_step_matches_the_exact_update(batches, tiny_model, hessian_free, delta):
    model, params = tiny_model()
    alpha, beta = 0.3, 0.2
    feed = iter([(batches[0], batches[1], batches[2]), (batches[3], batches[4], batches[5])])
    step = perfedavg_update(
        model,
        params,
        lambda: next(feed),
        CFG,
        alpha=alpha,
        beta=beta,
        steps=2,
        hessian_free=hessian_free,
        delta=delta,
    )
    # Reference: the exact Hessian-vector product by double backward (not a finite difference).
    theta = start_theta(params)
    for d1, d2, d3 in ((batches[0], batches[1], batches[2]), (batches[3], batches[4], batches[5])):
        g1 = grad(model, params, theta, d1)
        inner = {n: (v - alpha * g1[n]).detach() for n, v in theta.items()}
        outer = grad(model, params, inner, d2)
        direction = outer
        if hessian_free:
            probe = {n: v.clone().requires_grad_(True) for n, v in theta.items()}
            g3 = grad(model, params, probe, d3, create_graph=True)
            dot = sum((g3[n] * outer[n]).sum() for n in probe)
            hvp = dict(zip(probe, torch.autograd.grad(dot, list(probe.values())), strict=True))
            direction = {n: outer[n] - alpha * hvp[n] for n in theta}
        theta = {n: (v - beta * direction[n]).detach() for n, v in theta.items()}
    for name, value in theta.items():
        torch.testing.assert_close(step.update[name], params[name] - value, rtol=1e-6, atol=1e-8)


def test_hessian_term_changes_the_update(batches, tiny_model):
    model, params = tiny_model()
    runs = []
    for hessian_free in (False, True):
        feed = iter([(batches[0], batches[1], batches[2])])
        runs.append(
            perfedavg_update(
                model,
                params,
                lambda feed=feed: next(feed),
                CFG,
                alpha=0.5,
                beta=0.2,
                steps=1,
                hessian_free=hessian_free,
            ).update
        )
    assert any(not torch.allclose(runs[0][n], runs[1][n]) for n in runs[0])


def test_the_hessian_vector_product_is_exact_on_the_real_network(digits):
    """On the default Conv-4 (float32, 5-way digits batches): double backward against
    forward-over-reverse (torch.func.jvp of the gradient), an independent computation; the
    paper's central difference at delta = 1e-3 is far off here (ReLU, max-pool), which is why
    it is not the default."""
    torch.manual_seed(0)
    model = GatedConvNet(ModelSpec(in_channels=1, image_size=8, num_classes=5, width=32))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    theta = {n: p for n, p in params.items() if n.startswith("backbone.")}
    rest = {n: p for n, p in params.items() if n not in theta}
    x = torch.from_numpy(digits.images[:25].copy())
    batch = Batch(x, torch.from_numpy(digits.labels[:25].copy()) % 5)
    # v: a gradient on other data, as Per-FedAvg's outer gradient is
    other = Batch(torch.from_numpy(digits.images[25:50].copy()), batch.y)
    vector = list(torch.func.grad(lambda th: backbone_loss(model, rest, th, other))(theta).values())
    got = hessian_vector_product(model, theta, rest, batch, CFG, vector)

    def loss(th: dict) -> torch.Tensor:
        return backbone_loss(model, rest, th, batch)

    tangent = dict(zip(theta, vector, strict=True))
    _, reference = torch.func.jvp(torch.func.grad(loss), (theta,), (tangent,))
    flat = torch.cat([g.flatten() for g in got])
    expected = torch.cat([reference[n].flatten() for n in theta])
    torch.testing.assert_close(flat, expected, rtol=1e-3, atol=1e-5)

    def central(delta: float) -> torch.Tensor:
        plus = {n: p + delta * v for (n, p), v in zip(theta.items(), vector, strict=True)}
        minus = {n: p - delta * v for (n, p), v in zip(theta.items(), vector, strict=True)}
        g_plus, g_minus = torch.func.grad(loss)(plus), torch.func.grad(loss)(minus)
        return torch.cat([((g_plus[n] - g_minus[n]) / (2 * delta)).flatten() for n in theta])

    assert F.cosine_similarity(central(1e-3), expected, dim=0) < 0.9  # the old default


def test_reptile_sends_the_mean_difference_after_each_episodes_inner_sgd_steps(batches, tiny_model):
    """Reptile's update against plain SGD written out: per episode three steps of α from the
    meta-initialization, then the mean of theta - W over the episodes."""
    model, params = tiny_model()
    cfg = replace(CFG, backbone_lr=0.1, inner_steps=3)
    step = reptile_update(model, params, batches[:2], cfg)
    differences = []
    for batch in batches[:2]:
        theta = start_theta(params)
        for _ in range(3):
            g = grad(model, params, theta, batch)
            theta = {n: (v - 0.1 * g[n]).detach() for n, v in theta.items()}
        differences.append({n: params[n] - v for n, v in theta.items()})
    assert set(step.update) == set(theta)
    for name in theta:
        expected = (differences[0][name] + differences[1][name]) / 2
        torch.testing.assert_close(step.update[name], expected)
    assert any(not torch.allclose(differences[0][n], differences[1][n]) for n in theta)
    # one inner step is joint training: the update is α times the gradient at theta
    one = reptile_update(model, params, batches[:1], replace(cfg, inner_steps=1))
    g = grad(model, params, start_theta(params), batches[0])
    for name in theta:
        torch.testing.assert_close(one.update[name], 0.1 * g[name])
