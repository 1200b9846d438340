"""Reject client replies that must not enter the average, each with a reason worth logging."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Message

from gating.federated.protocol import METRICS, NUM_EXAMPLES, UPDATE
from gating.federated.server_step import RoundFailed

__all__ = ["RoundFailed", "train_metrics_problem", "update_problem"]

#: What a training reply may report besides its example count, and the plausible range.
TRAIN_METRIC_RANGES = {
    "query-loss": (0.0, math.inf),
    "query-accuracy": (0.0, 1.0),
    "flops-ratio": (0.0, 2.0),
}


def update_problem(msg: Message, expected: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why this training reply is unusable, or None when it is fine.

    ``expected`` maps every parameter name the reply must carry to its shape.
    """
    if msg.has_error():
        return f"the client failed: {msg.error.reason}"
    content = msg.content
    if UPDATE not in content.array_records:
        return f"no ArrayRecord {UPDATE!r}"
    if METRICS not in content.metric_records:
        return f"no MetricRecord {METRICS!r}"
    weight = content.metric_records[METRICS].get(NUM_EXAMPLES)
    if not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
        return f"{NUM_EXAMPLES} must be a positive number, got {weight!r}"
    update = content.array_records[UPDATE]
    missing = sorted(set(expected) - set(update))
    extra = sorted(set(update) - set(expected))
    if missing or extra:
        return f"wrong tensors: missing {missing[:3]}, unexpected {extra[:3]}"
    for name, shape in expected.items():
        try:
            array = update[name].numpy()
        except Exception as error:  # a corrupt payload is a bad reply, not a crash
            return f"{name}: unreadable array ({error})"
        if tuple(array.shape) != tuple(shape):
            return f"{name}: shape {tuple(array.shape)}, expected {tuple(shape)}"
        if not np.issubdtype(array.dtype, np.floating):
            return f"{name}: dtype {array.dtype}, expected a float type"
        if not np.isfinite(array).all():
            return f"{name}: non-finite values"
    return None


def train_metrics_problem(msg: Message) -> str | None:
    """Why a training reply's measurements cannot be believed, or None."""
    metrics = msg.content.metric_records[METRICS]
    for key, (low, high) in TRAIN_METRIC_RANGES.items():
        value = metrics.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"{key} is {value!r}, not a number"
        if not math.isfinite(value) or not low <= value <= high:
            return f"{key}={value} is outside [{low}, {high}]"
    return None
