"""Turn run folders (a multirun sweep, a benchmark, single runs) into tables and plots.

    python -m analysis.report multirun/2026-11-21/10-00-00            # writes report.md/.csv, PNGs
    python -m analysis.report outputs/bench --out reports/bench

Runs are grouped by protocol (dataset, ways, shots) and, within it, by configuration: every
setting that differs between the runs except the seed. A row gives the mean over seeds and, with
several seeds, the standard deviation over seeds (accuracy, flops_ratio, MACs, wall time); with
one seed, accuracy's ± is the 95% interval over that run's target tasks. Settings a strategy does
not read (ρ for fedmeta) do not split its runs: identical configurations are merged, runs of the
same seed averaged first, and the merge is noted. Failed runs are listed, never silently dropped.

Runs of one protocol and seed adapt on the same target tasks, so each row is also compared with
the reference strategy (fedmeta unless ``--reference``) task by task: the paired difference is
far tighter than the two rows' own intervals, which are dominated by how hard each task is.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from analysis.runs import NOT_A_SETTING, Run, find_runs, inert_keys, strategy_in
from conf.choices import StrategyName
from gating.stats import mean_ci95
from server.results import round_axis

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter
from matplotlib.transforms import offset_copy

SHORT = {
    "strategy.name": "",
    "gating.target_ratio": "ρ",
    "gating.lambda": "λ",
    "meta.first_order": "first_order",
    "adapt.backbone_lr": "α",
    "adapt.gate_lr": "γ",
    "meta.backbone_lr": "β_backbone",
    "meta.gate_lr": "β_gate",
    "gating.shaping": "shaping",
    "gating.shaping_rounds": "shaping_rounds",
}
# Summary keys averaged over seeds; the first four also get their standard deviation.
SPREAD = ("accuracy", "flops_ratio", "macs", "wall_seconds")
METRICS = (
    *SPREAD,
    "input_dependent_share",
    "node_dependent_share",
    "accuracy_before",
    "nearest_centroid_accuracy",
    "seconds_per_round",
    "bytes_per_client_round",
)
COLUMNS = [
    ("configuration", "configuration"),
    ("seeds", "seeds"),
    ("accuracy", "accuracy"),
    ("paired_delta", "Δ accuracy vs reference (paired)"),
    ("rounds_to_reference", "rounds to reference's accuracy"),
    ("flops_ratio", "flops_ratio"),
    ("macs", "MACs / image"),
    ("input_dependent_share", "input-dependent gates"),
    ("node_dependent_share", "node-dependent gates"),
    ("wall_seconds", "wall s"),
    ("accuracy_before", "before adaptation"),
    ("nearest_centroid_accuracy", "nearest centroid"),
    ("seconds_per_round", "s / round"),
    ("bytes_per_client_round", "bytes / client / round"),
]


@dataclass
class Row:
    protocol: tuple[str, int, int]
    label: str
    runs: list[Run]
    values: dict[str, float]
    settings: dict[str, Any]  # the varying settings that define this row (inert ones left out)
    note: str = ""


def varying_keys(runs: list[Run]) -> list[str]:
    """Settings that differ between the runs, the strategy first.

    A key that takes one value per strategy (fedavg's SGD server optimizer) only follows from
    the strategy and is left out; one that varies within a strategy stays.
    """
    keys = sorted({k for run in runs for k in run.config} - NOT_A_SETTING)
    varying = [k for k in keys if len({repr(run.config.get(k)) for run in runs}) > 1]
    if "strategy.name" not in varying:
        return varying

    def follows_from_strategy(key: str) -> bool:
        values: dict[str, set[str]] = defaultdict(set)
        for run in runs:
            if key not in inert_keys(run.config):
                values[run.config["strategy.name"]].add(repr(run.config.get(key)))
        return all(len(v) <= 1 for v in values.values())

    rest = [k for k in varying if k != "strategy.name" and not follows_from_strategy(k)]
    return ["strategy.name", *rest]


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def label(run: Run, keys: list[str], exact: bool = False) -> str:
    """``metagater ρ=0.3``: the run's value of each of ``keys`` its strategy reads."""
    inert = inert_keys(run.config)
    parts = []
    for key in keys:
        if key in inert:
            continue
        value = run.config.get(key)
        text = repr(value) if exact else _short(value)
        name = SHORT.get(key, key)
        parts.append(text if name == "" else f"{name}={text}")
    return " ".join(parts) or str(run.config["strategy.name"])


def build_rows(runs: list[Run]) -> list[Row]:
    finished = [run for run in runs if run.failure is None]
    by_protocol: dict[tuple, list[Run]] = defaultdict(list)
    for run in finished:
        by_protocol[run.protocol].append(run)
    rows = []
    for protocol, members in sorted(by_protocol.items()):
        keys = varying_keys(members)
        groups: dict[tuple, list[Run]] = defaultdict(list)
        for run in members:
            inert = inert_keys(run.config)
            groups[tuple((k, repr(run.config.get(k))) for k in keys if k not in inert)].append(run)
        # A label names the settings that vary among its own strategy's runs: FedAvg's label is
        # its bare name even when Per-FedAvg ran with both values of first_order.
        per_strategy: dict[str, list[Run]] = defaultdict(list)
        for run in members:
            per_strategy[run.config["strategy.name"]].append(run)
        shown = {
            name: [k for k in keys if k == "strategy.name" or k in varying_keys(same)]
            for name, same in per_strategy.items()
        }
        labels = [
            label(group[0], shown[group[0].config["strategy.name"]]) for group in groups.values()
        ]
        for (identity, group), name in zip(groups.items(), labels, strict=True):
            if labels.count(name) > 1:  # values that only differ past 4 significant digits
                name = label(group[0], keys, exact=True)
            settings = {k: group[0].config.get(k) for k, _ in identity}
            rows.append(
                Row(protocol, name, group, aggregate(group), settings, merge_note(group, keys))
            )
    rows.sort(key=lambda r: (r.protocol, str(r.runs[0].config["strategy.name"]), r.label))
    return rows


def merge_note(group: list[Run], keys: list[str]) -> str:
    """Say so when a row holds more runs than seeds: which settings were merged, and why."""
    seeds = {run.config.get("seed") for run in group}
    if len(group) == len(seeds):
        return ""
    merged = [k for k in keys if len({repr(run.config.get(k)) for run in group}) > 1]
    strategy = group[0].config["strategy.name"]
    why = (
        f"{', '.join(merged)} not used by {strategy}, so these are identical configurations"
        if merged
        else "repeated runs of the same configuration and seed"
    )
    return f"{len(group)} runs for {len(seeds)} seed(s): {why}; runs of one seed were averaged"


def aggregate(group: list[Run]) -> dict[str, float]:
    """Means over seeds (runs of one seed averaged first) and standard deviations over seeds."""
    by_seed: dict[Any, list[Run]] = defaultdict(list)
    for run in group:
        by_seed[run.config.get("seed")].append(run)

    def seed_means(key: str) -> list[float]:
        means = []
        for runs in by_seed.values():
            values = [float(r.summary[key]) for r in runs if r.summary.get(key) is not None]
            if values:
                means.append(float(np.mean(values)))
        return means

    values: dict[str, float] = {"seeds": len(by_seed), "runs": len(group)}
    for key in METRICS:
        means = seed_means(key)
        values[key] = float(np.mean(means)) if means else math.nan
        if key in SPREAD:
            values[f"{key}_std"] = float(np.std(means, ddof=1)) if len(means) > 1 else math.nan
    values["accuracy_ci95"] = (
        float(np.mean(ci)) if (ci := seed_means("accuracy_ci95")) else math.nan
    )
    # One number for "how uncertain is this accuracy": spread over seeds, else the run's CI.
    values["accuracy_spread"] = (
        values["accuracy_std"] if len(by_seed) > 1 else values["accuracy_ci95"]
    )
    return values


def add_paired_deltas(rows: list[Row], reference: str) -> None:
    """Accuracy minus the reference strategy's on the same target tasks, per row.

    Per seed the mean of per-task differences; with one seed ± is the 95% interval over tasks,
    with several the standard deviation of the per-seed means (as for every other column).
    Rows without per-task accuracies (older runs) or without a shared seed get none.
    """
    for row, ref in _reference_pairs(rows, reference):
        base = _tasks_by_seed(ref)
        if row is ref:
            row.values.update(paired_delta=0.0, paired_delta_reference=1.0)
            continue
        per_seed = []
        for seed, tasks in _tasks_by_seed(row).items():
            shared = sorted(set(tasks) & set(base.get(seed, {})))
            if shared:
                per_seed.append([tasks[t] - base[seed][t] for t in shared])
        if len(per_seed) == 1:
            row.values["paired_delta"], row.values["paired_delta_ci95"] = mean_ci95(per_seed[0])
            row.values["paired_tasks"] = len(per_seed[0])
        elif per_seed:
            means = [float(np.mean(d)) for d in per_seed]
            row.values["paired_delta"] = float(np.mean(means))
            row.values["paired_delta_std"] = float(np.std(means, ddof=1))
            row.values["paired_tasks"] = float(np.mean([len(d) for d in per_seed]))


def add_time_to_accuracy(rows: list[Row], reference: str) -> None:
    """Rounds (and training seconds) until a row's evaluations first reach the reference
    strategy's final accuracy of the same seed, mean over seeds; NaN when a seed never does.

    Intermediate evaluations may use a sample of the target nodes (``federation.eval_nodes``)
    and happen every ``eval_every`` rounds, so this is a resolution of ``eval_every`` rounds.
    """
    for row, ref in _reference_pairs(rows, reference):
        target = {
            run.config.get("seed"): float(run.summary["accuracy"])
            for run in ref.runs
            if run.summary
        }
        reached = [
            _time_to(run, target[seed])
            for run in row.runs
            if (seed := run.config.get("seed")) in target
        ]
        if reached:
            rounds = [r for r, _ in reached]
            seconds = [s for _, s in reached]
            row.values["rounds_to_reference"] = float(np.mean(rounds))
            row.values["seconds_to_reference"] = float(np.mean(seconds))


# What a reference must share with a row to be its baseline: the same network, data and tasks.
_SETTING_PREFIXES = ("model.", "dataset.", "task.", "federation.")


def _reference_pairs(rows: list[Row], reference: str) -> list[tuple[Row, Row]]:
    """(row, its reference row) for every row that has one: the only configuration of the
    reference strategy in the row's protocol, or, where there are several (a ResNet and a
    Conv-4 fedmeta), the one with the row's network, data and task settings."""

    def setting(row: Row) -> dict[str, Any]:
        return {k: v for k, v in row.runs[0].config.items() if k.startswith(_SETTING_PREFIXES)}

    pairs = []
    for protocol in {r.protocol for r in rows}:
        members = [r for r in rows if r.protocol == protocol]
        references = [r for r in members if r.runs[0].config["strategy.name"] == reference]
        for row in members:
            if len(references) == 1:
                pairs.append((row, references[0]))
                continue
            same = [ref for ref in references if setting(ref) == setting(row)]
            if len(same) == 1:  # otherwise nothing unambiguous to compare with
                pairs.append((row, same[0]))
    return pairs


def _time_to(run: Run, accuracy: float) -> tuple[float, float]:
    elapsed = 0.0
    for record in run.history:
        elapsed += float(record.get("seconds", 0.0))
        if record.get("accuracy") is not None and record["accuracy"] >= accuracy - 1e-12:
            return float(record["round"]), elapsed
    return math.nan, math.nan


def _tasks_by_seed(row: Row) -> dict[Any, dict[str, float]]:
    """Per-task accuracies per seed; runs of one seed (merged rows) are averaged task by task."""
    collected: dict[Any, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in row.runs:
        for task, accuracy in run.task_accuracy.items():
            collected[run.config.get("seed")][task].append(float(accuracy))
    return {
        seed: {task: float(np.mean(v)) for task, v in tasks.items()}
        for seed, tasks in collected.items()
    }


def _number(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key in ("seeds", "runs"):
        return str(int(value))
    if key in ("macs", "bytes_per_client_round"):
        return f"{value:,.0f}"
    if key == "wall_seconds":
        return f"{value:.0f}"
    if key == "seconds_per_round":
        return f"{value:.2f}"
    if key == "rounds_to_reference":
        return "not reached" if math.isnan(value) else f"{value:.0f}"
    if key.startswith("accuracy") or key == "nearest_centroid_accuracy":
        return f"{value:.4f}"
    if key.startswith("paired_delta"):
        return f"{value:+.4f}"
    return f"{value:.3f}"


def _cell(key: str, values: dict[str, float]) -> str:
    """``mean ± std`` over seeds; accuracy of a single seed gets its 95% CI, marked as such."""
    if key == "paired_delta":
        return _paired_cell(values)
    text = _number(key, values.get(key))
    if key not in SPREAD:
        return text
    std = values.get(f"{key}_std", math.nan)
    if not math.isnan(std):
        return f"{text} ± {_number(key, std)}"
    if key == "accuracy" and not math.isnan(values.get("accuracy_ci95", math.nan)):
        return f"{text} ± {_number(key, values['accuracy_ci95'])} (CI)"
    return text


def _paired_cell(values: dict[str, float]) -> str:
    if values.get("paired_delta_reference"):
        return "reference"
    if "paired_delta" not in values:
        return "-"
    text = _number("paired_delta", values["paired_delta"])
    if "paired_delta_std" in values:
        return f"{text} ± {values['paired_delta_std']:.4f}"
    ci = values.get("paired_delta_ci95", math.nan)
    tasks = int(values["paired_tasks"])
    return text if math.isnan(ci) else f"{text} ± {ci:.4f} (CI, {tasks} tasks)"


def protocol_name(protocol: tuple[str, int, int]) -> str:
    dataset, ways, shots = protocol
    return f"{dataset} {ways}-way {shots}-shot"


def _shown_path(path: Path, roots: list[Path]) -> str:
    for root in roots:
        if path.is_relative_to(root):
            return str(path.relative_to(root)) or "."
    return str(path)


def write_tables(
    rows: list[Row],
    failed: list[Run],
    out: Path,
    roots: list[Path] | None = None,
    reference: str = StrategyName.fedmeta,
) -> tuple[Path, Path]:
    roots = roots or []
    lines = ["# Report", ""]
    for protocol in sorted({r.protocol for r in rows}):
        lines += [f"## {protocol_name(protocol)}", ""]
        titles = [title.replace("reference", reference) for _, title in COLUMNS]
        lines.append("| " + " | ".join(titles) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        members = [r for r in rows if r.protocol == protocol]
        for row in members:
            cells = [row.label] + [_cell(k, row.values) for k, _ in COLUMNS[1:]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines += [f"- {row.label}: {row.note}" for row in members if row.note]
        if any(row.note for row in members):
            lines.append("")
    if failed:
        lines += ["## Failed runs", ""]
        lines += [f"- `{_shown_path(run.path, roots)}`: {run.failure}" for run in failed]
        lines.append("")
    lines += [
        "Values are means over seeds; `±` is the standard deviation over seeds, or, for a single "
        "seed's accuracy (marked CI), the 95% interval over its target tasks.",
        f"Δ vs {reference}: mean over the shared target tasks of (accuracy - {reference}'s "
        "accuracy on the same task), same seed; `-` where per-task accuracies are missing.",
        f"Rounds to reference's accuracy: the first evaluation round whose accuracy reaches "
        f"{reference}'s final accuracy of the same seed (mean over seeds; intermediate "
        "evaluations every eval_every rounds, possibly on a sample of the target nodes).",
        "MACs are multiply-adds per image (gates included); flops_ratio = realized / dense.",
    ]
    markdown = out / "report.md"
    markdown.write_text("\n".join(lines) + "\n")

    setting_keys = sorted({k for row in rows for k in row.settings})
    numbers = ["seeds", "runs"]
    for key in METRICS:
        numbers += [key, f"{key}_std"] if key in SPREAD else [key]
    numbers.insert(numbers.index("accuracy_std") + 1, "accuracy_ci95")
    numbers[numbers.index("accuracy_ci95") + 1 : 0] = [
        "paired_delta",
        "paired_delta_ci95",
        "paired_delta_std",
        "paired_tasks",
        "rounds_to_reference",
        "seconds_to_reference",
    ]
    table = out / "report.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["dataset", "ways", "shots", "configuration", *setting_keys, *numbers, "note"]
        )
        for row in rows:
            writer.writerow(
                [*row.protocol, row.label]
                + [row.settings.get(k, "") for k in setting_keys]
                + [_csv(row.values.get(k)) for k in numbers]
                + [row.note]
            )
    return markdown, table


def _csv(value: Any) -> Any:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


# ----------------------------------------------------------------------------------- plots
# One marker and colour per row of a protocol, the same in both plots; a row's points may be a
# single one, so every series has a marker.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "*")
Y_LABEL = "target-node accuracy after one Adapt\n(one image at a time)"
CENTROID_LABEL = "nearest-centroid on raw pixels, same target tasks"
REFERENCE = "reference"  # gid of reference lines: listed after the rows in a legend
DODGE_POINTS = 7.0  # sideways shift, in points, between rows drawn at the same MACs


def _value(values: dict[str, Any], key: str) -> float:
    """A row's figure as a float: missing and None (JSON's NaN) become NaN."""
    value = values.get(key)
    return math.nan if value is None else float(value)


def _styles(rows: list[Row]) -> dict[int, dict[str, Any]]:
    colors = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20").colors
    return {
        id(row): {"marker": MARKERS[i % len(MARKERS)], "color": colors[i % len(colors)]}
        for i, row in enumerate(rows)
    }


def error_bar(row: Row) -> tuple[float, str]:
    """The accuracy error bar of a row and what it is: the standard deviation over seeds with
    several seeds, else the 95% interval over the single run's target tasks."""
    seeds = int(_value(row.values, "seeds")) if "seeds" in row.values else len(row.runs)
    if seeds > 1:
        std = _value(row.values, "accuracy_std")
        return (std, f"± std, {seeds} seeds") if math.isfinite(std) else (std, f"{seeds} seeds")
    ci = _value(row.values, "accuracy_ci95")
    tasks = (row.runs[0].summary or {}).get("target_tasks") if row.runs else None
    if not math.isfinite(ci):
        return ci, "1 seed, no interval"
    return ci, "± 95% CI" + (f", {tasks} tasks" if tasks else "")


def _error_caption(rows: list[Row]) -> list[str]:
    kinds = {error_bar(row)[1].split(",")[0] for row in rows}
    lines = []
    if "± std" in kinds:
        lines.append("error bars [± std]: standard deviation over seeds")
    if "± 95% CI" in kinds:
        lines.append("error bars [± 95% CI]: 95% interval over the target tasks of one seed's run")
    return lines or ["no error bars: no spread available"]


def _target_ratio(row: Row) -> float | None:
    config = row.runs[0].config if row.runs else {}
    strategy = strategy_in(config)
    if strategy is None or not strategy.gated or config.get("gating.target_ratio") in (None, ""):
        return None
    return float(config["gating.target_ratio"])


def _centroid_line(ax, rows: list[Row]) -> None:
    floor = [_value(r.values, "nearest_centroid_accuracy") for r in rows]
    floor = [v for v in floor if math.isfinite(v)]
    if floor:
        spread = max(floor) - min(floor) > 0.005
        ax.axhline(
            float(np.mean(floor)),
            ls="--",
            lw=1,
            color="gray",
            label=CENTROID_LABEL + (" (mean over rows)" if spread else ""),
            gid=REFERENCE,
        )


def _chance_line(ax, protocol: tuple) -> None:
    ways = protocol[1]
    if isinstance(ways, int) and ways > 0:
        ax.axhline(1 / ways, ls=":", lw=1, color="black", label=f"chance (1/{ways})", gid=REFERENCE)


def accuracy_vs_macs_figure(rows: list[Row], protocol: tuple, zoom: bool = False) -> Figure:
    """Accuracy against realized MACs, one point per row of ``protocol``. The accuracy axis
    spans [0, 1]; with ``zoom`` it spans the points and their error bars only (differences of a
    point are invisible on [0, 1]), and the plot says its axis does not start at 0."""
    members = [r for r in rows if r.protocol == protocol]
    styles = _styles(members)
    fig, ax = plt.subplots(figsize=(7, 6), layout="constrained")
    placed = [
        r
        for r in members
        if math.isfinite(_value(r.values, "macs")) and math.isfinite(_value(r.values, "accuracy"))
    ]
    # Rows at the same MACs (dense baselines) are shifted sideways a few points, so none hides
    # another; their values stay as they are.
    shift: dict[int, float] = {}
    placed_x = sorted(placed, key=lambda r: r.values["macs"])
    scale = max((r.values["macs"] for r in placed), default=1.0) or 1.0
    groups: list[list[Row]] = []
    for row in placed_x:
        if groups and abs(row.values["macs"] - groups[-1][0].values["macs"]) <= 2e-3 * scale:
            groups[-1].append(row)
        else:
            groups.append([row])
    for group in groups:
        for i, row in enumerate(group):
            shift[id(row)] = (i - (len(group) - 1) / 2) * DODGE_POINTS
    for row in placed:
        transform = offset_copy(ax.transData, fig=fig, x=shift[id(row)], units="points")
        yerr, meaning = error_bar(row)
        xerr = _value(row.values, "macs_std")
        x, y = row.values["macs"], row.values["accuracy"]
        ax.errorbar(
            x,
            y,
            xerr=xerr if math.isfinite(xerr) else None,
            yerr=yerr if math.isfinite(yerr) else None,
            fmt=styles[id(row)]["marker"],
            color=styles[id(row)]["color"],
            ms=6,
            capsize=3,
            transform=transform,
            label=f"{row.label} [{meaning}]",
        )
        if (ratio := _target_ratio(row)) is not None:
            ax.annotate(
                f"ρ={ratio:g}",
                (x, y),
                xycoords=transform,
                xytext=(4, -10),
                textcoords="offset points",
                fontsize=7,
                color=styles[id(row)]["color"],
            )
    _connect_ratio_sweeps(ax, placed)
    dense = [
        float(run.summary["dense_macs"])
        for row in members
        for run in row.runs
        if run.summary and run.summary.get("dense_macs") is not None
    ]
    if dense:
        ax.axvline(
            float(np.median(dense)), ls="-.", lw=1, color="black", label="dense cost", gid=REFERENCE
        )
    _centroid_line(ax, members)
    _chance_line(ax, protocol)
    xs = [r.values["macs"] + np.nan_to_num(_value(r.values, "macs_std")) for r in placed]
    right = max([*xs, *dense], default=1.0) or 1.0
    ax.set_xlim(0, right * 1.08)
    ax.xaxis.set_major_formatter(EngFormatter())
    notes = _error_caption(placed)
    if left_out := [r.label for r in members if r not in placed]:
        notes.append(f"not plotted (no accuracy or MACs): {', '.join(left_out)}")
    if any(_target_ratio(r) is not None for r in placed):
        notes.append("ρ next to a point: its target MAC ratio")
    if any(shift.values()):
        notes.append("points at the same MACs are drawn a few pixels apart")
    if zoom and placed:
        ends = [
            r.values["accuracy"] + sign * np.nan_to_num(error_bar(r)[0])
            for r in placed
            for sign in (-1, 1)
        ]
        margin = 0.1 * (max(ends) - min(ends)) or 0.01
        ax.set_ylim(min(ends) - margin, max(ends) + margin)
        notes.append("accuracy axis zoomed to the points: it does not start at 0")
    fig.suptitle(f"Target-node accuracy vs compute: {protocol_name(protocol)}", fontsize=11)
    ax.set_title("\n".join(notes), fontsize=7)
    ax.set(xlabel="MACs per image (realized, gate MLP MACs included)", ylabel=Y_LABEL)
    if not zoom:
        ax.set_ylim(0, 1.02)
    _legend(fig, ax)
    return fig


def plot_accuracy_vs_macs(rows: list[Row], out: Path, zoom: bool = False) -> list[Path]:
    return [
        _finish(accuracy_vs_macs_figure(rows, protocol, zoom), protocol, out / "accuracy_vs_macs")
        for protocol in sorted({r.protocol for r in rows})
    ]


def _connect_ratio_sweeps(ax, rows: list[Row]) -> None:
    """A thin line through the rows of one strategy that differ only in the target ratio."""
    sweeps: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        if "gating.target_ratio" in row.settings:
            rest = tuple(
                sorted((k, repr(v)) for k, v in row.settings.items() if k != "gating.target_ratio")
            )
            sweeps[rest].append(row)
    labelled = False
    for members in sweeps.values():
        if len(members) > 1:
            members.sort(key=lambda r: r.values["macs"])
            ax.plot(
                [r.values["macs"] for r in members],
                [r.values["accuracy"] for r in members],
                "-",
                lw=0.8,
                color="gray",
                alpha=0.6,
                zorder=0,
                label=None if labelled else "ρ sweep (joins rows differing only in ρ)",
                gid=REFERENCE,
            )
            labelled = True


def accuracy_per_round_figure(rows: list[Row], protocol: tuple) -> Figure:
    """Target accuracy at each evaluation round, one line per row (mean over its runs)."""
    members = [r for r in rows if r.protocol == protocol]
    styles = _styles(members)
    fig, ax = plt.subplots(figsize=(7, 6), layout="constrained")
    every_round: set[int] = set()
    for row in members:
        per_round: dict[int, list[float]] = defaultdict(list)
        for run in row.runs:
            for h in run.history:
                every_round.add(int(h["round"]))
                value = h.get("accuracy")
                if value is not None and math.isfinite(float(value)):
                    per_round[int(h["round"])].append(float(value))
        rounds = sorted(per_round)
        if not rounds:
            continue
        seeds = len({run.config.get("seed") for run in row.runs})
        ax.plot(
            rounds,
            [np.mean(per_round[r]) for r in rounds],
            "-",
            marker=styles[id(row)]["marker"],
            color=styles[id(row)]["color"],
            ms=4,
            label=row.label + (f" (mean of {seeds} seeds)" if seeds > 1 else ""),
        )
    _centroid_line(ax, members)
    _chance_line(ax, protocol)
    round_axis(ax, sorted(every_round))
    notes = ["one line per configuration; each point: one evaluation round"]
    sampled = {run.config.get("federation.eval_nodes") for row in members for run in row.runs} - {
        None,
        0,
        "",
    }
    if sampled:
        nodes = ", ".join(str(n) for n in sorted(sampled, key=str))
        notes.append(f"intermediate rounds: {nodes} target nodes sampled; final round: all")
    fig.suptitle(f"Target-node accuracy per round: {protocol_name(protocol)}", fontsize=11)
    ax.set_title("\n".join(notes), fontsize=7)
    ax.set(xlabel="round", ylabel=Y_LABEL)
    ax.set_ylim(0, 1.02)
    _legend(fig, ax)
    return fig


def plot_accuracy_per_round(rows: list[Row], out: Path) -> list[Path]:
    return [
        _finish(accuracy_per_round_figure(rows, protocol), protocol, out / "accuracy_per_round")
        for protocol in sorted({r.protocol for r in rows})
    ]


def _is_reference(handle: Any) -> bool:
    return getattr(handle, "get_gid", lambda: None)() == REFERENCE


def _legend(fig: Figure, ax) -> None:
    """Grid, and the legend below the plot: the rows first, then the reference lines."""
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        order = sorted(range(len(handles)), key=lambda i: _is_reference(handles[i]))
        fig.legend(
            [handles[i] for i in order],
            [labels[i] for i in order],
            fontsize=7,
            loc="outside lower center",
            ncol=2,
            frameon=False,
        )


def _finish(fig: Figure, protocol: tuple, stem: Path) -> Path:
    """Save as ``<stem>_<dataset>_<ways>_<shots>.png`` and close."""
    path = stem.with_name(f"{stem.name}_{'_'.join(map(str, protocol))}.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def report(
    roots: list[Path], out: Path, reference: str = StrategyName.fedmeta, zoom: bool = False
) -> list[Path]:
    runs = find_runs(*roots)
    if not runs:
        raise SystemExit(f"no run folders under {', '.join(map(str, roots))}")
    out.mkdir(parents=True, exist_ok=True)
    rows = build_rows(runs)
    add_paired_deltas(rows, reference)
    add_time_to_accuracy(rows, reference)
    failed = [run for run in runs if run.failure is not None]
    written = list(write_tables(rows, failed, out, roots, reference))
    if rows:
        written += plot_accuracy_vs_macs(rows, out, zoom) + plot_accuracy_per_round(rows, out)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", type=Path, help="run or sweep folders")
    parser.add_argument("--out", type=Path, help="where to write (default: the first folder)")
    parser.add_argument(
        "--reference",
        default=StrategyName.fedmeta.value,
        help="strategy every row is compared with task by task (default: fedmeta)",
    )
    parser.add_argument(
        "--zoom",
        action="store_true",
        help="accuracy-vs-MACs plots: fit the accuracy axis to the points instead of [0, 1]",
    )
    args = parser.parse_args(argv)
    written = report(args.roots, args.out or args.roots[0], args.reference, args.zoom)
    print((written[0]).read_text())
    print("written:", *written, sep="\n  ")


if __name__ == "__main__":
    main()
