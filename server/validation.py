"""Reject client replies that must not enter the average, each with a reason worth logging."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Message

from gating.federated.protocol import (
    METRICS,
    NODE,
    NUM_EXAMPLES,
    PARTITION_KEY,
    TRAIN_METRIC_RANGES,
    UPDATE,
    range_problem,
)
from gating.federated.server_step import RoundFailed

__all__ = ["RoundFailed", "node_problem", "read_update", "train_metrics_problem"]

#: The dtypes an update's arrays may have (what torch takes natively).
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
#: The model is float32: a finite float64 beyond this becomes inf in it.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def read_update(
    msg: Message, expected: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray] | str:
    """The training reply's update as arrays, or why it is unusable.

    ``expected`` maps every parameter name the reply must carry to its shape. Each array is
    decoded once, here (decoding parses a header per array: a large part of a small model's
    server time), and the caller aggregates these very arrays.
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
    arrays: dict[str, np.ndarray] = {}
    for name, shape in expected.items():
        try:
            array = arrays[name] = update[name].numpy()
        except Exception as error:  # a corrupt payload is a bad reply, not a crash
            return f"{name}: unreadable array ({error})"
        if tuple(array.shape) != tuple(shape):
            return f"{name}: shape {tuple(array.shape)}, expected {tuple(shape)}"
        if array.dtype not in FLOAT_DTYPES or not array.dtype.isnative:
            # torch takes native float16/32/64 only (not longdouble, not another byte order)
            return f"{name}: dtype {array.dtype.str}, expected float16, float32 or float64"
        if not np.isfinite(array).all():
            return f"{name}: non-finite values"
        if array.size and float(np.abs(array).max()) > FLOAT32_MAX:
            return f"{name}: values beyond float32's range (the model's)"
    return arrays


def train_metrics_problem(msg: Message) -> str | None:
    """Why a training reply's measurements cannot be believed, or None."""
    return range_problem(msg.content.metric_records[METRICS], TRAIN_METRIC_RANGES)


#: What a node may report about its data: anything else is a broken or lying node.
MAX_CHANNELS, MAX_IMAGE_SIZE = 16, 1024


def node_problem(msg: Message) -> str | None:
    """Why a discovery reply (who a node is, its data's shape) cannot be used, or None."""
    if msg.has_error():
        return f"it could not set up its task: {msg.error.reason}"
    content = msg.content
    if NODE not in content.config_records or METRICS not in content.metric_records:
        return f"its reply lacks the {NODE!r} or {METRICS!r} record"
    info, metrics = content.config_records[NODE], content.metric_records[METRICS]
    if info.get("role") not in ("train", "target"):
        return f"role {info.get('role')!r} is neither train nor target"
    partition = info.get(PARTITION_KEY)
    if isinstance(partition, bool) or not isinstance(partition, int) or partition < 0:
        return f"{PARTITION_KEY} {partition!r} is not a non-negative integer"
    for key, top in (("channels", MAX_CHANNELS), ("image-size", MAX_IMAGE_SIZE)):
        value = metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
            return f"{key} {value!r} is not an integer in [1, {top}]"
    return None
