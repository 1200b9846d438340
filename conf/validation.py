"""What types cannot say about a configuration: ranges, and what settings imply for each other.

Checked where the config is read (before Ray starts, before any node exists), so that an
impossible setting fails in one line that names the key and the fix, instead of as a generic
round failure with the cause in a worker's log. Choices are enums (``conf.choices``), checked
by OmegaConf itself; what a strategy's name implies is checked by its record
(``gating.federated.strategies``) wherever the run's strategy is looked up; the data-dependent
checks (enough classes and samples) run in ``simulate.preflight``.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from conf.choices import Aggregation, Weighting


@dataclass(frozen=True)
class Check:
    key: str
    ok: Callable[[DictConfig], bool]
    expected: str  # what a valid value is, and the fix when it is not obvious


def _replies_needed(cfg: DictConfig) -> int:
    """The replies a round needs for its aggregation rule against ``robust.byzantine`` liars."""
    f = cfg.robust.byzantine
    needed = {Aggregation.krum: 2 * f + 3, Aggregation.multi_krum: 2 * f + 3}
    needed[Aggregation.bulyan] = 4 * f + 3
    return max(needed.get(cfg.robust.aggregation, 1), f + 1 if cfg.robust.nnm else 1)


def _device(value: str) -> bool:
    return bool(re.fullmatch(r"auto|cpu|cuda(:\d+)?", value))


def _fraction(value: str) -> bool:
    if value == "auto":
        return True
    try:
        return 0.0 <= float(value) < 1.0
    except ValueError:
        return False


#: torch seeds its generators from 64 bits; the seed is combined with node and round ids.
MAX_SEED = 2**32

CHECKS = (
    Check("seed", lambda c: 0 <= c.seed < MAX_SEED, f"in [0, {MAX_SEED})"),
    Check("task.ways", lambda c: c.task.ways >= 2, ">= 2"),
    Check("task.shots", lambda c: c.task.shots >= 1, ">= 1"),
    Check("task.queries", lambda c: c.task.queries >= 1, ">= 1"),
    Check(
        "task.train_pool",
        lambda c: c.task.train_pool >= c.task.shots + c.task.queries,
        ">= task.shots + task.queries (a training node draws an episode from it)",
    ),
    Check("task.tasks_per_client", lambda c: c.task.tasks_per_client >= 1, ">= 1"),
    Check("task.holdout_samples", lambda c: 0.0 <= c.task.holdout_samples < 1.0, "in [0, 1)"),
    Check("task.holdout_classes", lambda c: _fraction(c.task.holdout_classes), "auto or in [0, 1)"),
    Check("model.width", lambda c: c.model.width >= 1, ">= 1"),
    Check("model.depth", lambda c: c.model.depth >= 1, ">= 1"),
    Check("model.gate_hidden", lambda c: c.model.gate_hidden >= 1, ">= 1"),
    Check("gating.target_ratio", lambda c: 0 < c.gating.target_ratio <= 1.5, "in (0, 1.5]"),
    Check("gating.lambda", lambda c: c.gating["lambda"] >= 0, ">= 0 (0: no regularizer)"),
    Check("gating.warmup_rounds", lambda c: c.gating.warmup_rounds >= 0, ">= 0"),
    Check("gating.lambda_lr", lambda c: c.gating.lambda_lr >= 0, ">= 0"),
    Check("gating.shaping", lambda c: 0 <= c.gating.shaping < math.inf, ">= 0 (0: off)"),
    Check("gating.shaping_rounds", lambda c: c.gating.shaping_rounds >= 0, ">= 0 (0: constant)"),
    Check(
        "gating.temperature",
        lambda c: math.isfinite(c.gating.temperature) and c.gating.temperature > 0,
        "> 0 (the gates divide by it; 2/3 is the default)",
    ),
    Check("adapt.backbone_lr", lambda c: c.adapt.backbone_lr >= 0, ">= 0"),
    Check("adapt.gate_lr", lambda c: c.adapt.gate_lr >= 0, ">= 0"),
    Check("adapt.inner_steps", lambda c: c.adapt.inner_steps >= 0, ">= 0"),
    Check(
        "adapt.learn_step_sizes",
        lambda c: not c.adapt.learn_step_sizes or not c.meta.first_order,
        "false with meta.first_order=true (a first-order meta-gradient is zero for step sizes)",
    ),
    Check("meta.backbone_lr", lambda c: c.meta.backbone_lr > 0, "> 0"),
    Check("meta.gate_lr", lambda c: c.meta.gate_lr > 0, "> 0"),
    Check("local.steps", lambda c: c.local.steps >= 1, ">= 1"),
    Check("local.lr", lambda c: c.local.lr > 0, "> 0"),
    Check(
        "local.hessian_delta",
        lambda c: c.local.hessian_delta >= 0,
        ">= 0 (0: the exact Hessian-vector product)",
    ),
    Check("federation.train_nodes", lambda c: c.federation.train_nodes >= 1, ">= 1"),
    Check("federation.target_nodes", lambda c: c.federation.target_nodes >= 1, ">= 1"),
    Check(
        "federation.clients_per_round",
        lambda c: 1 <= c.federation.clients_per_round <= c.federation.train_nodes,
        "between 1 and federation.train_nodes",
    ),
    Check(
        "federation.min_train_replies",
        lambda c: 0 <= c.federation.min_train_replies <= c.federation.clients_per_round,
        "between 0 (= half the sampled nodes + 1) and federation.clients_per_round",
    ),
    Check("federation.rounds", lambda c: c.federation.rounds >= 1, ">= 1"),
    Check("federation.eval_every", lambda c: c.federation.eval_every >= 1, ">= 1"),
    Check("federation.eval_nodes", lambda c: c.federation.eval_nodes >= 0, ">= 0 (0: all)"),
    Check("federation.timeout", lambda c: c.federation.timeout > 0, "> 0 seconds"),
    Check("robust.clip_factor", lambda c: c.robust.clip_factor > 0, "> 0"),
    Check("robust.clip_norm", lambda c: c.robust.clip_norm > 0, "> 0"),
    Check("robust.trim_fraction", lambda c: 0 <= c.robust.trim_fraction < 0.5, "in [0, 0.5)"),
    Check(
        "robust.cc_radius",
        lambda c: math.isfinite(c.robust.cc_radius) and c.robust.cc_radius >= 0,
        ">= 0 (0: the round's median distance to the previous aggregate)",
    ),
    Check("robust.byzantine", lambda c: c.robust.byzantine >= 0, ">= 0"),
    Check(
        "robust.byzantine",
        lambda c: c.federation.clients_per_round >= _replies_needed(c),
        "small enough for federation.clients_per_round: krum and multi_krum need 2f + 3 "
        "replies, bulyan 4f + 3, nnm f + 1",
    ),
    Check(
        "robust.nnm",
        lambda c: c.privacy.noise_multiplier == 0 or not c.robust.nnm,
        "false when privacy.noise_multiplier > 0 (mixing changes one client's influence)",
    ),
    Check("privacy.noise_multiplier", lambda c: c.privacy.noise_multiplier >= 0, ">= 0 (0: off)"),
    Check("privacy.clip_norm", lambda c: c.privacy.clip_norm > 0, "> 0"),
    Check("privacy.delta", lambda c: 0 < c.privacy.delta < 1, "in (0, 1)"),
    Check(
        "robust.aggregation",
        lambda c: c.privacy.noise_multiplier == 0 or c.robust.aggregation is Aggregation.mean,
        "mean when privacy.noise_multiplier > 0 (the accountant's analysis is of the noisy mean)",
    ),
    Check(
        "robust.weighting",
        lambda c: c.privacy.noise_multiplier == 0 or c.robust.weighting is Weighting.expected,
        "expected when privacy.noise_multiplier > 0 (a client's claim must not scale its update)",
    ),
    Check("device", lambda c: _device(c.device), "auto, cpu, cuda or cuda:N"),
    Check(
        "ray.client_gpus",
        lambda c: c.ray.client_gpus is None or c.ray.client_gpus >= 0,
        ">= 0 (0.25: four actors share a GPU), or null to choose by device",
    ),
    Check("ray.num_gpus", lambda c: c.ray.num_gpus is None or c.ray.num_gpus >= 0, ">= 0"),
    Check("ray.num_cpus", lambda c: c.ray.num_cpus >= 1, ">= 1"),
    Check(
        "ray.client_cpus",
        lambda c: 0 < c.ray.client_cpus <= max(c.ray.num_cpus, 1) or bool(c.ray.address),
        "> 0 and at most ray.num_cpus, or no ClientApp actor can start",
    ),
    Check("sweep.penalty", lambda c: "sweep" not in c or c.sweep.penalty >= 0, ">= 0"),
)


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """Flat ``{"a.b": value}`` of a nested container (``OmegaConf.to_container`` output)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def validate(cfg: DictConfig, schema: type | None = None) -> DictConfig:
    """Raise ValueError naming the first invalid key, its value and what is expected: a key
    that ``schema`` (a structured config class) lacks, a number that is not finite, or a
    value a check refuses."""
    given = leaves(OmegaConf.to_container(cfg, resolve=True))
    given = {k: v for k, v in given.items() if not k.startswith("hydra.")}
    if schema is not None:
        known = leaves(OmegaConf.to_container(OmegaConf.structured(schema)))
        for key in sorted(set(given) - set(known)):  # Hydra's `+key=...` adds unknown keys
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"unknown config key {key}{hint}: conf/schema.py has no such key")
    for key, value in given.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"config key {key}={value!r} is invalid: expected a finite number")
    for check in CHECKS:
        if not check.ok(cfg):
            value = OmegaConf.select(cfg, check.key)
            raise ValueError(
                f"config key {check.key}={value!r} is invalid: expected {check.expected}"
            )
    return cfg
