"""How the server turns the round's client updates into one direction, trusting none of them.

Each update is bounded in norm before it counts (clipping, as DP-FedAvg and Flower's clipping
wrappers do: a fixed bound, or an adaptive one relative to the round's median norm, so a single
client cannot move the model by more than a few honest clients' worth), then combined by a
weighted mean or a coordinate-wise robust rule (median, Yin et al. 2018, "Byzantine-Robust
Distributed Learning", arXiv 1803.01498; trimmed mean, ``scipy.stats.trim_mean``). With
client-level differential privacy the clipped updates are summed and Gaussian noise is added
to the sum (``gating.federated.privacy`` accounts for it).

The rules that assume at most f liars per round (``robust.byzantine``) work on whole updates:
Krum and Multi-Krum (Blanchard et al., NeurIPS 2017), Bulyan (El Mhamdi et al., ICML 2018), and
nearest-neighbour mixing before any rule (Allouah et al., AISTATS 2023). Centered clipping
(Karimireddy et al., ICML 2021) needs no f: it keeps the previous round's aggregate as the center
and adds the clipped differences to it. They are written here
because the algorithm layer may not import Flower, whose ``aggregate_krum`` and
``aggregate_bulyan`` are the reference they are tested against, and ByzFL's need torchvision,
matplotlib and seaborn at import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from conf.choices import Aggregation, Clipping

Params = dict[str, Tensor]


class RoundFailed(RuntimeError):
    """A round cannot update the model (too few usable replies, a non-finite result): the
    parameters stay as they were, so the last checkpoint stays the last good model."""


@dataclass(frozen=True)
class AggregationRule:
    clip: Clipping = Clipping.adaptive
    clip_factor: float = 3.0
    clip_norm: float = 1.0
    aggregation: Aggregation = Aggregation.mean
    trim_fraction: float = 0.2
    byzantine: int = 1  # f: liars per round that krum, multi_krum, bulyan and nnm withstand
    nnm: bool = False  # nearest-neighbour mixing before the rule
    cc_radius: float = 0.0  # centered clipping's radius (0: the round's median distance)
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
    center: Mapping[str, Tensor] | None = None,
) -> tuple[Params, AggregationReport]:
    """One direction from ``updates`` (summed in the given order, which callers fix, so a
    resumed run adds in the same order). ``generator`` draws the DP noise; ``center`` is the
    previous round's direction, which centered clipping starts from (None: zero)."""
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
    if rule.nnm:
        scaled = nearest_neighbour_mixing(scaled, rule.byzantine)
    if rule.aggregation is Aggregation.centered_clipping:
        if center is None:
            center = {n: torch.zeros_like(t) for n, t in updates[0].items()}
        return centered_clipping(scaled, weights, center, rule.cc_radius), report
    if rule.aggregation in WHOLE_UPDATE_RULES:
        return WHOLE_UPDATE_RULES[rule.aggregation](scaled, weights, rule.byzantine), report
    if rule.aggregation is Aggregation.mean:
        weight = torch.tensor([float(w) for w in weights])
        weight = weight / weight.sum()
        direction = {}
        for name in names:
            stacked = torch.stack([u[name] for u in scaled])
            direction[name] = torch.tensordot(weight.to(stacked.dtype), stacked, dims=1)
        return direction, report
    return {name: _coordinatewise(scaled, name, rule) for name in names}, report


def _flat(updates: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """The updates as rows of one float64 matrix (every tensor, in name order)."""
    names = list(updates[0])
    return torch.stack([torch.cat([u[n].double().flatten() for n in names]) for u in updates])


def _squared_distances(updates: Sequence[Mapping[str, Tensor]]) -> Tensor:
    flat = _flat(updates)
    return torch.cdist(flat, flat).pow(2)


def _weighted(updates: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> Params:
    share = torch.tensor([float(w) for w in weights], dtype=torch.float64)
    share = share / share.sum()
    return {
        n: torch.tensordot(share.to(updates[0][n].dtype), torch.stack([u[n] for u in updates]), 1)
        for n in updates[0]
    }


def krum_scores(updates: Sequence[Mapping[str, Tensor]], byzantine: int) -> Tensor:
    """Each update's Krum score: the summed squared distance to its n - f - 2 nearest others
    (at least one)."""
    distances = _squared_distances(updates)
    count = max(1, len(updates) - byzantine - 2)
    others = distances + torch.diag(torch.full((len(updates),), torch.inf, dtype=torch.float64))
    return torch.sort(others, dim=1).values[:, :count].sum(dim=1)


def krum(updates, weights, byzantine: int) -> Params:
    """The update with the lowest Krum score (the first of equals)."""
    best = int(torch.argmin(krum_scores(updates, byzantine)))
    return {n: t.clone() for n, t in updates[best].items()}


def multi_krum(updates, weights, byzantine: int) -> Params:
    """The weighted mean of the n - f updates with the lowest Krum scores."""
    keep = max(1, len(updates) - byzantine)
    chosen = torch.argsort(krum_scores(updates, byzantine), stable=True)[:keep].tolist()
    return _weighted([updates[i] for i in chosen], [weights[i] for i in chosen])


def bulyan(updates, weights, byzantine: int) -> Params:
    """Krum, applied n - 2f times to the updates left, picks a set; per coordinate, the mean of
    the n - 4f values of that set nearest its median."""
    if len(updates) < 4 * byzantine + 3:
        raise RoundFailed(
            f"Bulyan against f={byzantine} liars needs at least {4 * byzantine + 3} replies, "
            f"this round has {len(updates)} (lower robust.byzantine or raise "
            "federation.clients_per_round)"
        )
    left = list(range(len(updates)))
    chosen = []
    for _ in range(len(updates) - 2 * byzantine):
        scores = krum_scores([updates[i] for i in left], byzantine)
        chosen.append(left.pop(int(torch.argmin(scores))))
    beta = len(chosen) - 2 * byzantine
    result = {}
    for name in updates[0]:
        stacked = torch.stack([updates[i][name] for i in chosen]).double()
        median = stacked.median(dim=0).values if len(chosen) % 2 else stacked.quantile(0.5, dim=0)
        nearest = torch.argsort((stacked - median).abs(), dim=0, stable=True)[:beta]
        result[name] = stacked.gather(0, nearest).mean(dim=0).to(updates[0][name].dtype)
    return result


def nearest_neighbour_mixing(
    updates: Sequence[Mapping[str, Tensor]], byzantine: int
) -> list[Params]:
    """Each update replaced by the mean of its n - f nearest updates, itself included."""
    distances = _squared_distances(updates)
    keep = max(1, len(updates) - byzantine)
    nearest = torch.argsort(distances, dim=1, stable=True)[:, :keep]
    return [
        {n: torch.stack([updates[j][n] for j in row.tolist()]).mean(dim=0) for n in updates[0]}
        for row in nearest
    ]


def centered_clipping(
    updates: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    center: Mapping[str, Tensor],
    radius: float = 0.0,
) -> Params:
    """v + sum_i w_i clip(x_i - v), each difference scaled to norm at most ``radius`` (0: the
    lower median of the differences' norms), v the previous round's aggregate; one iteration,
    which Karimireddy et al. show suffices when v carries the history."""
    differences = [{n: u[n] - center[n] for n in center} for u in updates]
    norms = [update_norm(d) for d in differences]
    tau = radius if radius > 0 else float(np.sort(norms)[(len(norms) - 1) // 2])
    clipped = [
        {n: t * min(1.0, tau / norm) for n, t in d.items()} if norm > 0 else d
        for d, norm in zip(differences, norms, strict=True)
    ]
    moved = _weighted(clipped, weights)
    return {n: center[n] + moved[n] for n in center}


WHOLE_UPDATE_RULES = {
    Aggregation.krum: krum,
    Aggregation.multi_krum: multi_krum,
    Aggregation.bulyan: bulyan,
}


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
