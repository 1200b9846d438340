"""Batch-shaping: a loss that keeps every gate input-dependent.

Bejnordi, Blankevoort and Welling, "Batch-shaping for learning conditional channel gated
networks", ICLR 2020 (arXiv 1907.06627). Trained with a compute penalty alone, gates collapse to
always-on or always-off: a static mask, one for every input. Batch-shaping matches, per gate
channel, the distribution of its open probability over a batch of inputs to a Beta(0.6, 0.4)
prior, whose mass sits near 0 and near 1: the channel must open for some inputs and stay shut
for others. The distance is the Cramér-von Mises criterion between the batch's empirical CDF and
the prior's: with the batch's values sorted, ``mean_i (F(x_(i)) - i / (N + 1))^2``.

The Beta CDF (the regularized incomplete beta function) has no torch op, and the loss must be
differentiable to second order (it enters meta-gradients through ``Adapt``) and vmappable, so it
is computed here from torch ops by Gauss-Legendre quadrature: for x <= 1/2, substituting
t = x u^(1/a) turns ``I_x(a, b) = ∫_0^x t^(a-1) (1-t)^(b-1) dt / B(a, b)`` into
``x^a / (a B(a, b)) ∫_0^1 (1 - x u^(1/a))^(b-1) du``, whose integrand is smooth and bounded;
x > 1/2 uses ``I_x(a, b) = 1 - I_(1-x)(b, a)``. Tested against ``scipy.special.betainc``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from gating.model.spec import LayerTrace

#: The prior of Bejnordi et al.: open for about 60% of inputs, mass near 0 and 1.
PRIOR = (0.6, 0.4)
#: Gauss-Legendre nodes: the integrands are smooth on [0, 1]; 24 nodes give ~1e-9.
NODES = 24
#: Probabilities are kept this far from 0 and 1, where the CDF's slope is infinite.
EDGE = 1e-6


@lru_cache(maxsize=8)
def _legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on [0, 1]."""
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return (nodes + 1) / 2, weights / 2


def _lower_tail(x: Tensor, a: float, b: float) -> Tensor:
    """I_x(a, b) for x in (0, 1/2] by the substitution t = x u^(1/a)."""
    nodes, weights = _legendre(NODES)
    u = torch.as_tensor(nodes, dtype=x.dtype, device=x.device) ** (1 / a)
    w = torch.as_tensor(weights, dtype=x.dtype, device=x.device)
    integral = ((1 - x[..., None] * u) ** (b - 1) * w).sum(-1)
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return x**a * integral / (a * math.exp(log_beta))


def beta_cdf(x: Tensor, a: float = PRIOR[0], b: float = PRIOR[1]) -> Tensor:
    """The Beta(a, b) CDF at ``x``, elementwise, differentiable to any order."""
    x = x.clamp(EDGE, 1 - EDGE)
    low = x <= 0.5
    lower = _lower_tail(torch.where(low, x, 0.5), a, b)
    upper = 1 - _lower_tail(torch.where(low, 0.5, 1 - x), b, a)
    return torch.where(low, lower, upper)


def batch_shaping_loss(trace: list[LayerTrace], prior: tuple[float, float] = PRIOR) -> Tensor:
    """Cramér-von Mises distance between each gated channel's open probabilities over the batch
    and the prior, averaged over channels (so its scale does not depend on the network)."""
    probs = torch.cat([layer.prob for layer in trace if layer.prob is not None], dim=1)
    batch = probs.shape[0]
    ordered, _ = torch.sort(probs, dim=0)
    empirical = torch.arange(1, batch + 1, dtype=probs.dtype, device=probs.device) / (batch + 1)
    return ((beta_cdf(ordered, *prior) - empirical[:, None]) ** 2).mean()
