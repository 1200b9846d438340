"""The Flower ClientApp: a node answers who it is, meta-trains, or adapts and reports.

Thin by design: the math is in ``client.meta`` and knows nothing of Flower.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.local import fedavg_update, perfedavg_update
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
    """This node's update direction for the round: meta-gradients (metagater, fedmeta) or the
    local-training pseudo-gradient of the dense baselines (fedavg, perfedavg)."""
    cfg, per_round = decode_config(msg.content[CONFIG])
    server_round = int(per_round[ROUND_KEY])
    task = node_task(cfg, dict(context.node_config))
    if task.role != "train":
        raise RuntimeError(f"partition {task.partition_id} is a {task.role} node, not for training")
    model = model_for(model_spec(cfg, task))
    meta_cfg = meta_config(cfg, float(per_round[REG_WEIGHT_KEY]))
    params = msg.content[ARRAYS].to_torch_state_dict()
    seed_torch(cfg.seed, task.partition_id, server_round)
    rng = np.random.default_rng([cfg.seed, task.partition_id, server_round])

    def episode() -> tuple[Batch, Batch]:
        drawn = task.episode(rng)
        return Batch(drawn.support_x, drawn.support_y), Batch(drawn.query_x, drawn.query_y)

    name = cfg.strategy.name
    if name == "fedavg":
        step = fedavg_update(
            model, params, lambda: merge(*episode()), meta_cfg, cfg.local.lr, cfg.local.steps
        )
        update, examples, flops = step.update, cfg.local.steps * task.spec.ways, 1.0
        loss, accuracy = step.loss, step.accuracy
    elif name == "perfedavg":
        step = perfedavg_update(
            model,
            params,
            lambda: (*episode(), episode()[0]),
            meta_cfg,
            alpha=cfg.adapt.backbone_lr,
            beta=cfg.local.lr,
            steps=cfg.local.steps,
            hessian_free=not cfg.meta.first_order,
            delta=cfg.local.hessian_delta,
        )
        update, examples, flops = step.update, cfg.local.steps * task.spec.ways, 1.0
        loss, accuracy = step.loss, step.accuracy
    else:
        steps = [
            meta_gradients(model, params, *episode(), meta_cfg)
            for _ in range(cfg.task.tasks_per_client)
        ]
        update = {n: torch.stack([s.grads[n] for s in steps]).mean(0) for n in steps[0].grads}
        examples = len(steps) * task.spec.ways * task.spec.queries
        loss = float(np.mean([s.query_loss for s in steps]))
        accuracy = float(np.mean([s.query_accuracy for s in steps]))
        flops = float(np.mean([s.flops_ratio for s in steps]))
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: examples,
            "query-loss": loss,
            "query-accuracy": accuracy,
            "flops-ratio": flops,
            "partition-id": task.partition_id,
        }
    )
    return Message(
        RecordDict({UPDATE: ArrayRecord.from_torch_state_dict(update), METRICS: metrics}),
        reply_to=msg,
    )


def merge(support: Batch, query: Batch) -> Batch:
    return Batch(torch.cat([support.x, query.x]), torch.cat([support.y, query.y]))


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
