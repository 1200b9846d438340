"""Meta-learning math: two-stage ``Adapt``, meta-gradients (loop and vmapped), local updates."""

from gating.meta.adapt import (
    STEP,
    Batch,
    MetaConfig,
    Params,
    accuracy,
    adapt,
    deployed_stats,
    forward,
    network_params,
    query_forward,
    query_metrics,
    stages,
    support_statistics,
    task_loss,
    with_step_sizes,
)
from gating.meta.local import LocalStep, fedavg_update, perfedavg_update
from gating.meta.meta_gradient import MetaStep, meta_gradients, meta_gradients_batched
from gating.meta.nearest_centroid import nearest_centroid_accuracy

__all__ = [
    "STEP",
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
    "network_params",
    "perfedavg_update",
    "query_forward",
    "query_metrics",
    "stages",
    "support_statistics",
    "task_loss",
    "with_step_sizes",
]
