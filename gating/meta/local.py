"""Local updates of the dense baselines (plain PyTorch, no Flower): FedAvg and Per-FedAvg.

Both return a pseudo-gradient ``theta_start - theta_local``; the server averages it and applies
its optimizer (plain SGD with learning rate 1 is exactly FedAvg's model average).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gating.meta.adapt import Batch, MetaConfig, Params, accuracy, forward
from gating.model import BACKBONE, GatedModel, GateMode


@dataclass
class LocalStep:
    update: Params  # theta_start - theta_local, backbone parameters only
    loss: float
    accuracy: float


def _backbone(initial: Mapping[str, Tensor]) -> tuple[Params, Params]:
    """Trainable copies of the backbone; the gate tensors ride along, unused (gating is off)."""
    theta = {
        n: t.detach().clone().requires_grad_(True)
        for n, t in initial.items()
        if n.startswith(f"{BACKBONE}.")
    }
    rest = {n: t.detach() for n, t in initial.items() if not n.startswith(f"{BACKBONE}.")}
    return theta, rest


def _loss(
    model: GatedModel, theta: Params, rest: Params, batch: Batch, cfg: MetaConfig
) -> tuple[Tensor, Tensor]:
    out = forward(model, {**theta, **rest}, batch.x, GateMode.OFF, cfg)
    return F.cross_entropy(out.logits, batch.y), out.logits


def _grad(model, theta, rest, batch, cfg) -> tuple[list[Tensor], Tensor, Tensor]:
    loss, logits = _loss(model, theta, rest, batch, cfg)
    return list(torch.autograd.grad(loss, list(theta.values()))), loss, logits


def _result(
    initial: Mapping[str, Tensor], theta: Params, loss: Tensor, logits: Tensor, y: Tensor
) -> LocalStep:
    update = {n: (initial[n] - p).detach() for n, p in theta.items()}
    return LocalStep(update, float(loss.detach()), accuracy(logits, y))


def fedavg_update(
    model: GatedModel,
    initial: Mapping[str, Tensor],
    batches: Callable[[], Batch],
    cfg: MetaConfig,
    lr: float,
    steps: int,
) -> LocalStep:
    """``steps`` plain SGD steps on the dense backbone, each on a fresh local batch."""
    theta, rest = _backbone(initial)
    for _ in range(steps):
        batch = batches()
        grads, loss, logits = _grad(model, theta, rest, batch, cfg)
        with torch.no_grad():
            theta = {
                n: (p - lr * g).requires_grad_(True)
                for (n, p), g in zip(theta.items(), grads, strict=True)
            }
    return _result(initial, theta, loss, logits, batch.y)


def hessian_vector_product(
    model: GatedModel,
    theta: Params,
    rest: Params,
    batch: Batch,
    cfg: MetaConfig,
    vector: list[Tensor],
) -> list[Tensor]:
    """H(theta; batch) v by double backward: d/dtheta <grad L(theta; batch), v>."""
    probe = {n: p.detach().requires_grad_(True) for n, p in theta.items()}
    loss, _ = _loss(model, probe, rest, batch, cfg)
    grads = torch.autograd.grad(loss, list(probe.values()), create_graph=True)
    dot = sum((g * v.detach()).sum() for g, v in zip(grads, vector, strict=True))
    return [h.detach() for h in torch.autograd.grad(dot, list(probe.values()))]


def perfedavg_update(
    model: GatedModel,
    initial: Mapping[str, Tensor],
    episodes: Callable[[], tuple[Batch, Batch, Batch]],
    cfg: MetaConfig,
    alpha: float,
    beta: float,
    steps: int,
    hessian_free: bool,
    delta: float = 0.0,
) -> LocalStep:
    """Per-FedAvg (Fallah et al., 2020): each local step on three independent batches D, D', D'':

    theta <- theta - beta * (I - alpha * H(theta; D'')) grad L(theta - alpha grad L(theta; D); D')

    First-order (``hessian_free=False``) drops the Hessian term. The Hessian-vector product is
    exact by default (a double backward: cheap here, and the paper's finite difference is not
    accurate in this ReLU / max-pool network at usable steps); ``delta > 0`` uses the paper's
    central difference (grad L(theta + delta v) - grad L(theta - delta v)) / (2 delta) instead.
    """
    theta, rest = _backbone(initial)
    for _ in range(steps):
        first, second, third = episodes()
        grads, _, _ = _grad(model, theta, rest, first, cfg)
        inner = {
            n: (p - alpha * g).detach().requires_grad_(True)
            for (n, p), g in zip(theta.items(), grads, strict=True)
        }
        outer, loss, logits = _grad(model, inner, rest, second, cfg)
        direction = outer
        if hessian_free and delta <= 0:
            hvp = hessian_vector_product(model, theta, rest, third, cfg, outer)
            direction = [v - alpha * h for v, h in zip(outer, hvp, strict=True)]
        elif hessian_free:
            plus = {
                n: (p + delta * v).detach().requires_grad_(True)
                for (n, p), v in zip(theta.items(), outer, strict=True)
            }
            minus = {
                n: (p - delta * v).detach().requires_grad_(True)
                for (n, p), v in zip(theta.items(), outer, strict=True)
            }
            g_plus, _, _ = _grad(model, plus, rest, third, cfg)
            g_minus, _, _ = _grad(model, minus, rest, third, cfg)
            direction = [
                v - alpha * (gp - gm) / (2 * delta)
                for v, gp, gm in zip(outer, g_plus, g_minus, strict=True)
            ]
        with torch.no_grad():
            theta = {
                n: (p - beta * d).requires_grad_(True)
                for (n, p), d in zip(theta.items(), direction, strict=True)
            }
    return _result(initial, theta, loss, logits, second.y)
