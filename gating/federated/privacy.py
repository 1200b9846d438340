"""The privacy a run has spent: client-level (ε, δ) of its noisy aggregations.

Each round releases one Gaussian mechanism on the sum of clipped client updates (sensitivity
one clip norm, noise ``noise_multiplier`` times it). Google's ``dp-accounting`` RDP accountant
composes them. No amplification by sampling is claimed: the server samples a fixed number of
nodes without replacement, which the Poisson-sampling analysis does not cover, so ε is the
bound for a client that took part in every round (as Flower's fixed-clipping accounting).
"""

from __future__ import annotations

import math

from dp_accounting import GaussianDpEvent
from dp_accounting.rdp import RdpAccountant


def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε after ``rounds`` noisy aggregations at ``delta`` (inf without noise, 0 before any)."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    accountant = RdpAccountant()
    accountant.compose(GaussianDpEvent(noise_multiplier), rounds)
    return float(accountant.get_epsilon(delta))
