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
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

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
#: Gated runs only (see gating.model.conditionality): 0 for both means a static mask.
CONDITIONALITY_KEYS = ("input_dependent_share", "node_dependent_share")


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


# ----------------------------------------------------------------------------------- plots
# Every series may hold a single point (one evaluation, one round), so every one has a marker;
# long training series show at most about this many of them.
MAX_MARKERS = 40
LABEL_AFTER = "target nodes after one Adapt (one image at a time)"
LABEL_TRANSDUCTIVE = "target nodes after one Adapt, transductive (query-batch norm statistics)"
LABEL_BEFORE = "target nodes before adaptation"
LABEL_CENTROID = "nearest-centroid on raw pixels, same target tasks"


def plot_history(
    history: list[dict[str, Any]], out_dir: Path, target_ratio: float | None = None
) -> list[Path]:
    """``accuracy.png`` and ``flops_ratio.png`` per round; ``target_ratio`` is ρ, drawn as a
    reference line on the flops_ratio plot when the run has gates."""
    paths = []
    for name, fig in history_figures(history, target_ratio).items():
        paths.append(out_dir / name)
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    return paths


def history_figures(
    history: list[dict[str, Any]], target_ratio: float | None = None
) -> dict[str, Figure]:
    """The figures of :func:`plot_history` by file name, open (the caller closes them)."""
    return {
        "accuracy.png": accuracy_figure(history),
        "flops_ratio.png": flops_ratio_figure(history, target_ratio),
    }


def accuracy_figure(history: list[dict[str, Any]]) -> Figure:
    gated = not _is_dense(history)
    fig, ax = plt.subplots(figsize=(6.5, 5), layout="constrained")
    training = "training nodes' query accuracy" + (" (sampled gates)" if gated else "")
    drawn = [
        _series(ax, history, "accuracy", "o-", LABEL_AFTER, color="C0"),
        _series(ax, history, "accuracy_transductive", "D-", LABEL_TRANSDUCTIVE, color="C2"),
        _series(ax, history, "accuracy_before", "s--", LABEL_BEFORE, color="C1"),
        _series(ax, history, "nearest_centroid_accuracy", "^:", LABEL_CENTROID, color="gray"),
        _series(ax, history, "train_accuracy", ".-", training, color="C3", alpha=0.5, lw=1),
    ]
    fig.suptitle("Accuracy per round: target nodes and training nodes", fontsize=11)
    ax.set_title(
        "target nodes: query accuracy after one Adapt on their support set;\n"
        "training nodes: query accuracy of the nodes sampled that round",
        fontsize=8,
    )
    ax.set(xlabel="round", ylabel="accuracy", ylim=(0, 1.02))
    _finish_history_axes(ax, history, any(drawn))
    return fig


def flops_ratio_figure(history: list[dict[str, Any]], target_ratio: float | None = None) -> Figure:
    dense = _is_dense(history)
    fig, ax = plt.subplots(figsize=(6.5, 5), layout="constrained")
    drawn = [
        _series(
            ax,
            history,
            "flops_ratio",
            "o-",
            "target nodes after one Adapt" + ("" if dense else " (deterministic gates)"),
            color="C0",
        ),
        _series(
            ax,
            history,
            "train_flops_ratio",
            ".-",
            "training nodes" + ("" if dense else " (sampled gates)"),
            color="C3",
            alpha=0.5,
            lw=1,
        ),
    ]
    ax.axhline(1.0, color="black", ls="--", lw=1, label="dense cost (flops_ratio = 1)")
    references = [1.0]
    if target_ratio is not None and not dense:
        ax.axhline(target_ratio, color="C2", ls="-.", lw=1, label=f"target ρ = {target_ratio:g}")
        references.append(float(target_ratio))
    fig.suptitle("flops_ratio per round: realized MACs / dense MACs", fontsize=11)
    ax.set_title(
        "dense network (no gates): every channel computes, so flops_ratio is 1"
        if dense
        else "gate MLP MACs are included, so while every channel is still open\n"
        "the ratio sits just above 1; it falls as gates close",
        fontsize=8,
    )
    values = [v for key in ("flops_ratio", "train_flops_ratio") for v in _values(history, key)[1]]
    top = max([*references, *(v for v in values if math.isfinite(v))])
    ax.set(
        xlabel="round",
        ylabel="realized MACs / dense MACs" + ("" if dense else "\n(gate MLP MACs included)"),
        ylim=(0, top * 1.1),
    )
    _finish_history_axes(ax, history, any(drawn))
    return fig


def _values(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Rounds and values of the records holding ``key``; None (a NaN in JSON) becomes NaN."""
    records = [h for h in history if key in h]
    return [int(h["round"]) for h in records], [
        math.nan if h[key] is None else float(h[key]) for h in records
    ]


def _series(ax, history, key: str, style: str, label: str, **kwargs) -> bool:
    """Plot one series with a marker (at most ``MAX_MARKERS`` of them); False when it has no
    finite value, so it takes no legend entry for a line nobody can see."""
    rounds, values = _values(history, key)
    if not any(math.isfinite(v) for v in values):
        return False
    every = max(1, len(rounds) // MAX_MARKERS)
    ax.plot(rounds, values, style, label=label, markevery=every, ms=4, **kwargs)
    return True


def _is_dense(history: list[dict[str, Any]]) -> bool:
    """A run without gates reports flops_ratio exactly 1.0; a gated one never does, as its
    gates' own MACs come on top of the open channels'."""
    values = [v for key in ("flops_ratio", "train_flops_ratio") for v in _values(history, key)[1]]
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and all(v == 1.0 for v in finite)


def _finish_history_axes(ax, history: list[dict[str, Any]], drawn: bool) -> None:
    round_axis(ax, [int(h["round"]) for h in history if "round" in h])
    if not drawn:
        ax.text(0.5, 0.5, "no values recorded yet", transform=ax.transAxes, ha="center")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.figure.legend(fontsize=8, loc="outside lower center", frameon=False)


def round_axis(ax, rounds: list[int]) -> None:
    """Integer ticks only, and room either side so a single round is not squeezed to a line."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if rounds:
        low, high = min(rounds), max(rounds)
        pad = max(0.5, 0.03 * (high - low))
        ax.set_xlim(low - pad, high + pad)
