"""The Flower ClientApp: a node answers who it is, meta-trains, or adapts and reports.

Thin by design: the math is in ``client.meta`` and knows nothing of Flower.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.meta import Batch, evaluate_adaptation, meta_gradients
from client.nearest_centroid import nearest_centroid_accuracy
from client.node import meta_config, model_for, model_spec, node_task, seed_torch
from client.protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    NODE,
    NUM_EXAMPLES,
    REG_WEIGHT_KEY,
    ROUND_KEY,
    UPDATE,
    decode_config,
)
from gating import dense_macs

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's role and data shape (it builds the model from them)."""
    cfg, _ = decode_config(msg.content[CONFIG])
    task = node_task(cfg, dict(context.node_config))
    channels, size, _ = task.images.shape[1:]
    node = ConfigRecord({"role": task.role, "partition-id": task.partition_id})
    metrics = MetricRecord(
        {NUM_EXAMPLES: len(task.labels), "channels": int(channels), "image-size": int(size)}
    )
    return Message(RecordDict({NODE: node, METRICS: metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Meta-gradients of the query loss through Adapt, averaged over this round's episodes."""
    cfg, per_round = decode_config(msg.content[CONFIG])
    server_round = int(per_round[ROUND_KEY])
    task = node_task(cfg, dict(context.node_config))
    if task.role != "train":
        raise RuntimeError(
            f"partition {task.partition_id} is a {task.role} node, not a training node"
        )
    model = model_for(model_spec(cfg, task))
    meta_cfg = meta_config(cfg, float(per_round[REG_WEIGHT_KEY]))
    params = msg.content[ARRAYS].to_torch_state_dict()

    seed_torch(cfg.seed, task.partition_id, server_round)
    rng = np.random.default_rng([cfg.seed, task.partition_id, server_round])
    steps = []
    for _ in range(cfg.task.tasks_per_client):
        episode = task.episode(rng)
        support = Batch(episode.support_x, episode.support_y)
        query_batch = Batch(episode.query_x, episode.query_y)
        steps.append(meta_gradients(model, params, support, query_batch, meta_cfg))
    grads = {name: torch.stack([s.grads[name] for s in steps]).mean(0) for name in steps[0].grads}
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: len(episode.query_y) * len(steps),
            "query-loss": float(np.mean([s.query_loss for s in steps])),
            "query-accuracy": float(np.mean([s.query_accuracy for s in steps])),
            "flops-ratio": float(np.mean([s.flops_ratio for s in steps])),
            "partition-id": task.partition_id,
        }
    )
    update = ArrayRecord.from_torch_state_dict(grads)
    return Message(RecordDict({UPDATE: update, METRICS: metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """A new (target) node: one Adapt from the meta-initialization on its support set."""
    cfg, per_round = decode_config(msg.content[CONFIG])
    task = node_task(cfg, dict(context.node_config))
    if task.role != "target":
        raise RuntimeError(
            f"partition {task.partition_id} is a {task.role} node, not a target node"
        )
    spec = model_spec(cfg, task)
    model = model_for(spec)
    params = msg.content[ARRAYS].to_torch_state_dict()
    episode = task.fixed_episode()
    support = Batch(episode.support_x, episode.support_y)
    query_batch = Batch(episode.query_x, episode.query_y)
    seed_torch(cfg.seed, task.partition_id, int(per_round[ROUND_KEY]), 1)
    meta_cfg = meta_config(cfg, float(per_round[REG_WEIGHT_KEY]))
    result = evaluate_adaptation(model, params, support, query_batch, meta_cfg)
    after, before = result["after"], result["before"]
    dense = dense_macs(spec)
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: len(query_batch.y),
            "accuracy": after["accuracy"],
            "accuracy-before": before["accuracy"],
            "loss": after["loss"],
            "flops-ratio": after["flops_ratio"],
            "macs": after.get("macs", float(dense)),
            "dense-macs": float(dense),
            "layer-active": [float(r) for r in after["layer_active"]],
            "nearest-centroid-accuracy": nearest_centroid_accuracy(
                support.x, support.y, query_batch.x, query_batch.y
            ),
            "partition-id": task.partition_id,
        }
    )
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)
