"""The strategies: one module each, named as the strategy, holding its :class:`Strategy` record.

A strategy is its module here plus its YAML (``conf/strategy/<name>.yaml``: the command line's
way to set what the name implies, and the list of valid names). The record says what the name
implies for the config (checked on every run config, flat Flower configs included), the
client's half of a round, the settings it never reads, and its server step. The registry
imports a strategy's module the first time its name is looked up, so the shared machinery
(``gating.federated.settings``) can ask what a run's strategy is without importing them all.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from conf.choices import GateKind, StrategyName

if TYPE_CHECKING:
    from torch import Tensor

    from gating.federated.server_step import ServerStep
    from gating.federated.updates import ClientRound, ClientUpdate

#: Settings only the gated strategies read (a trailing "." stands for a whole group).
GATE_KEYS = (
    "gating.",
    "adapt.gate_lr",
    "adapt.order",
    "meta.gate_lr",
    "model.gate_hidden",
    "model.gate_bias",
)
#: Settings only the strategies that train locally read.
LOCAL_KEYS = ("local.",)
#: What a strategy that sends θ - θ_local fixes: it trains the head it sends (no zero head), and
#: its update holds no step sizes.
SENDS_LOCAL_WEIGHTS = MappingProxyType({"adapt.zero_head": False, "adapt.learn_step_sizes": False})


def meta_gradient_examples(cfg: DictConfig) -> int:
    """A meta-gradient rests on its query examples: ``tasks_per_client x ways x queries``."""
    return cfg.task.tasks_per_client * cfg.task.ways * cfg.task.queries


def local_training_examples(cfg: DictConfig) -> int:
    """Local training rests on ``local.steps`` batches of ``ways`` classes."""
    return cfg.local.steps * cfg.task.ways


@dataclass(frozen=True)
class Strategy:
    """Everything a strategy's name implies."""

    name: str
    update: Callable[[ClientRound], ClientUpdate]  # a sampled client's half of a round
    # the examples an honest update rests on: the server bounds every claimed count by it
    examples: Callable[[DictConfig], int] = meta_gradient_examples
    gated: bool = False  # learns gates (and a gate stage in Adapt)
    gates: GateKind = GateKind.conditional  # what its gates, if any, decide from
    # a dense network narrowed uniformly until its MACs are at most gating.target_ratio of the
    # configured network's: the static baseline at MetaGater's budget
    narrow: bool = False
    fixes: Mapping[str, Any] = field(default_factory=dict)  # config values the name implies
    unread: tuple[str, ...] = ()  # settings it never reads (a trailing "." : a whole group)
    # the server's half, from the run config and round 1's parameters; None: the shared one
    # (gating.federated.round.server_step_for: aggregation, one optimizer per group)
    server_step: Callable[[DictConfig, dict[str, Tensor]], ServerStep] | None = None

    def check(self, cfg: DictConfig) -> None:
        """Raise ValueError, naming the setting, where ``cfg`` contradicts the name."""
        for key, value in self.fixes.items():
            actual = OmegaConf.select(cfg, key)
            if actual != value:
                raise ValueError(
                    f"{key}={actual} does not suit strategy={self.name}, which implies "
                    f"{key}={value} (gating/federated/strategies/{self.name}.py says why)"
                )

    def reads(self, key: str) -> bool:
        return not any(key == k or (k.endswith(".") and key.startswith(k)) for k in self.unread)


@cache
def strategy_named(name: str) -> Strategy:
    """The record of strategy ``name`` (its module's ``STRATEGY``)."""
    name = StrategyName(name).value  # a clear error for a name without a YAML
    strategy = importlib.import_module(f"{__name__}.{name}").STRATEGY
    if strategy.name != name:
        raise RuntimeError(f"{__name__}.{name} holds the record of {strategy.name!r}")
    return strategy


def strategy_of(cfg: DictConfig) -> Strategy:
    """The run's strategy, after checking that ``cfg`` does not contradict it."""
    strategy = strategy_named(str(cfg.strategy.name))
    strategy.check(cfg)
    return strategy
