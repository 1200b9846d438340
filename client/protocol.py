"""The wire format between the ServerApp and the ClientApp: record keys and config encoding.

Every message carries the whole run configuration (flattened, typed on arrival against
``conf.schema``) so a client never depends on ``context.run_config``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord
from omegaconf import DictConfig

from conf.schema import settings_from_flat, to_flat

ARRAYS = "arrays"  # server -> client: the meta-initialization (backbone.* and gate.* tensors)
CONFIG = "config"  # server -> client: the run configuration plus per-round values
UPDATE = "update"  # client -> server: meta-gradients, keyed like the parameters
METRICS = "metrics"  # client -> server: num-examples and the client's measurements
NODE = "node"  # client -> server (query): who this node is

ROUND_KEY = "server-round"
REG_WEIGHT_KEY = "reg-weight"
NUM_EXAMPLES = "num-examples"
PER_ROUND_KEYS = (ROUND_KEY, REG_WEIGHT_KEY)


def encode_config(cfg: DictConfig, **per_round: Any) -> ConfigRecord:
    return ConfigRecord({**to_flat(cfg), **per_round})


def decode_config(record: Mapping[str, Any]) -> tuple[DictConfig, dict[str, Any]]:
    """Split a received ConfigRecord into the typed run config and the per-round values."""
    per_round = {k: record[k] for k in PER_ROUND_KEYS if k in record}
    settings = settings_from_flat({k: v for k, v in record.items() if k not in PER_ROUND_KEYS})
    return settings, per_round
