"""Fast adaptation at a new node, and what the server makes of many such nodes.

A target node runs one ``Adapt`` from the meta-initialization on its fixed support episode and
reports on its query episode; :func:`summarize` turns the reports of every target node into the
run's figures (mean and 95% interval over tasks, one task per node).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from omegaconf import DictConfig
from torch import Tensor

from gating.data import NodeTask
from gating.federated.protocol import REPORT_RANGES, range_problem
from gating.federated.settings import model_spec, resolve_device
from gating.federated.target import adapt_target_node
from gating.meta import nearest_centroid_accuracy, query_metrics
from gating.model import dense_macs
from gating.model.conditionality import input_dependent_share, node_dependent_share
from gating.stats import mean_ci95

#: The evaluation metrics a target node reports (all floats but ``layer-active`` and
#: ``open-frequency``, lists: per gate, and per gated channel; the latter empty when dense).
NODE_METRICS = (
    "accuracy",
    "accuracy-transductive",
    "accuracy-before",
    "loss",
    "flops-ratio",
    "macs",
    "dense-macs",
    "layer-active",
    "open-frequency",
    "nearest-centroid-accuracy",
)


def evaluate_node(
    cfg: DictConfig,
    task: NodeTask,
    params: Mapping[str, Tensor],
    server_round: int,
    reg_weight: float,
) -> dict[str, Any]:
    """One ``Adapt`` on the node's support episode; metrics on its query episode."""
    device = resolve_device(cfg.device)
    node = adapt_target_node(cfg, task, params, server_round, reg_weight, device)
    model, spec, support, query = node.model, node.spec, node.support, node.query
    before = query_metrics(model, node.initial, support, query, node.meta_cfg)
    after = query_metrics(model, node.adapted, support, query, node.meta_cfg, node.stats)
    # MACs relative to the configured network: a narrowed one (fedmeta_narrow) pays less
    dense = float(dense_macs(model_spec(cfg, task, narrow=False)))
    macs = after.get("macs", float(dense_macs(spec)))
    return {
        "accuracy": after["accuracy"],
        "accuracy-transductive": after["accuracy_transductive"],
        "accuracy-before": before["accuracy"],
        "loss": after["loss"],
        "flops-ratio": macs / dense,
        "macs": macs,
        "dense-macs": dense,
        "layer-active": [float(r) for r in after["layer_active"]],
        "open-frequency": [float(f) for f in after.get("open_frequency", [])],
        "nearest-centroid-accuracy": nearest_centroid_accuracy(
            support.x, support.y, query.x, query.y
        ),
    }


def report_problem(report: Mapping[str, Any], layers: int, channels: int) -> str | None:
    """Why a target node's report cannot be counted, or None when it is plausible: ``layers``
    gates and ``channels`` gated channels in all (0 for a dense model)."""
    if problem := range_problem(report, REPORT_RANGES):
        return problem
    active = report.get("layer-active")
    if not isinstance(active, list | tuple) or len(active) != layers:
        return f"layer-active must list {layers} ratios, got {active!r}"
    if not all(isinstance(v, int | float) and 0.0 <= v <= 1.0 for v in active):
        return f"layer-active ratios must lie in [0, 1], got {list(active)}"
    frequency = report.get("open-frequency")
    if not isinstance(frequency, list | tuple) or len(frequency) != channels:
        return f"open-frequency must list {channels} frequencies, got {len(frequency or [])}"
    if not all(isinstance(v, int | float) and 0.0 <= v <= 1.0 for v in frequency):
        return "open-frequency values must lie in [0, 1]"
    return None


def summarize(reports: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """The run's figures from the reports of target nodes (partition id -> report)."""
    if not reports:
        raise ValueError("no target node reported")
    ordered = [reports[p] for p in sorted(reports)]

    def mean(key: str) -> float:
        return float(np.mean([float(r[key]) for r in ordered]))

    accuracy, ci95 = mean_ci95([float(r["accuracy"]) for r in ordered])
    return {
        "accuracy": accuracy,
        "accuracy_ci95": ci95,
        "accuracy_transductive": mean("accuracy-transductive"),
        "accuracy_before": mean("accuracy-before"),
        "flops_ratio": mean("flops-ratio"),
        "macs": mean("macs"),
        "dense_macs": float(ordered[0]["dense-macs"]),
        "nearest_centroid_accuracy": mean("nearest-centroid-accuracy"),
        "target_tasks": len(ordered),
        "layer_active": [float(v) for v in np.mean([list(r["layer-active"]) for r in ordered], 0)],
        **conditionality([list(r["open-frequency"]) for r in ordered]),
        "task_accuracy": {str(p): float(reports[p]["accuracy"]) for p in sorted(reports)},
    }


def conditionality(frequencies: list[list[float]]) -> dict[str, float]:
    """The two conditionality figures over the target nodes' open frequencies (see
    ``gating.model.conditionality``); none for a dense model, which has no gates."""
    if not frequencies or not frequencies[0]:
        return {}
    return {
        "input_dependent_share": input_dependent_share(frequencies),
        "node_dependent_share": node_dependent_share(frequencies),
    }


def scalar_figures(summary: Mapping[str, Any]) -> dict[str, float]:
    """The per-round scalars of a summary (for history.json): lists and per-task maps left out."""
    return {
        k: float(v)
        for k, v in summary.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and not np.isnan(v)
    }
