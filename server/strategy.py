"""Strategies: average the clients' update directions, step separate server optimizers.

Every strategy here is a real Flower ``Strategy``. They share one mechanism (sample training
nodes, validate and average replies weighted by examples, one server optimizer per parameter
group, evaluate fast adaptation at target nodes) and differ in what the clients send, which the
clients read from the run configuration, and in which groups are learned. The round loop in
``server.federation`` drives them (it adds discovery, checkpoints and results, which
``Strategy.start`` has no place for).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from client.protocol import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, UPDATE
from gating import BACKBONE, GATE
from server.validation import RoundFailed, update_problem

GROUPS = (BACKBONE, GATE)


def make_optimizer(kind: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"unknown server optimizer {kind!r} (adam or sgd)")


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% confidence interval."""
    array = np.asarray(values, dtype=float)
    if len(array) < 2:
        return float(array.mean()), float("nan")
    return float(array.mean()), float(1.96 * array.std(ddof=1) / math.sqrt(len(array)))


class ServerOptimizerStrategy(Strategy):
    """Separate server optimizers for backbone and gate, state kept across rounds.

    ``train_nodes``/``target_nodes`` map partition ids to node ids; sampling is over sorted
    partition ids with the strategy's own seeded ``random.Random``, so a resumed run (new node
    ids) samples the same nodes as an uninterrupted one.
    """

    learns_gates = True

    def __init__(
        self,
        params: Mapping[str, torch.Tensor],
        train_nodes: Mapping[int, int],
        target_nodes: Mapping[int, int],
        *,
        clients_per_round: int,
        min_train_replies: int,
        optimizer: str = "adam",
        backbone_lr: float = 1e-3,
        gate_lr: float = 1e-3,
        eval_nodes: int = 0,
        seed: int = 0,
    ) -> None:
        self.params = {name: torch.nn.Parameter(t.detach().clone()) for name, t in params.items()}
        self.train_nodes = dict(train_nodes)
        self.target_nodes = dict(target_nodes)
        self.clients_per_round = clients_per_round
        self.min_train_replies = min_train_replies
        self.eval_nodes = eval_nodes
        self.learned = [n for n in self.params if self.learns_gates or n.startswith(f"{BACKBONE}.")]
        lrs = {BACKBONE: backbone_lr, GATE: gate_lr}
        self.optimizers = {
            group: make_optimizer(optimizer, members, lrs[group])
            for group in GROUPS
            if (members := [self.params[n] for n in self.learned if n.startswith(f"{group}.")])
        }
        self.rng = random.Random(seed)
        self.last_evaluation: dict[str, Any] = {}

    # ------------------------------------------------------------------ state
    def arrays(self) -> ArrayRecord:
        return ArrayRecord.from_torch_state_dict({n: p.detach() for n, p in self.params.items()})

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": {n: p.detach().clone() for n, p in self.params.items()},
            "optimizers": {g: opt.state_dict() for g, opt in self.optimizers.items()},
            "rng": self.rng.getstate(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            for name, value in state["params"].items():
                self.params[name].copy_(value)
        for group, opt_state in state["optimizers"].items():
            self.optimizers[group].load_state_dict(opt_state)
        self.rng.setstate(state["rng"])

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> %s: %d training nodes, %d target nodes, %d clients per round",
            type(self).__name__,
            len(self.train_nodes),
            len(self.target_nodes),
            self.clients_per_round,
        )
        log(
            INFO,
            "\t└──> server optimizers: %s",
            {g: type(o).__name__ for g, o in self.optimizers.items()},
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
        partitions = self.rng.sample(candidates, min(self.clients_per_round, len(candidates)))
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
        expected = {n: tuple(self.params[n].shape) for n in self.learned}
        valid: list[Message] = []
        for msg in replies:
            problem = update_problem(msg, expected)
            if problem is None:
                valid.append(msg)
            else:
                log(
                    WARNING,
                    "round %d: reply from node %d left out: %s",
                    server_round,
                    msg.metadata.src_node_id,
                    problem,
                )
        if len(valid) < self.min_train_replies:
            raise RoundFailed(
                f"round {server_round}: {len(valid)} usable replies, at least "
                f"{self.min_train_replies} needed (federation.min_train_replies)"
            )
        # A fixed order makes the floating-point sum, and so a resumed run, reproducible.
        valid.sort(
            key=lambda m: int(m.content[METRICS].get("partition-id", m.metadata.src_node_id))
        )
        weights = torch.tensor([float(m.content[METRICS][NUM_EXAMPLES]) for m in valid])
        weights = weights / weights.sum()

        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        for name in self.learned:
            stacked = torch.stack(
                [
                    torch.from_numpy(m.content[UPDATE][name].numpy()).to(self.params[name].dtype)
                    for m in valid
                ]
            )
            self.params[name].grad = torch.tensordot(weights.to(stacked.dtype), stacked, dims=1)
        for optimizer in self.optimizers.values():
            optimizer.step()

        metrics = MetricRecord(
            {
                "replies": len(valid),
                "sampled": self.clients_per_round,
                # Payload per client and round: the parameters down, the update back up.
                "bytes-down": self.arrays().count_bytes(),
                "bytes-up": float(np.mean([m.content[UPDATE].count_bytes() for m in valid])),
            }
        )
        for key in ("query-loss", "query-accuracy", "flops-ratio"):
            values = [float(m.content[METRICS][key]) for m in valid if key in m.content[METRICS]]
            if len(values) == len(valid):
                metrics[key] = float(np.dot(weights.numpy(), values))
        return self.arrays(), metrics

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
        if not everyone and 0 < self.eval_nodes < len(partitions):
            partitions = sorted(self.rng.sample(partitions, self.eval_nodes))
        record = RecordDict({ARRAYS: arrays, CONFIG: config})
        return [
            Message(record, dst_node_id=self.target_nodes[p], message_type=MessageType.EVALUATE)
            for p in partitions
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        partition_of = {node: p for p, node in self.target_nodes.items()}
        results, task_accuracy = [], {}
        for msg in replies:
            if msg.has_error():
                log(
                    WARNING,
                    "round %d: evaluation on node %d failed: %s",
                    server_round,
                    msg.metadata.src_node_id,
                    msg.error.reason,
                )
            elif METRICS in msg.content.metric_records:
                results.append(msg.content[METRICS])
                partition = partition_of[msg.metadata.src_node_id]
                task_accuracy[str(partition)] = float(results[-1]["accuracy"])
        if not results:
            log(WARNING, "round %d: no target node reported", server_round)
            return None
        accuracy, ci95 = mean_ci95([float(r["accuracy"]) for r in results])
        layer_active = np.mean([list(r["layer-active"]) for r in results], axis=0)
        aggregated = {
            "accuracy": accuracy,
            "accuracy_ci95": ci95,
            "accuracy_before": float(np.mean([r["accuracy-before"] for r in results])),
            "flops_ratio": float(np.mean([r["flops-ratio"] for r in results])),
            "macs": float(np.mean([r["macs"] for r in results])),
            "dense_macs": float(results[0]["dense-macs"]),
            "nearest_centroid_accuracy": float(
                np.mean([r["nearest-centroid-accuracy"] for r in results])
            ),
            "target_tasks": len(results),
        }
        self.last_evaluation = {
            **aggregated,
            "layer_active": [float(v) for v in layer_active],
            "task_accuracy": dict(sorted(task_accuracy.items(), key=lambda kv: int(kv[0]))),
        }
        return MetricRecord({k: v for k, v in aggregated.items() if not math.isnan(v)})


class MetaGater(ServerOptimizerStrategy):
    """Clients send meta-gradients of backbone and gates through the two-stage adaptation
    (second order, or first order for ``metagater_fo``)."""


class FedMeta(ServerOptimizerStrategy):
    """Federated MAML of the dense backbone: MetaGater with gating off."""

    learns_gates = False


class FedAvg(ServerOptimizerStrategy):
    """FedAvg of the dense backbone: clients send ``theta - theta_local`` after local SGD; server
    SGD with learning rate 1 on its weighted average is exactly the weighted model average."""

    learns_gates = False


class PerFedAvg(ServerOptimizerStrategy):
    """Per-FedAvg (first-order or Hessian-free): clients send ``theta - theta_local`` after local
    Per-FedAvg steps; the server averages as FedAvg does."""

    learns_gates = False


STRATEGY_CLASSES: dict[str, type[ServerOptimizerStrategy]] = {
    "metagater": MetaGater,
    "metagater_fo": MetaGater,
    "fedmeta": FedMeta,
    "fedavg": FedAvg,
    "perfedavg": PerFedAvg,
}
