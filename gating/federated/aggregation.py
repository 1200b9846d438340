"""How the server turns the round's client updates into one direction, trusting none of them.

Each update is bounded in norm before it counts (clipping, as DP-FedAvg and Flower's clipping
wrappers do: a fixed bound, or an adaptive one relative to the round's median norm, so a single
client cannot move the model by more than a few honest clients' worth), then combined by a
weighted mean or a coordinate-wise robust rule (median, Yin et al. 2018, "Byzantine-Robust
Distributed Learning", arXiv 1803.01498; trimmed mean, ``scipy.stats.trim_mean``). With
client-level differential privacy the clipped updates are summed and Gaussian noise is added
to the sum (``gating.federated.privacy`` accounts for it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from conf.choices import Aggregation, Clipping

Params = dict[str, Tensor]


@dataclass(frozen=True)
class AggregationRule:
    clip: Clipping = Clipping.adaptive
    clip_factor: float = 3.0
    clip_norm: float = 1.0
    aggregation: Aggregation = Aggregation.mean
    trim_fraction: float = 0.2
    noise_multiplier: float = 0.0  # > 0: client-level DP with clip_norm = dp_clip_norm
    dp_clip_norm: float = 1.0

    @property
    def private(self) -> bool:
        return self.noise_multiplier > 0


#: A reply's deployed MAC ratio lies in [0, RATIO_BOUND] (checked): the sensitivity of their sum.
RATIO_BOUND = 2.0


@dataclass
class AggregationReport:
    norms: list[float]  # each update's norm before clipping, in the given order
    bound: float | None  # the norm bound applied (None: none)
    clipped: list[int] = field(default_factory=list)  # indices of the updates scaled down
    # the mean deployed MAC ratio the budget controller acts on (noisy under DP), if given
    ratio: float | None = None


def update_norm(update: Mapping[str, Tensor]) -> float:
    """The L2 norm of an update over all its tensors (float64)."""
    return float(torch.sqrt(sum(t.double().pow(2).sum() for t in update.values())))


def _bound(rule: AggregationRule, norms: Sequence[float]) -> float | None:
    if rule.private:
        return rule.dp_clip_norm
    if rule.clip is Clipping.fixed:
        return rule.clip_norm
    if rule.clip is Clipping.adaptive:
        # The lower median: of two updates the smaller, so one liar of two is still bounded
        # (the plain median of two norms is their mean, which a huge norm drags up with it).
        return rule.clip_factor * float(np.sort(norms)[(len(norms) - 1) // 2])
    return None


def aggregate(
    updates: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    rule: AggregationRule,
    generator: torch.Generator | None = None,
) -> tuple[Params, AggregationReport]:
    """One direction from ``updates`` (summed in the given order, which callers fix, so a
    resumed run adds in the same order). ``generator`` draws the DP noise."""
    if not updates or len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates and {len(weights)} weights")
    norms = [update_norm(u) for u in updates]
    bound = _bound(rule, norms)
    report = AggregationReport(norms, bound)
    scaled: list[Mapping[str, Tensor]] = []
    for index, (update, norm) in enumerate(zip(updates, norms, strict=True)):
        if bound is not None and norm > bound:
            factor = bound / norm
            update = {n: t * factor for n, t in update.items()}
            report.clipped.append(index)
        scaled.append(update)
    names = list(updates[0])
    if rule.private:
        return _private_mean(scaled, names, rule, generator), report
    if rule.aggregation is Aggregation.mean:
        weight = torch.tensor([float(w) for w in weights])
        weight = weight / weight.sum()
        direction = {}
        for name in names:
            stacked = torch.stack([u[name] for u in scaled])
            direction[name] = torch.tensordot(weight.to(stacked.dtype), stacked, dims=1)
        return direction, report
    return {name: _coordinatewise(scaled, name, rule) for name in names}, report


def _coordinatewise(updates: Sequence[Mapping[str, Tensor]], name: str, rule: AggregationRule):
    stacked = torch.stack([u[name] for u in updates])
    if rule.aggregation is Aggregation.median:
        # The mean of the two middle values for an even count, as numpy's median.
        return torch.from_numpy(np.median(stacked.numpy(), axis=0)).to(stacked.dtype)
    from scipy import stats  # only the server aggregates: clients never import scipy

    trimmed = stats.trim_mean(stacked.numpy(), rule.trim_fraction, axis=0)
    return torch.from_numpy(np.asarray(trimmed)).to(stacked.dtype)


def _private_mean(
    updates: Sequence[Mapping[str, Tensor]],
    names: list[str],
    rule: AggregationRule,
    generator: torch.Generator | None,
) -> Params:
    """(sum of clipped updates + N(0, (z C)^2 I)) / count: every client weighs the same, so
    one client changes the sum by at most C (the Gaussian mechanism's sensitivity)."""
    std = rule.noise_multiplier * rule.dp_clip_norm
    direction = {}
    for name in names:
        total = torch.stack([u[name] for u in updates]).sum(0)
        noise = torch.randn(total.shape, generator=generator, dtype=torch.float64)
        direction[name] = (total + (std * noise).to(total.dtype)) / len(updates)
    return direction


def budget_ratio(
    weights: Sequence[float],
    ratios: Sequence[float],
    rule: AggregationRule,
    generator: torch.Generator | None,
) -> float:
    """The round's deployed MAC ratio, which λ's dual ascent acts on: the weighted mean, or
    under DP the Gaussian mechanism on the sum of ratios clipped to [0, RATIO_BOUND] (noise
    ``noise_multiplier x RATIO_BOUND``, the multiplier of the updates: the accountant composes
    both), divided by the count, as the updates' private mean."""
    if not rule.private:
        return weighted_mean(weights, ratios)
    total = float(np.clip(np.asarray(ratios, dtype=np.float64), 0.0, RATIO_BOUND).sum())
    noise = float(torch.randn((), generator=generator, dtype=torch.float64))
    return (total + rule.noise_multiplier * RATIO_BOUND * noise) / len(ratios)


def weighted_mean(weights: Sequence[float], values: Sequence[float]) -> float:
    """A round's figure over its replies, each counted by its weight in the mean update (one
    function, so the strategy and the bare loop compute it bit for bit alike)."""
    share = np.asarray(weights, dtype=np.float64) / sum(weights)
    return float(np.dot(share, np.asarray(values, dtype=np.float64)))
