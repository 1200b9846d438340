"""What a run leaves in its folder: history.json, summary.json and PNG plots."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# Accuracy after adaptation per target task (partition id -> accuracy) at the final evaluation:
# runs on the same protocol and seed share their target tasks, so the report can pair them.
TASK_ACCURACY_FILE = "task_accuracy.json"
SUMMARY_KEYS = (
    "strategy",
    "dataset",
    "rounds",
    "accuracy",
    "accuracy_ci95",
    "accuracy_transductive",
    "accuracy_before",
    "flops_ratio",
    "macs",
    "dense_macs",
    "nearest_centroid_accuracy",
    "target_tasks",
    "wall_seconds",
)


def write_json(path: Path, payload: Any) -> None:
    """Atomic write; NaN becomes null so the file is valid JSON for any reader."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(json_safe(payload), indent=2) + "\n")
    os.replace(tmp, path)


def json_safe(value: Any) -> Any:
    """NaN and infinities become null: valid JSON for every reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def plot_history(history: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Target accuracy (before/after adaptation) and flops_ratio per round."""
    evaluated = [h for h in history if "accuracy" in h]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    if evaluated:
        rounds = [h["round"] for h in evaluated]
        ax.plot(rounds, [h["accuracy"] for h in evaluated], "o-", label="after adaptation")
        ax.plot(rounds, [h["accuracy_before"] for h in evaluated], "s--", label="before adaptation")
        ax.plot(
            rounds,
            [h["nearest_centroid_accuracy"] for h in evaluated],
            ":",
            label="nearest centroid",
        )
    train = [h for h in history if "train_accuracy" in h]
    ax.plot(
        [h["round"] for h in train],
        [h["train_accuracy"] for h in train],
        alpha=0.4,
        label="training nodes (query, after adaptation)",
    )
    ax.set(xlabel="round", ylabel="accuracy", title="Target-node accuracy", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "accuracy.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    if evaluated:
        ax.plot(
            [h["round"] for h in evaluated],
            [h["flops_ratio"] for h in evaluated],
            "o-",
            label="target nodes (deterministic gates)",
        )
    ax.plot(
        [h["round"] for h in train],
        [h.get("train_flops_ratio", math.nan) for h in train],
        alpha=0.4,
        label="training nodes (sampled gates)",
    )
    ax.set(xlabel="round", ylabel="realized MACs / dense MACs", title="flops_ratio")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "flops_ratio.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
