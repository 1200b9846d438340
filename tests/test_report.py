"""The report command on run folders laid out as simulate.py writes them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import stats

from analysis.report import report
from conf.schema import default_config


def write_run(
    folder: Path,
    overrides: dict,
    accuracy: float,
    macs: float,
    seed: int = 0,
    finished: bool = True,
    tasks: dict[str, float] | None = None,
) -> None:
    cfg = default_config()
    for key, value in {**overrides, "seed": seed}.items():
        OmegaConf.update(cfg, key, value)
    folder.mkdir(parents=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    history = [
        {
            "round": r,
            "train_loss": 1.0 / r,
            "seconds": 0.5,
            "bytes_per_client": 1000.0,
            **({"accuracy": accuracy * r / 4} if r % 2 == 0 else {}),
        }
        for r in range(1, 5)
    ]
    (folder / "history.json").write_text(json.dumps(history))
    if finished:
        summary = {
            "strategy": cfg.strategy.name,
            "dataset": cfg.dataset.name,
            "rounds": 4,
            "accuracy": accuracy,
            "accuracy_ci95": 0.01,
            "accuracy_before": 0.2,
            "flops_ratio": macs / 200_000,
            "macs": macs,
            "dense_macs": 200_000,
            "nearest_centroid_accuracy": 0.6,
            "target_tasks": 600,
            "wall_seconds": 10.0,
            "seconds_per_round": 0.5,
            "bytes_per_client_round": 1000.0,
        }
        (folder / "summary.json").write_text(json.dumps(summary))
    if tasks is not None:
        (folder / "task_accuracy.json").write_text(json.dumps(tasks))


# Per-task accuracies by seed (target partition -> accuracy); task "3" is not shared.
FEDMETA_TASKS = {0: {"0": 0.8, "1": 0.6, "2": 1.0}, 1: {"0": 0.5, "1": 0.5}}
GATED_TASKS = {0: {"0": 0.7, "1": 0.6, "2": 0.9, "3": 0.5}, 1: {"0": 0.6, "1": 0.5}}


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "bench"
    dense = {"strategy.name": "fedmeta"}
    write_run(root / "fedmeta_s0", dense, 0.80, 200_000, seed=0, tasks=FEDMETA_TASKS[0])
    write_run(root / "fedmeta_s1", dense, 0.76, 200_000, seed=1, tasks=FEDMETA_TASKS[1])
    for ratio, accuracy in ((0.3, 0.70), (0.5, 0.78)):
        write_run(
            root / f"metagater_{ratio}",
            {"gating.target_ratio": ratio},
            accuracy,
            ratio * 200_000,
            tasks=GATED_TASKS[0],
        )
    for first_order in (True, False):  # varies within perfedavg only: not in other labels
        perfedavg = {"strategy.name": "perfedavg"}
        write_run(
            root / f"perfedavg_{first_order}",
            {**perfedavg, "meta.first_order": first_order},
            0.6,
            200_000,
        )
    half = {"gating.target_ratio": 0.5}
    write_run(root / "metagater_0.5_s1", half, 0.78, 100_000, seed=1, tasks=GATED_TASKS[1])
    write_run(root / "digits_run", {"dataset.name": "digits", "task.shots": 1}, 0.9, 50_000)
    write_run(
        root / "crashed",
        {"strategy.name": "fedavg"},
        0.0,
        0.0,
        finished=False,
    )
    return root


def test_report_builds_tables_per_protocol_and_both_plots(runs, tmp_path):
    out = tmp_path / "report"
    written = report([runs], out)
    names = {p.name for p in written}
    assert {"report.md", "report.csv"} <= names
    for protocol in ("digits_5_1", "digits_5_5"):
        assert f"accuracy_vs_macs_{protocol}.png" in names
        assert f"accuracy_per_round_{protocol}.png" in names
    for path in written:
        assert path.stat().st_size > 0

    markdown = (out / "report.md").read_text()
    assert "## digits 5-way 5-shot" in markdown and "## digits 5-way 1-shot" in markdown
    with (out / "report.csv").open() as handle:
        csv_rows = list(csv.DictReader(handle))
    rows = {row["configuration"]: row for row in csv_rows if row["shots"] == "5"}
    assert {"perfedavg first_order=True", "perfedavg first_order=False"} <= set(rows)
    # Two seeds of one configuration: mean and standard deviation over seeds.
    fedmeta = rows["fedmeta"]
    assert int(fedmeta["seeds"]) == 2
    assert float(fedmeta["accuracy"]) == pytest.approx(0.78)
    assert float(fedmeta["accuracy_std"]) == pytest.approx(np.std([0.80, 0.76], ddof=1))
    # One run: its own 95% interval over target tasks; configurations named by what differs.
    gated = rows["metagater ρ=0.3"]
    assert float(gated["accuracy_ci95"]) == pytest.approx(0.01)
    assert float(gated["macs"]) == pytest.approx(60_000)
    # Paired with fedmeta on the shared target tasks of the same seed: one seed gives the 95%
    # interval over tasks, two seeds the standard deviation of the per-seed mean differences.
    # Time to accuracy: fedmeta reaches its own final accuracy at its last evaluation;
    # ρ=0.3 (0.70) never reaches fedmeta's 0.80.
    assert float(fedmeta["rounds_to_reference"]) == 4.0
    assert float(fedmeta["seconds_to_reference"]) == pytest.approx(2.0)  # 4 rounds x 0.5 s
    assert gated["rounds_to_reference"] == ""  # not reached (NaN, an empty CSV cell)
    seed0 = [-0.1, 0.0, -0.1]
    assert float(gated["paired_delta"]) == pytest.approx(np.mean(seed0))
    assert float(gated["paired_delta_ci95"]) == pytest.approx(
        stats.t.ppf(0.975, 2) * np.std(seed0, ddof=1) / np.sqrt(3)
    )
    assert float(gated["paired_tasks"]) == 3
    both = rows["metagater ρ=0.5"]
    assert int(both["seeds"]) == 2
    assert float(both["paired_delta"]) == pytest.approx(np.mean([np.mean(seed0), 0.05]))
    assert float(both["paired_delta_std"]) == pytest.approx(np.std([np.mean(seed0), 0.05], ddof=1))
    assert float(fedmeta["paired_delta"]) == 0.0
    one_shot = [row for row in csv_rows if row["shots"] == "1"]
    assert len(one_shot) == 1 and one_shot[0]["paired_delta"] == ""  # no fedmeta there
    assert "Δ accuracy vs fedmeta (paired)" in markdown and "(CI, 3 tasks)" in markdown
    # A run without a summary is reported as failed, not dropped and not averaged in.
    assert "## Failed runs" in markdown and "crashed" in markdown
    assert not any(key.startswith("fedavg") for key in rows)


def test_report_refuses_an_empty_folder(tmp_path):
    with pytest.raises(SystemExit, match="no run folders"):
        report([tmp_path], tmp_path / "out")


def test_each_network_is_paired_with_its_own_reference(tmp_path):
    """Two fedmeta configurations in one protocol (Conv-4 and ResNet-12): each row is compared
    with the fedmeta run of its own network, task by task."""
    root = tmp_path / "bench"
    dense = {"strategy.name": "fedmeta"}
    resnet = {"model.arch": "resnet12", "model.widths": "8-8-16-16"}
    write_run(root / "fm_conv", dense, 0.8, 200_000, tasks={"0": 0.8, "1": 0.6})
    write_run(root / "fm_r12", {**dense, **resnet}, 0.7, 900_000, tasks={"0": 0.5, "1": 0.9})
    write_run(root / "mg_conv", {}, 0.75, 100_000, tasks={"0": 0.9, "1": 0.6})
    write_run(root / "mg_r12", resnet, 0.6, 500_000, tasks={"0": 0.5, "1": 0.7})
    out = tmp_path / "report"
    report([root], out)
    with (out / "report.csv").open() as handle:
        deltas = {
            (row["configuration"].split()[0], "resnet12" in row["configuration"]): row
            for row in csv.DictReader(handle)
        }
    assert float(deltas["metagater", False]["paired_delta"]) == pytest.approx(0.05)
    assert float(deltas["metagater", True]["paired_delta"]) == pytest.approx(-0.1)
    assert float(deltas["fedmeta", True]["paired_delta"]) == 0.0
