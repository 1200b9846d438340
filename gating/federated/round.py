"""One round of federated meta-learning without Flower: sample nodes, their updates, the step.

:class:`NodeSampler` is the Flower strategy's sampling too; :class:`BareFederation` runs the
rounds in one process with the very functions the ClientApp and the strategy call, which is
what the benchmarks compare Flower against and what trains a model when no federation is
needed (the gated-inference benchmark).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig
from torch import Tensor

from conf.choices import Weighting
from gating.data import NodeTask
from gating.federated.aggregation import AggregationReport, AggregationRule
from gating.federated.budget import RegularizerWeight
from gating.federated.nodes import partition_task
from gating.federated.server_step import Params, ServerStep
from gating.federated.settings import (
    learned_groups,
    model_spec,
    run_parameters,
)
from gating.federated.strategies import strategy_of
from gating.federated.updates import (
    ClientRound,
    ClientUpdate,
    client_update,
)
from gating.meta import STEP
from gating.model import BACKBONE, GATE


class NodeSampler:
    """Seeded sampling over sorted partition ids, so a resumed run (whose Flower node ids are
    new) samples the same nodes as an uninterrupted one. Training draws from one stream kept
    across rounds (its state is checkpointed); the target nodes of an intermediate evaluation
    are a function of (seed, round) alone, so how often and how widely a run evaluates never
    changes which nodes train."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)

    def train(self, partitions: Sequence[int], count: int) -> list[int]:
        """``count`` (or all, if fewer) of ``partitions``, in sampling order."""
        return self.rng.sample(sorted(partitions), min(count, len(partitions)))

    def evaluate(self, partitions: Sequence[int], count: int, server_round: int) -> list[int]:
        """``count`` of ``partitions``, sorted; all of them when ``count`` is 0 or too large."""
        partitions = sorted(partitions)
        if 0 < count < len(partitions):
            draw = random.Random(f"evaluate/{self.seed}/{server_round}")
            return sorted(draw.sample(partitions, count))
        return partitions

    def getstate(self) -> Any:
        return self.rng.getstate()

    def setstate(self, state: Any) -> None:
        self.rng.setstate(state)


def aggregation_rule(cfg: DictConfig) -> AggregationRule:
    return AggregationRule(
        clip=cfg.robust.clip,
        clip_factor=cfg.robust.clip_factor,
        clip_norm=cfg.robust.clip_norm,
        aggregation=cfg.robust.aggregation,
        trim_fraction=cfg.robust.trim_fraction,
        cc_radius=cfg.robust.cc_radius,
        byzantine=cfg.robust.byzantine,
        nnm=cfg.robust.nnm,
        noise_multiplier=cfg.privacy.noise_multiplier,
        dp_clip_norm=cfg.privacy.clip_norm,
    )


def server_step_for(cfg: DictConfig, params: Params) -> ServerStep:
    """The run's server step over ``params``: its strategy's own, or the shared one."""
    own = strategy_of(cfg).server_step
    return own(cfg, params) if own is not None else shared_server_step(cfg, params)


def shared_server_step(cfg: DictConfig, params: Params) -> ServerStep:
    """Aggregation, then one optimizer per learned parameter group."""
    return ServerStep(
        params,
        learned_groups(cfg),
        cfg.meta.optimizer,
        # Meta-SGD's step sizes take the backbone's meta step, as in Li et al. (2017)
        {BACKBONE: cfg.meta.backbone_lr, GATE: cfg.meta.gate_lr, STEP: cfg.meta.backbone_lr},
        aggregation_rule(cfg),
        cfg.seed,
    )


def bounded_weight(claimed: float, expected: float | None) -> float:
    """A reply's weight in the mean: the client's claimed example count, bounded by what the
    server knows the node's task holds (None: the bare claim, ``robust.weighting=claimed``)."""
    return claimed if expected is None else min(claimed, expected)


def weight_bound(cfg: DictConfig) -> float | None:
    """What an honest reply's example count is, which bounds every claim; None under
    ``robust.weighting=claimed`` (every claim is believed)."""
    if cfg.robust.weighting is Weighting.claimed:
        return None
    return strategy_of(cfg).examples(cfg)


@dataclass(frozen=True)
class NodeReply:
    """A training node's usable reply, as the server's half of a round takes it."""

    partition: int
    update: Mapping[str, Tensor]
    examples: float  # what the node claims it trained on
    deployed_flops_ratio: float  # what it measured for its deployed gates


@dataclass(frozen=True)
class AggregatedRound:
    replies: list[NodeReply]  # in the order they were summed: by partition
    weights: list[float]  # each reply's weight in the mean (its claim, bounded)
    report: AggregationReport


def aggregate_round(
    step: ServerStep,
    replies: Sequence[NodeReply],
    server_round: int,
    expected: float | None,
    regularizer_weight: RegularizerWeight | None,
) -> AggregatedRound:
    """The server's half of a round, for the Flower strategy and :class:`BareFederation` alike:
    the replies in partition order (the server's own ids, not a reply's claim, so the
    floating-point sum and a resumed run are reproducible), each claimed example count bounded
    by ``expected``, the :class:`ServerStep`, then λ's dual-ascent step on the round's deployed
    MAC ratio (None: λ is not the caller's). Raises :class:`RoundFailed` with nothing changed
    when the step would not be finite."""
    ordered = sorted(replies, key=lambda reply: reply.partition)
    weights = [bounded_weight(reply.examples, expected) for reply in ordered]
    report = step.apply(
        [reply.update for reply in ordered],
        weights,
        server_round,
        ratios=[reply.deployed_flops_ratio for reply in ordered],
    )
    if regularizer_weight is not None:
        regularizer_weight.observe(server_round, report.ratio)
    return AggregatedRound(ordered, weights, report)


@dataclass
class BareRound:
    partitions: list[int]  # in sampling (dispatch) order
    updates: list[ClientUpdate]
    client_seconds: list[float]
    server_seconds: float


class BareFederation:
    """The run's meta-training in this process: the ClientApp's :func:`client_update` for each
    node the strategy's :class:`NodeSampler` picks, then the strategy's :class:`ServerStep`."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.tasks: dict[int, NodeTask] = {  # node_role: the first partitions train
            p: partition_task(cfg, p) for p in range(cfg.federation.train_nodes)
        }
        self.spec = model_spec(cfg, self.tasks[0])
        self.step = server_step_for(cfg, run_parameters(cfg, self.spec))
        self.sampler = NodeSampler(cfg.seed)
        self.regularizer_weight = RegularizerWeight(cfg)

    @property
    def params(self) -> Params:
        return self.step.params

    def round(self, server_round: int) -> BareRound:
        partitions = self.sampler.train(list(self.tasks), self.cfg.federation.clients_per_round)
        weight = self.regularizer_weight(server_round)
        params = self.params
        updates, seconds = [], []
        for partition in partitions:
            start = time.perf_counter()
            job = ClientRound(self.cfg, self.tasks[partition], params, server_round, weight)
            updates.append(client_update(job))
            seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        replies = [
            NodeReply(p, u.update, u.examples, u.deployed_flops_ratio)
            for p, u in zip(partitions, updates, strict=True)
        ]
        aggregate_round(
            self.step, replies, server_round, weight_bound(self.cfg), self.regularizer_weight
        )
        return BareRound(partitions, updates, seconds, time.perf_counter() - start)

    def train(self, rounds: int, log: Callable[[int, BareRound], None] | None = None) -> Params:
        """Rounds ``1..rounds``; ``log`` sees each finished round."""
        for server_round in range(1, rounds + 1):
            result = self.round(server_round)
            if log is not None:
                log(server_round, result)
        return {n: p.clone() for n, p in self.params.items()}
