"""The strategy: one Flower ``Strategy`` for every federated algorithm of the project.

What differs between MetaGater, FedMeta, FedAvg and Per-FedAvg is what their clients compute
(``gating.federated.updates``) and which parameter groups the server learns; the server's half
of a round is the same (``gating.federated.server_step``). This class only turns that into
messages: it samples nodes, checks replies (``server.validation``), and evaluates fast
adaptation at target nodes. The round loop in ``server.federation`` drives it (it adds
discovery, checkpoints and results, which ``Strategy.start`` has no place for).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from logging import DEBUG, INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from gating.federated.aggregation import weighted_mean
from gating.federated.budget import RegularizerWeight
from gating.federated.evaluation import report_problem, scalar_figures, summarize
from gating.federated.protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    RAY_NODE,
    RUNTIME,
    TRAIN_METRICS,
    UNRELEASED_UNDER_DP,
    UPDATE,
)
from gating.federated.round import NodeReply, NodeSampler, aggregate_round
from gating.federated.server_step import ServerStep
from server.validation import RoundFailed, read_update, train_metrics_problem


class MetaLearningStrategy(Strategy):
    """Sample training nodes, average their checked updates into a :class:`ServerStep`, and
    evaluate one ``Adapt`` at target nodes.

    Parameters
    ----------
    server_step : ServerStep
        The parameters, which of them are learned, and the server optimizers.
    train_nodes, target_nodes : mapping of int to int
        Partition id -> Flower node id, per role.
    clients_per_round : int
        Training nodes sampled per round.
    min_train_replies : int
        Usable replies a round needs; fewer fail it with :class:`RoundFailed`.
    eval_nodes : int
        Target nodes per intermediate evaluation; 0 for all (the final one asks all).
    seed : int
        Seeds the :class:`NodeSampler`.
    expected_examples : float or None
        What an honest reply's ``num-examples`` is: larger claims count as this. None trusts
        every claim.
    gated_layers, gated_channels : int
        How many per-gate ratios a target node's ``layer-active`` lists, and how many per-channel
        frequencies its ``open-frequency`` lists (0 for a dense model).
    regularizer_weight : RegularizerWeight or None
        λ round by round, which every aggregated round moves by dual ascent (None: no λ).
    """

    def __init__(
        self,
        server_step: ServerStep,
        train_nodes: Mapping[int, int],
        target_nodes: Mapping[int, int],
        *,
        clients_per_round: int,
        min_train_replies: int,
        eval_nodes: int = 0,
        seed: int = 0,
        expected_examples: float | None = None,
        gated_layers: int = 0,
        gated_channels: int = 0,
        regularizer_weight: RegularizerWeight | None = None,
    ) -> None:
        self.server_step = server_step
        self.regularizer_weight = regularizer_weight
        self.expected_examples = expected_examples
        self.layers = gated_layers
        self.channels = gated_channels
        self.train_nodes = dict(train_nodes)
        self.target_nodes = dict(target_nodes)
        self.clients_per_round = clients_per_round
        self.min_train_replies = min_train_replies
        self.eval_nodes = eval_nodes
        self.sampler = NodeSampler(seed)
        # replies per Ray node that ran their ClientApp (train and evaluate), over the run
        self.served: Counter[str] = Counter()

    # ------------------------------------------------------------------ state
    def arrays(self) -> ArrayRecord:
        return ArrayRecord.from_torch_state_dict(self.server_step.params)

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.server_step.state_dict(),
            "rng": self.sampler.getstate(),
            "served": dict(self.served),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.server_step.load_state_dict(state)
        self.sampler.setstate(state["rng"])
        self.served = Counter(state.get("served", {}))  # checkpoints before the count: none

    def count_runtime(self, replies: Iterable[Message]) -> None:
        """Count the replies each Ray node's ClientApps answered (simulations on Ray only)."""
        for msg in replies:
            runtime = msg.content.config_records.get(RUNTIME)
            node = None if runtime is None else runtime.get(RAY_NODE)
            if isinstance(node, str):
                self.served[node[:64]] += 1

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> %s: %d training nodes, %d target nodes, %d clients per round",
            type(self).__name__,
            len(self.train_nodes),
            len(self.target_nodes),
            self.clients_per_round,
        )
        optimizers = self.server_step.optimizers
        log(
            INFO,
            "\t└──> server optimizers: %s",
            {g: type(o).__name__ for g, o in optimizers.items()},
        )

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        candidates = self._online(self.train_nodes, grid)
        if len(candidates) < self.clients_per_round:
            log(
                WARNING,
                "round %d: only %d training nodes online, %d wanted",
                server_round,
                len(candidates),
                self.clients_per_round,
            )
        partitions = self.sampler.train(candidates, self.clients_per_round)
        record = RecordDict({ARRAYS: arrays, CONFIG: config})
        return [
            Message(record, dst_node_id=self.train_nodes[p], message_type=MessageType.TRAIN)
            for p in partitions
        ]

    @staticmethod
    def _online(members: Mapping[int, int], grid: Grid | None) -> list[int]:
        """Sorted partitions whose node the grid still lists: a node Flower has marked offline
        is not sampled again, so a dead node does not cost every later round a timeout."""
        connected = None if grid is None else set(grid.get_node_ids())
        return sorted(p for p, node in members.items() if connected is None or node in connected)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        expected = self.server_step.expected_shapes()
        partition_of = {node: p for p, node in self.train_nodes.items()}
        valid: list[Message] = []
        decoded: dict[int, dict[str, np.ndarray]] = {}  # by id(message): decoded once
        rejected: list[str] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            update = read_update(msg, expected)
            problem = update if isinstance(update, str) else train_metrics_problem(msg)
            if problem is None and node not in partition_of:
                problem = "it is not a training node of this run"
            if problem is None:
                valid.append(msg)
                decoded[id(msg)] = update
            else:
                rejected.append(f"node {node}: {problem}")
                log(
                    WARNING,
                    "round %d: reply from node %d left out: %s",
                    server_round,
                    node,
                    problem,
                )
        if len(valid) < self.min_train_replies:
            raise RoundFailed(
                f"round {server_round}: {len(valid)} usable replies, at least "
                f"{self.min_train_replies} needed (federation.min_train_replies); left out: "
                + ("; ".join(rejected) or "none (too few nodes answered)")
            )
        node_replies = [
            NodeReply(
                partition=partition_of[m.metadata.src_node_id],
                update={n: torch.from_numpy(a) for n, a in decoded[id(m)].items()},
                examples=float(m.content[METRICS][NUM_EXAMPLES]),
                deployed_flops_ratio=float(m.content[METRICS]["deployed-flops-ratio"]),
            )
            for m in valid
        ]
        try:
            result = aggregate_round(
                self.server_step,
                node_replies,
                server_round,
                self.expected_examples,
                self.regularizer_weight,
            )
        except RoundFailed as error:
            raise RoundFailed(f"{error}; left out before it: {rejected or 'none'}") from error
        self.count_runtime(valid)
        message_of = {partition_of[m.metadata.src_node_id]: m for m in valid}
        valid = [message_of[reply.partition] for reply in result.replies]  # summation order
        weights, report = result.weights, result.report
        for reply, weight in zip(result.replies, weights, strict=True):
            if weight != reply.examples:
                log(
                    WARNING,
                    "round %d: node %d claims %g examples, its task holds %g: counted as %g",
                    server_round,
                    message_of[reply.partition].metadata.src_node_id,
                    reply.examples,
                    self.expected_examples,
                    weight,
                )
        if report.clipped:  # counted in the history; the details only in a debug log
            nodes = [valid[i].metadata.src_node_id for i in report.clipped]
            log(
                DEBUG,
                "round %d: updates of nodes %s clipped to norm %.3g (norms %s)",
                server_round,
                nodes,
                report.bound,
                [f"{report.norms[i]:.3g}" for i in report.clipped],
            )
        arrays = self.arrays()
        metrics = MetricRecord(
            {
                "replies": len(valid),
                "sampled": self.clients_per_round,
                "clipped": len(report.clipped),
                "update-norm": float(np.median(report.norms)),
                # Payload per client and round: the parameters down, the update back up.
                "bytes-down": arrays.count_bytes(),
                "bytes-up": float(np.mean([m.content[UPDATE].count_bytes() for m in valid])),
            }
        )
        for key in TRAIN_METRICS:  # every usable reply has them (train_metrics_problem)
            metrics[key] = weighted_mean(weights, [float(m.content[METRICS][key]) for m in valid])
        metrics["deployed-flops-ratio"] = float(report.ratio)
        if self.server_step.rule.private:  # released only through the mechanism: see privacy.py
            for key in (*UNRELEASED_UNDER_DP, "clipped", "update-norm"):
                metrics[key] = math.nan
        return arrays, metrics

    # --------------------------------------------------------------- evaluate
    def configure_evaluate(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        everyone: bool = True,
    ) -> Iterable[Message]:
        partitions = self._online(self.target_nodes, grid)
        if not everyone:
            partitions = self.sampler.evaluate(partitions, self.eval_nodes, server_round)
        record = RecordDict({ARRAYS: arrays, CONFIG: config})
        return [
            Message(record, dst_node_id=self.target_nodes[p], message_type=MessageType.EVALUATE)
            for p in partitions
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Flower's form of :meth:`summarize_evaluation`: its scalars."""
        summary = self.summarize_evaluation(server_round, replies)
        return None if summary is None else MetricRecord(scalar_figures(summary))

    def summarize_evaluation(
        self, server_round: int, replies: Iterable[Message]
    ) -> dict[str, Any] | None:
        """The run's figures from the target nodes' plausible reports
        (:func:`gating.federated.evaluation.summarize`: per-task accuracies and per-layer lists
        included), or None when none reported."""
        partition_of = {node: p for p, node in self.target_nodes.items()}
        reports: dict[int, dict[str, Any]] = {}
        for msg in replies:
            if msg.has_error():
                log(
                    WARNING,
                    "round %d: evaluation on node %d failed: %s",
                    server_round,
                    msg.metadata.src_node_id,
                    msg.error.reason,
                )
            elif msg.metadata.src_node_id not in partition_of:
                log(
                    WARNING,
                    "round %d: evaluation from unknown node %d left out",
                    server_round,
                    msg.metadata.src_node_id,
                )
            elif METRICS not in msg.content.metric_records:
                log(
                    WARNING,
                    "round %d: evaluation from node %d has no metrics",
                    server_round,
                    msg.metadata.src_node_id,
                )
            elif problem := report_problem(msg.content[METRICS], self.layers, self.channels):
                log(
                    WARNING,
                    "round %d: evaluation from node %d left out: %s",
                    server_round,
                    msg.metadata.src_node_id,
                    problem,
                )
            else:
                reports[partition_of[msg.metadata.src_node_id]] = dict(msg.content[METRICS])
                self.count_runtime([msg])
        if not reports:
            log(WARNING, "round %d: no target node reported", server_round)
            return None
        return summarize(reports)
