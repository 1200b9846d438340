"""The privacy a run has spent: client-level (ε, δ) of everything its server releases.

What a training client's data influences and the server publishes or acts on, per round:

- the sum of clipped client updates, through a Gaussian mechanism (sensitivity one clip norm,
  noise ``noise_multiplier`` times it): it becomes the next model;
- with gates, the sum of the clients' deployed MAC ratios, clipped to [0, 2], through a Gaussian
  mechanism with the same multiplier (``aggregation.budget_ratio``): λ's dual ascent acts on it
  and the history publishes it;
- nothing else: the clients' query loss, accuracy and training MAC ratio, the count of clipped
  updates and their norms are neither published nor acted on (``protocol.UNRELEASED_UNDER_DP``;
  the history holds null there).

Google's ``dp-accounting`` RDP accountant composes all of them. No amplification by sampling is
claimed: the server samples a fixed number of nodes without replacement, which the Poisson-
sampling analysis does not cover, so ε is the bound for a client that took part in every round
(as Flower's fixed-clipping accounting). Target nodes are not training clients: each reports
its own accuracy after ``Adapt`` (the run's result), which this guarantee does not cover.
"""

from __future__ import annotations

import math

from dp_accounting import GaussianDpEvent
from dp_accounting.rdp import RdpAccountant


def epsilon(
    noise_multiplier: float, rounds: int, delta: float, mechanisms_per_round: int = 1
) -> float:
    """ε at ``delta`` after ``rounds`` rounds of ``mechanisms_per_round`` Gaussian mechanisms
    each (2 with gates: the updates and the deployed ratios); inf without noise, 0 before any."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    accountant = RdpAccountant()
    accountant.compose(GaussianDpEvent(noise_multiplier), rounds * mechanisms_per_round)
    return float(accountant.get_epsilon(delta))
