"""Meta-learning math: two-stage ``Adapt``, meta-gradients (loop and vmapped), local updates."""

from gating.meta.adapt import (
    Batch,
    MetaConfig,
    MetaStep,
    Params,
    accuracy,
    adapt,
    deployed_stats,
    forward,
    meta_gradients,
    query_forward,
    query_metrics,
    stages,
    support_statistics,
    task_loss,
)
from gating.meta.batched import meta_gradients_batched
from gating.meta.local import LocalStep, fedavg_update, perfedavg_update
from gating.meta.nearest_centroid import nearest_centroid_accuracy

__all__ = [
    "Batch",
    "LocalStep",
    "MetaConfig",
    "MetaStep",
    "Params",
    "accuracy",
    "adapt",
    "deployed_stats",
    "fedavg_update",
    "forward",
    "meta_gradients",
    "meta_gradients_batched",
    "nearest_centroid_accuracy",
    "perfedavg_update",
    "query_forward",
    "query_metrics",
    "stages",
    "support_statistics",
    "task_loss",
]
