"""Turn run folders (a multirun sweep, a benchmark, single runs) into tables and plots.

    python -m analysis.report multirun/2026-11-21/10-00-00            # writes report.md/.csv, PNGs
    python -m analysis.report outputs/bench --out reports/bench

Runs are grouped by protocol (dataset, ways, shots) and, within it, by configuration: every
setting that differs between the runs except the seed. With several seeds a row gives the mean
and standard deviation over seeds; with one, the 95% interval over that run's target tasks.
Failed runs are listed, never silently dropped.
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

from analysis.runs import NOT_A_SETTING, Run, find_runs

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SHORT = {
    "strategy.name": "",
    "gating.target_ratio": "ρ",
    "gating.lambda": "λ",
    "meta.first_order": "first_order",
    "adapt.backbone_lr": "α",
    "adapt.gate_lr": "γ",
    "meta.backbone_lr": "β_backbone",
    "meta.gate_lr": "β_gate",
}
COLUMNS = [
    ("configuration", "configuration"),
    ("seeds", "runs"),
    ("accuracy", "accuracy"),
    ("accuracy_spread", "± (95% CI, or std over seeds)"),
    ("accuracy_before", "before adaptation"),
    ("nearest_centroid_accuracy", "nearest centroid"),
    ("flops_ratio", "flops_ratio"),
    ("macs", "MACs / image"),
    ("seconds_per_round", "s / round"),
    ("bytes_per_client_round", "bytes / client / round"),
    ("wall_seconds", "wall s"),
]


@dataclass
class Row:
    protocol: tuple[str, int, int]
    label: str
    runs: list[Run]
    values: dict[str, float]


def varying_keys(runs: list[Run]) -> list[str]:
    keys = sorted({k for run in runs for k in run.config} - NOT_A_SETTING)
    varying = [k for k in keys if len({repr(run.config.get(k)) for run in runs}) > 1]
    # The strategy name first; settings that only follow from the strategy are noise.
    implied = {"gating.enabled", "meta.optimizer", "meta.backbone_lr", "meta.first_order"}
    if "strategy.name" in varying:
        varying = ["strategy.name"] + [
            k for k in varying if k != "strategy.name" and k not in implied
        ]
    return varying


def label(run: Run, keys: list[str]) -> str:
    parts = []
    for key in keys:
        value = run.config.get(key)
        name = SHORT.get(key, key)
        parts.append(str(value) if name == "" else f"{name}={value}")
    return " ".join(parts) or run.config["strategy.name"]


def build_rows(runs: list[Run]) -> list[Row]:
    finished = [run for run in runs if run.failure is None]
    by_protocol: dict[tuple, list[Run]] = defaultdict(list)
    for run in finished:
        by_protocol[run.protocol].append(run)
    rows = []
    for protocol, members in sorted(by_protocol.items()):
        keys = varying_keys(members)
        groups: dict[str, list[Run]] = defaultdict(list)
        for run in members:
            groups[label(run, keys)].append(run)
        for name, group in groups.items():
            rows.append(Row(protocol, name, group, aggregate(group)))
    rows.sort(key=lambda r: (r.protocol, r.runs[0].config["strategy.name"], r.label))
    return rows


def aggregate(group: list[Run]) -> dict[str, float]:
    def mean(key: str) -> float:
        values = [float(r.summary[key]) for r in group if r.summary.get(key) is not None]
        return float(np.mean(values)) if values else math.nan

    values = {key: mean(key) for key, _ in COLUMNS[2:] if key != "accuracy_spread"}
    if len(group) > 1:
        values["accuracy_spread"] = float(np.std([r.summary["accuracy"] for r in group], ddof=1))
    else:
        values["accuracy_spread"] = float(group[0].summary.get("accuracy_ci95") or math.nan)
    values["seeds"] = len(group)
    return values


def _cell(key: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key in ("seeds",):
        return str(int(value))
    if key in ("macs", "bytes_per_client_round"):
        return f"{value:,.0f}"
    if key in ("wall_seconds",):
        return f"{value:.0f}"
    if key == "seconds_per_round":
        return f"{value:.2f}"
    return (
        f"{value:.4f}"
        if key.startswith("accuracy") or key == "nearest_centroid_accuracy"
        else f"{value:.3f}"
    )


def protocol_name(protocol: tuple[str, int, int]) -> str:
    dataset, ways, shots = protocol
    return f"{dataset} {ways}-way {shots}-shot"


def write_tables(rows: list[Row], failed: list[Run], out: Path) -> tuple[Path, Path]:
    lines = ["# Report", ""]
    for protocol in sorted({r.protocol for r in rows}):
        lines += [f"## {protocol_name(protocol)}", ""]
        lines.append("| " + " | ".join(title for _, title in COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        for row in (r for r in rows if r.protocol == protocol):
            cells = [row.label] + [_cell(k, row.values.get(k)) for k, _ in COLUMNS[1:]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if failed:
        lines += ["## Failed runs", ""]
        lines += [f"- `{run.path}`: {run.failure}" for run in failed]
        lines.append("")
    lines.append(
        "MACs are multiply-adds per image (gates included); flops_ratio = realized / dense."
    )
    markdown = out / "report.md"
    markdown.write_text("\n".join(lines) + "\n")
    table = out / "report.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dataset", "ways", "shots"] + [k for k, _ in COLUMNS])
        for row in rows:
            writer.writerow(
                [*row.protocol, row.label] + [row.values.get(k) for k, _ in COLUMNS[1:]]
            )
    return markdown, table


def plot_accuracy_vs_macs(rows: list[Row], out: Path) -> list[Path]:
    paths = []
    for protocol in sorted({r.protocol for r in rows}):
        members = [r for r in rows if r.protocol == protocol]
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for row in members:
            gated = row.runs[0].config.get("gating.enabled", False)
            ax.errorbar(
                row.values["macs"],
                row.values["accuracy"],
                yerr=row.values["accuracy_spread"],
                fmt="o" if gated else "s",
                capsize=3,
                label=row.label,
            )
        ax.set(
            xlabel="MACs per image (realized, gates included)",
            ylabel="target accuracy after adaptation",
            title=f"Accuracy vs compute: {protocol_name(protocol)}",
        )
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / f"accuracy_vs_macs_{'_'.join(map(str, protocol))}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def plot_accuracy_per_round(rows: list[Row], out: Path) -> list[Path]:
    paths = []
    for protocol in sorted({r.protocol for r in rows}):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for row in (r for r in rows if r.protocol == protocol):
            per_round: dict[int, list[float]] = defaultdict(list)
            for run in row.runs:
                for h in run.history:
                    if "accuracy" in h:
                        per_round[h["round"]].append(h["accuracy"])
            rounds = sorted(per_round)
            ax.plot(rounds, [np.mean(per_round[r]) for r in rounds], "o-", ms=3, label=row.label)
        ax.set(
            xlabel="round",
            ylabel="target accuracy after adaptation",
            title=f"Accuracy per round: {protocol_name(protocol)}",
        )
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / f"accuracy_per_round_{'_'.join(map(str, protocol))}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def report(roots: list[Path], out: Path) -> list[Path]:
    runs = find_runs(*roots)
    if not runs:
        raise SystemExit(f"no run folders under {', '.join(map(str, roots))}")
    out.mkdir(parents=True, exist_ok=True)
    rows = build_rows(runs)
    failed = [run for run in runs if run.failure is not None]
    written = list(write_tables(rows, failed, out))
    if rows:
        written += plot_accuracy_vs_macs(rows, out) + plot_accuracy_per_round(rows, out)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", type=Path, help="run or sweep folders")
    parser.add_argument("--out", type=Path, help="where to write (default: the first folder)")
    args = parser.parse_args(argv)
    written = report(args.roots, args.out or args.roots[0])
    print((written[0]).read_text())
    print("written:", *written, sep="\n  ")


if __name__ == "__main__":
    main()
