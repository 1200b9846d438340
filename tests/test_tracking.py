"""Watching a run: TensorBoard and MLflow records read back with their own readers, the progress
bar on a terminal and plain lines elsewhere."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from server.progress import ProgressReporter
from server.tracking import check_tracking_store, make_tracker
from tests.support import run_simulate

CONFIG = {"strategy.name": "metagater", "seed": 0, "gating.target_ratio": 0.5}


def records(rounds: int) -> list[dict]:
    out = []
    for r in range(1, rounds + 1):
        record = {
            "round": r,
            "train_loss": 1.0 / r,
            "train_accuracy": 0.3 + 0.1 * r,
            "train_flops_ratio": 1.0 - 0.1 * r,
            "seconds": 0.5,
        }
        if r % 2 == 0:
            record.update(accuracy=0.5, accuracy_before=0.2, flops_ratio=0.7)
        out.append(record)
    return out


def mlflow_runs(store: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("MetaGater")
    return client, client.search_runs([experiment.experiment_id])


def read_tensorboard(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    return events


def test_tensorboard_records_every_round_and_the_summary(tmp_path):
    tracker = make_tracker("tensorboard", tmp_path, CONFIG)
    for record in records(4):
        tracker.round(record)
    tracker.finish({"accuracy": 0.5, "flops_ratio": 0.7}, [])
    events = read_tensorboard(tmp_path)
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/accuracy", "train/flops_ratio", "target/accuracy"} <= set(scalars)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("target/accuracy")] == [2, 4]


def test_mlflow_records_every_round_params_and_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default store is beside the run folder: tmp_path/mlruns
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    tracker = make_tracker("mlflow", run_folder, CONFIG)
    for record in records(2):
        tracker.round(record)
    tracker.mlflow.end_run()  # interrupted: the run folder remembers its MLflow run
    tracker = make_tracker("mlflow", run_folder, CONFIG)
    for record in records(4)[2:]:
        tracker.round(record)
    (run_folder / "summary.json").write_text(json.dumps({"accuracy": 0.5}))
    tracker.finish({"accuracy": 0.5}, [run_folder / "summary.json"])
    client, runs = mlflow_runs(tmp_path / "mlruns")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["strategy.name"] == "metagater"
    history = client.get_metric_history(run.info.run_id, "train.loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert run.data.metrics["final.accuracy"] == 0.5
    assert "summary.json" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_a_terminal_gets_a_bar_and_a_pipe_gets_periodic_lines(caplog):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    bar = ProgressReporter(stream=terminal)
    with caplog.at_level(logging.INFO, logger="metagater.rounds"):
        bar.start(40, 1)
        for record in records(40):
            bar.round(record)
        bar.close()
    assert "40/40" in terminal.getvalue() and "target acc=0.500" in terminal.getvalue()
    assert "[round 40/40]" not in terminal.getvalue()  # the lines go to the log, not the bar
    assert len([r for r in caplog.records if r.name == "metagater.rounds"]) == 40

    pipe = io.StringIO()
    plain = ProgressReporter(stream=pipe, every=10)
    plain.start(40, 1)
    for record in records(40):
        plain.round(record)
    lines = pipe.getvalue().splitlines()
    shown = sorted({int(line.split("/")[0].split()[-1]) for line in lines})
    assert shown == list(range(2, 41, 2))  # every evaluation round (every 2nd) and every 10th
    assert all(line.startswith("[round ") for line in lines)


@pytest.mark.ray
@pytest.mark.parametrize("backend", ["tensorboard", "mlflow"])
def test_a_run_with_each_tracker_writes_readable_records(tmp_path, subprocess_env, backend):
    run = tmp_path / "run"
    result = run_simulate(
        subprocess_env,
        "federation=tiny",
        f"tracking={backend}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
        f"hydra.run.dir={run}",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    if backend == "tensorboard":
        events = read_tensorboard(run)
        assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
        assert [e.step for e in events.Scalars("target/accuracy")] == [2, 3]
        assert {"plots/accuracy", "plots/flops_ratio"} <= set(events.Tags()["images"])
    else:
        client, runs = mlflow_runs(tmp_path / "mlruns")
        (only,) = runs
        assert len(client.get_metric_history(only.info.run_id, "train.loss")) == 3
        assert only.data.params["federation.rounds"] == "3"
        artifacts = {a.path for a in client.list_artifacts(only.info.run_id)}
        assert {"accuracy.png", "summary.json", "history.json"} <= artifacts


def test_an_mlflow_server_that_does_not_answer_is_refused_before_ray_starts(
    tmp_path, subprocess_env, free_port
):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = run_simulate(
        subprocess_env,
        "tracking=mlflow",
        f"tracking.uri={uri}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"tracking.uri={uri}" in result.stderr and "Ray" not in result.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_an_unanswering_server_from_the_environment_is_named_as_such(monkeypatch, free_port):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(ValueError, match=f"MLFLOW_TRACKING_URI={uri}.*unset MLFLOW_TRACKING_URI"):
        check_tracking_store("mlflow", None)
    check_tracking_store("tensorboard", None)  # only MLflow's store is probed
