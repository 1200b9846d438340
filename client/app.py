"""The Flower ClientApp: a node answers who it is, computes its round's update, or adapts and
reports. Only translation between messages and ``gating.federated``, where the math lives."""

from __future__ import annotations

import os
import sys

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import update_console_handler

from gating.federated.evaluation import evaluate_node
from gating.federated.nodes import node_task
from gating.federated.protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    NODE,
    NUM_EXAMPLES,
    PARTITION_KEY,
    RAY_NODE,
    REG_WEIGHT_KEY,
    ROUND_KEY,
    RUNTIME,
    UPDATE,
    decode_config,
)
from gating.federated.updates import ClientRound, client_update

app = ClientApp()

# Flower colours its console lines; escape codes belong on a terminal, not in pipes and log files.
update_console_handler(colored=sys.stderr.isatty() and "NO_COLOR" not in os.environ)


def runtime() -> dict[str, ConfigRecord]:
    """Where this ClientApp runs, for the server's count of clients per Ray node: the Ray node
    of the actor it runs in under a simulation, nothing elsewhere (a SuperNode has no Ray)."""
    ray = sys.modules.get("ray")  # imported by Flower's Ray backend, never by this module
    if ray is None or not ray.is_initialized():
        return {}
    return {RUNTIME: ConfigRecord({RAY_NODE: ray.get_runtime_context().get_node_id()})}


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's role and data shape (it builds the model from them)."""
    cfg, _ = decode_config(msg.content[CONFIG])
    task = node_task(cfg, dict(context.node_config))
    channels, size, _ = task.images.shape[1:]
    node = ConfigRecord({"role": task.role, PARTITION_KEY: task.partition_id})
    metrics = MetricRecord(
        {NUM_EXAMPLES: len(task.labels), "channels": int(channels), "image-size": int(size)}
    )
    return Message(RecordDict({NODE: node, METRICS: metrics}), reply_to=msg)


def round_job(msg: Message, context: Context) -> ClientRound:
    """What a training message asks of this node."""
    cfg, per_round = decode_config(msg.content[CONFIG])
    task = node_task(cfg, dict(context.node_config))
    if task.role != "train":
        raise RuntimeError(f"partition {task.partition_id} is a {task.role} node, not for training")
    return ClientRound(
        cfg,
        task,
        msg.content[ARRAYS].to_torch_state_dict(),
        int(per_round[ROUND_KEY]),
        float(per_round[REG_WEIGHT_KEY]),
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """This node's update direction for the round (see ``gating.federated.updates``)."""
    job = round_job(msg, context)
    task = job.task
    result = client_update(job)
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: result.examples,
            "query-loss": result.loss,
            "query-accuracy": result.accuracy,
            "flops-ratio": result.flops_ratio,
            "deployed-flops-ratio": result.deployed_flops_ratio,
            PARTITION_KEY: task.partition_id,
        }
    )
    update = ArrayRecord.from_torch_state_dict(result.update)
    return Message(RecordDict({UPDATE: update, METRICS: metrics, **runtime()}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """A new (target) node: one Adapt from the meta-initialization on its support set."""
    cfg, per_round = decode_config(msg.content[CONFIG])
    task = node_task(cfg, dict(context.node_config))
    if task.role != "target":
        raise RuntimeError(
            f"partition {task.partition_id} is a {task.role} node, not a target node"
        )
    report = evaluate_node(
        cfg,
        task,
        msg.content[ARRAYS].to_torch_state_dict(),
        int(per_round[ROUND_KEY]),
        float(per_round[REG_WEIGHT_KEY]),
    )
    metrics = MetricRecord(
        {
            **report,
            NUM_EXAMPLES: task.spec.ways * task.spec.queries,
            PARTITION_KEY: task.partition_id,
        }
    )
    return Message(RecordDict({METRICS: metrics, **runtime()}), reply_to=msg)
