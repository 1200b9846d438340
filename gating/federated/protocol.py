"""What the ServerApp and the ClientApp agree on: record keys and the config's wire form.

Every message carries the whole run configuration (flattened, typed on arrival against
``conf.schema``) so a client never depends on ``context.run_config``. Plain strings and dicts:
the Flower shells wrap them in records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from omegaconf import DictConfig, OmegaConf

from conf.schema import settings_from_flat, to_flat

ARRAYS = "arrays"  # server -> client: the meta-initialization (backbone.* and gate.* tensors)
CONFIG = "config"  # server -> client: the run configuration plus per-round values
UPDATE = "update"  # client -> server: the update direction, keyed like the parameters
METRICS = "metrics"  # client -> server: num-examples and the client's measurements
NODE = "node"  # client -> server (query): who this node is
RUNTIME = "runtime"  # client -> server: where the ClientApp ran ({RAY_NODE: id} under Ray)
RAY_NODE = "ray-node"

ROUND_KEY = "server-round"
REG_WEIGHT_KEY = "reg-weight"
NUM_EXAMPLES = "num-examples"
PARTITION_KEY = "partition-id"
PER_ROUND_KEYS = (ROUND_KEY, REG_WEIGHT_KEY)
#: What a training reply measured besides its example count (weighted means per round), and
#: each figure's plausible range: a value outside it means a broken or lying node.
TRAIN_METRIC_RANGES = {
    "query-loss": (0.0, math.inf),
    "query-accuracy": (0.0, 1.0),
    "flops-ratio": (0.0, 2.0),
    "deployed-flops-ratio": (0.0, 2.0),
}
TRAIN_METRICS = tuple(TRAIN_METRIC_RANGES)
#: The numbers of a target node's evaluation report (``gating.federated.evaluation``) and
#: their plausible ranges, as above.
REPORT_RANGES = {
    "accuracy": (0.0, 1.0),
    "accuracy-transductive": (0.0, 1.0),
    "accuracy-before": (0.0, 1.0),
    "nearest-centroid-accuracy": (0.0, 1.0),
    "loss": (0.0, math.inf),
    "flops-ratio": (0.0, 2.0),
    "macs": (0.0, math.inf),
    "dense-macs": (1.0, math.inf),
}
#: What the training replies measure on the clients' own data and no mechanism privatizes:
#: under DP the server neither publishes nor acts on them (the deployed ratio goes through one).
UNRELEASED_UNDER_DP = ("query-loss", "query-accuracy", "flops-ratio")


def range_problem(
    values: Mapping[str, Any], ranges: Mapping[str, tuple[float, float]]
) -> str | None:
    """Why a reply's reported numbers cannot be believed (one missing, not a finite number, or
    outside its range), or None: the one check for training replies and evaluation reports."""
    for key, (low, high) in ranges.items():
        value = values.get(key)
        if value is None:
            return f"no {key} in its metrics"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"{key} is {value!r}, not a number"
        if not math.isfinite(value) or not low <= value <= high:
            return f"{key}={value} is outside [{low}, {high}]"
    return None


# A flat config as a hashable key: (name, type name, value) per entry, lists as tuples. The type
# is part of the key because 1, 1.0 and True hash alike but need not decode alike.
_FrozenConfig = tuple[tuple[str, str, Any], ...]


def encode_config(cfg: DictConfig | Mapping[str, Any], **per_round: Any) -> dict[str, Any]:
    """``cfg`` typed, or already flattened (the server flattens once per run, not per round)."""
    flat = to_flat(cfg) if isinstance(cfg, DictConfig) else cfg
    return {**flat, **per_round}


def decode_config(record: Mapping[str, Any]) -> tuple[DictConfig, dict[str, Any]]:
    """Split a received config into the typed run config and the per-round values.

    The typed config is cached by the record's settings: merging them onto the schema costs
    about 10 ms (OmegaConf), as much as a sixth of a client's whole meta-gradient on the
    default digits tasks, and every message of a run carries the same settings. The cached
    config is read-only, so no caller can change what later messages decode to.
    """
    per_round = {k: record[k] for k in PER_ROUND_KEYS if k in record}
    settings = {k: v for k, v in record.items() if k not in PER_ROUND_KEYS}
    try:
        key = _freeze(settings)
    except TypeError:  # an unhashable value: decode without the cache
        return settings_from_flat(settings), per_round
    return _decode_settings(key), per_round


def _freeze(settings: Mapping[str, Any]) -> _FrozenConfig:
    frozen = tuple(
        sorted(
            (name, type(value).__name__, tuple(value) if isinstance(value, list) else value)
            for name, value in settings.items()
        )
    )
    hash(frozen)  # raises TypeError for anything unhashable inside
    return frozen


@lru_cache(maxsize=8)
def _decode_settings(key: _FrozenConfig) -> DictConfig:
    settings = {name: list(value) if kind == "list" else value for name, kind, value in key}
    cfg = settings_from_flat(settings)
    OmegaConf.set_readonly(cfg, True)
    return cfg
