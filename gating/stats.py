"""Intervals for the figures a run reports: Student-t, so that two seeds get an honest width."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t confidence interval (NaN below 2 values)."""
    from scipy import stats  # imported here: every ClientApp process would pay ~1 s for it

    array = np.asarray(values, dtype=float)
    if len(array) < 2:
        return float(array.mean()), math.nan
    half = stats.sem(array) * stats.t.ppf(0.975, len(array) - 1)
    return float(array.mean()), float(half)
