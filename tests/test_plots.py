"""The plots on the data shapes that break them: one round, one evaluation, one seed, several
seeds, rows at the same MACs, a protocol without gates, NaN and None values.

The checks read the figures themselves (ticks, markers, reference lines, limits, texts), taken
before they are saved and closed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

import analysis.report as report_module
from analysis.report import (
    CENTROID_LABEL,
    accuracy_per_round_figure,
    accuracy_vs_macs_figure,
    build_rows,
    report,
)
from analysis.runs import find_runs
from server.results import (
    LABEL_AFTER,
    LABEL_BEFORE,
    LABEL_CENTROID,
    history_figures,
    plot_history,
)
from tests.test_report import write_run

NO_MARKER = (None, "", " ", "None", "none")


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


# ------------------------------------------------------------------------------- helpers
def texts(fig: Figure) -> list[str]:
    """Every piece of text a reader sees: titles, axis labels, notes, legend entries."""
    found = [fig.get_suptitle()]
    for ax in fig.axes:
        found += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        found += [t.get_text() for t in ax.texts]
        if ax.get_legend():
            found += [t.get_text() for t in ax.get_legend().get_texts()]
    for legend in fig.legends:
        found += [t.get_text() for t in legend.get_texts()]
    return [t for t in found if t]


def legend_labels(fig: Figure) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def visible_ticks(ax) -> list[float]:
    ax.figure.canvas.draw()
    low, high = ax.get_xlim()
    return [t for t in ax.get_xticks() if low - 1e-9 <= t <= high + 1e-9]


def assert_integer_round_ticks(ax) -> None:
    ticks = visible_ticks(ax)
    assert ticks, "a round axis without ticks"
    assert all(float(t).is_integer() for t in ticks), ticks


def data_lines(ax) -> list[Line2D]:
    """Lines that carry data: reference lines (axhline/axvline) span the axes, not data."""
    lines = [*ax.lines, *(c.lines[0] for c in ax.containers if isinstance(c, ErrorbarContainer))]
    return [
        line for line in lines if all(line.get_transform().contains_branch_seperately(ax.transData))
    ]


def assert_single_points_visible(ax) -> None:
    for line in data_lines(ax):
        x = [v for v in line.get_xdata() if math.isfinite(float(v))]
        if len(x) == 1:
            assert line.get_marker() not in NO_MARKER, line.get_label()
            assert line.get_markersize() > 0, line.get_label()


def line_labelled(ax, label: str) -> Line2D:
    matches = [line for line in ax.lines if line.get_label() == label]
    assert len(matches) == 1, [line.get_label() for line in ax.lines]
    return matches[0]


def assert_y_span_holds(ax, low: float = 0.0) -> None:
    bottom, top = ax.get_ylim()
    assert bottom <= low
    values = [
        float(v) for line in data_lines(ax) for v in line.get_ydata() if math.isfinite(float(v))
    ]
    assert all(bottom <= v <= top for v in values), (ax.get_ylim(), values)


def record(r: int, *, evaluation: bool, flops: float = 1.017, **extra) -> dict:
    rec = {"round": r, "train_accuracy": 0.3, "train_flops_ratio": flops, "train_loss": 1.0}
    if evaluation:
        rec.update(
            accuracy=0.33,
            accuracy_before=0.2,
            accuracy_transductive=0.35,
            flops_ratio=flops,
            nearest_centroid_accuracy=0.41,
        )
    rec.update(extra)
    return rec


# ------------------------------------------------------------------- per-run plots
def test_one_round_one_evaluation_every_line_visible_and_both_references_labelled():
    figures = history_figures([record(1, evaluation=True)], target_ratio=0.5)
    accuracy, flops = figures["accuracy.png"], figures["flops_ratio.png"]
    for fig in (accuracy, flops):
        ax = fig.axes[0]
        assert_integer_round_ticks(ax)
        assert visible_ticks(ax) == [1]
        assert_single_points_visible(ax)
        assert_y_span_holds(ax)

    ax = accuracy.axes[0]
    assert ax.get_ylim()[1] >= 1.0  # accuracy spans [0, 1], not a zoom on 0.3-0.4
    labels = legend_labels(accuracy)
    assert LABEL_AFTER in labels and LABEL_BEFORE in labels
    assert "target nodes after one Adapt (one image at a time)" in labels
    assert "nearest-centroid on raw pixels, same target tasks" in labels
    assert "training nodes' query accuracy (sampled gates)" in labels
    assert not any(label.strip().lower() == "floor" for label in labels)
    assert "target nodes and training nodes" in accuracy.get_suptitle()

    ax = flops.axes[0]
    dense = line_labelled(ax, "dense cost (flops_ratio = 1)")
    rho = line_labelled(ax, "target ρ = 0.5")
    assert list(dense.get_ydata()) == [1, 1] and list(rho.get_ydata()) == [0.5, 0.5]
    assert {"dense cost (flops_ratio = 1)", "target ρ = 0.5"} <= set(legend_labels(flops))
    assert any("gate MLP MACs" in t and "included" in t for t in texts(flops))
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] > 1.017


def test_two_argument_call_still_writes_both_plots_without_a_rho_line(tmp_path):
    history = [record(r, evaluation=r % 2 == 0) for r in range(1, 5)]
    paths = plot_history(history, tmp_path)
    assert [p.name for p in paths] == ["accuracy.png", "flops_ratio.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    flops = history_figures(history)["flops_ratio.png"]
    labels = [line.get_label() for line in flops.axes[0].lines]
    assert "dense cost (flops_ratio = 1)" in labels
    assert not any("ρ" in label for label in labels)


def test_long_run_keeps_integer_ticks_and_markers():
    history = [record(r, evaluation=r % 50 == 0, flops=1.0 - r / 1000) for r in range(1, 301)]
    figures = history_figures(history, target_ratio=0.3)
    for fig in figures.values():
        ax = fig.axes[0]
        assert_integer_round_ticks(ax)
        assert all(line.get_marker() not in NO_MARKER for line in data_lines(ax))
        assert_y_span_holds(ax)
    assert figures["flops_ratio.png"].axes[0].get_ylim()[0] == 0


def test_none_and_nan_values_and_an_old_run_without_transductive_accuracy():
    history = [
        record(1, evaluation=False, train_accuracy=None),
        record(2, evaluation=True, accuracy_before=None, train_flops_ratio=math.nan),
        record(3, evaluation=False),
        record(4, evaluation=True),
    ]
    for rec in history:
        rec.pop("accuracy_transductive", None)
    history[1]["nearest_centroid_accuracy"] = None
    history[3]["nearest_centroid_accuracy"] = None  # a series with no value at all
    figures = history_figures(history, target_ratio=0.5)
    accuracy = figures["accuracy.png"]
    labels = legend_labels(accuracy)
    assert not any("transductive" in label for label in labels)
    assert LABEL_CENTROID not in labels  # no value: no legend entry for an invisible line
    before = line_labelled(accuracy.axes[0], LABEL_BEFORE)  # one finite point out of two
    assert before.get_marker() not in NO_MARKER
    for fig in figures.values():
        assert_integer_round_ticks(fig.axes[0])
        assert_y_span_holds(fig.axes[0])


def test_dense_run_says_so_and_draws_no_rho_line():
    history = [record(r, evaluation=r == 2, flops=1.0) for r in (1, 2)]
    flops = history_figures(history, target_ratio=0.5)["flops_ratio.png"]
    labels = [line.get_label() for line in flops.axes[0].lines]
    assert "dense cost (flops_ratio = 1)" in labels
    assert not any("ρ" in label for label in labels)
    assert any("no gates" in t for t in texts(flops))
    assert not any("sampled gates" in label for label in legend_labels(flops))


def test_empty_history_still_plots():
    figures = history_figures([], target_ratio=0.5)
    assert any("no values" in t for t in texts(figures["accuracy.png"]))


# --------------------------------------------------------------------- report plots
def patch(folder: Path, summary: dict | None = None, history: list | None = None) -> None:
    if summary:
        data = json.loads((folder / "summary.json").read_text())
        (folder / "summary.json").write_text(json.dumps({**data, **summary}))
    if history is not None:
        (folder / "history.json").write_text(json.dumps(history))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Two seeds of fedmeta, one-seed ρ sweep, two dense rows at fedmeta's MACs (one with the
    same accuracy), a gated run with one target task (no interval) and one whose accuracy is
    missing."""
    root = tmp_path / "sweep"
    dense = {"strategy.name": "fedmeta"}
    write_run(root / "fedmeta_s0", dense, 0.80, 200_000, seed=0)
    write_run(root / "fedmeta_s1", dense, 0.76, 200_000, seed=1)
    write_run(root / "fedavg", {"strategy.name": "fedavg"}, 0.78, 200_000)
    perfedavg = {"strategy.name": "perfedavg"}
    write_run(root / "perfedavg", perfedavg, 0.6, 200_000)
    for ratio, accuracy in ((0.3, 0.70), (0.5, 0.78)):
        write_run(root / f"mg_{ratio}", {"gating.target_ratio": ratio}, accuracy, ratio * 200_000)
    write_run(root / "mg_0.7", {"gating.target_ratio": 0.7}, 0.79, 140_000)
    patch(root / "mg_0.7", summary={"accuracy_ci95": None, "target_tasks": 1})
    write_run(root / "mg_0.9", {"gating.target_ratio": 0.9}, 0.8, 180_000)
    patch(root / "mg_0.9", summary={"accuracy": None})
    return root


def test_a_zoomed_accuracy_axis_spans_the_points_and_says_it_does_not_start_at_zero(sweep):
    rows = build_rows(find_runs(sweep))
    fig = accuracy_vs_macs_figure(rows, rows[0].protocol, zoom=True)
    low, high = fig.axes[0].get_ylim()
    assert 0.5 < low < 0.6 and 0.8 < high < 0.9  # the points lie between 0.6 and 0.8
    assert "does not start at 0" in "\n".join(texts(fig))
    assert_single_points_visible(fig.axes[0])


def test_accuracy_vs_macs_names_error_bars_keeps_points_apart_and_spans_zero(sweep):
    rows = build_rows(find_runs(sweep))
    protocol = rows[0].protocol
    fig = accuracy_vs_macs_figure(rows, protocol)
    ax = fig.axes[0]
    labels = {label.split(" [")[0]: label for label in legend_labels(fig)}
    assert labels["fedmeta"].endswith("[± std, 2 seeds]")
    assert labels["metagater ρ=0.3"].endswith("[± 95% CI, 600 tasks]")
    assert labels["metagater ρ=0.7"].endswith("[1 seed, no interval]")
    assert "metagater ρ=0.9" not in labels  # no accuracy: left out, and said so
    shown = "\n".join(texts(fig))
    assert "not plotted (no accuracy or MACs): metagater ρ=0.9" in shown
    assert "standard deviation over seeds" in shown
    assert "95% interval over the target tasks" in shown
    assert CENTROID_LABEL in labels and not any(k.lower() == "floor" for k in labels)
    assert "dense cost" in labels and "ρ sweep (joins rows differing only in ρ)" in labels
    assert {"ρ=0.3", "ρ=0.5", "ρ=0.7"} <= {t.get_text() for t in ax.texts}

    # Three rows at the dense MACs, two of them at the same accuracy: drawn apart on screen.
    fig.canvas.draw()
    points = {}
    for container in ax.containers:
        line = container.lines[0]
        x, y = line.get_xdata()[0], line.get_ydata()[0]
        points[container.get_label().split(" [")[0]] = line.get_transform().transform((x, y))
    assert points["fedmeta"][0] != points["fedavg"][0] != points["perfedavg"][0]
    assert points["fedmeta"][0] != points["perfedavg"][0]
    assert points["fedmeta"][1] == pytest.approx(points["fedavg"][1])

    assert ax.get_ylim()[0] <= 0 and ax.get_ylim()[1] >= 1
    assert ax.get_xlim()[0] == 0 and ax.get_xlim()[1] >= 200_000
    assert_single_points_visible(ax)
    assert "accuracy" in fig.get_suptitle() and "MACs" in ax.get_xlabel()
    assert "after one Adapt" in ax.get_ylabel()


def test_accuracy_per_round_one_evaluation_per_run(sweep):
    for folder in sweep.iterdir():
        patch(folder, history=[record(1, evaluation=True, accuracy=0.5)])
    rows = build_rows(find_runs(sweep))
    fig = accuracy_per_round_figure(rows, rows[0].protocol)
    ax = fig.axes[0]
    assert_integer_round_ticks(ax)
    assert visible_ticks(ax) == [1]
    assert_single_points_visible(ax)
    assert_y_span_holds(ax)
    assert ax.get_ylim()[1] >= 1
    labels = legend_labels(fig)
    assert "fedmeta (mean of 2 seeds)" in labels and CENTROID_LABEL in labels
    assert "per round" in fig.get_suptitle() and "after one Adapt" in ax.get_ylabel()


def test_report_on_a_dense_only_protocol_with_one_round(tmp_path, monkeypatch):
    root = tmp_path / "dense"
    dense = {"strategy.name": "fedmeta"}
    write_run(root / "fedmeta", dense, 0.4, 200_000)
    write_run(root / "fedavg", {"strategy.name": "fedavg"}, 0.3, 200_000)
    for folder in root.iterdir():
        patch(
            folder,
            summary={"accuracy_ci95": None, "rounds": 1},
            history=[{"round": 1, "accuracy": None, "train_accuracy": 0.2}],
        )
    closed: list[Figure] = []
    monkeypatch.setattr(report_module.plt, "close", closed.append)
    written = report([root], tmp_path / "out")
    assert {p.name for p in written} >= {
        "accuracy_vs_macs_digits_5_5.png",
        "accuracy_per_round_digits_5_5.png",
    }
    macs, per_round = closed
    ax = macs.axes[0]
    assert not any(t.get_text().startswith("ρ") for t in ax.texts)
    assert ax.get_ylim()[0] <= 0 and ax.get_ylim()[1] >= 1
    assert "1 seed, no interval" in "\n".join(legend_labels(macs))
    assert_single_points_visible(ax)
    # No accuracy recorded in any round: axes still integer, no invisible lines in the legend.
    assert_integer_round_ticks(per_round.axes[0])
    assert not any(label in ("fedmeta", "fedavg") for label in legend_labels(per_round))
