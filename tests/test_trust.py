"""Bad input loses nothing: impossible settings fail before Ray starts, naming the key; files
that carry code or are damaged are refused naming the path; results are never written over."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from analysis.export import main as export_main
from analysis.export import typed_config
from analysis.report import report
from conf.choices import GateCost, NormKind
from conf.schema import LEGACY_VALUES, default_config, to_flat, validate
from gating.federated.settings import meta_config
from gating.federated.strategies import strategy_of
from gating.meta import MetaConfig
from server.checkpoint import (
    RunFolderError,
    check_resumable,
    check_run_folder,
    load_checkpoint,
    save_checkpoint,
)
from tests.support import composed, run_simulate
from tests.test_report import write_run


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("gating.temperature", 0.0, "> 0"),
        ("gating.lambda", -1.0, ">= 0"),
        ("federation.min_train_replies", 9, "federation.clients_per_round"),
        ("federation.timeout", 0.0, "> 0 seconds"),
        ("task.tasks_per_client", 0, ">= 1"),
        ("task.train_pool", 4, "task.shots + task.queries"),
        ("task.holdout_classes", "lots", "auto or in [0, 1)"),
        ("ray.client_cpus", 4.0, "no ClientApp actor can start"),
        ("robust.trim_fraction", 0.5, "[0, 0.5)"),
        ("privacy.delta", 1.0, "(0, 1)"),
    ],
)
def test_an_impossible_setting_is_refused_naming_the_key_and_the_fix(key, value, says):
    cfg = default_config()
    section, leaf = key.split(".")
    cfg[section][leaf] = value
    with pytest.raises(ValueError, match="config key " + key.replace(".", r"\.")) as error:
        validate(cfg)
    assert says in str(error.value)


def test_private_runs_must_average_uniformly():
    cfg = default_config()
    cfg.privacy.noise_multiplier = 1.0
    cfg.robust.aggregation = "median"
    with pytest.raises(ValueError, match=r"robust\.aggregation"):
        validate(cfg)


def write_npz(path: Path, x: np.ndarray, classes: int = 5, per_class: int = 80) -> Path:
    np.savez(path, x=x, y=np.repeat(np.arange(classes), per_class)[: len(x)])
    return path


@pytest.mark.parametrize(
    ("data", "overrides", "says"),
    [
        ("ok", ["task.ways=8"], "task.ways=8"),  # 5 classes in the file
        ("ok", ["task.shots=20", "task.train_pool=40"], "samples"),
        ("channel-first", [], "channel-first"),
        ("float-255", [], "in [0, 1]"),
        ("non-square", [], "square"),
    ],
)
def test_data_that_cannot_make_the_tasks_fails_before_ray_starts(
    tmp_path, subprocess_env, data, overrides, says
):
    rng = np.random.default_rng(0)
    x = {
        "ok": rng.integers(0, 256, (400, 8, 8), dtype=np.uint8),
        "channel-first": rng.random((400, 3, 8, 8)).astype(np.float32),
        "float-255": rng.random((400, 8, 8)).astype(np.float32) * 255,
        "non-square": rng.integers(0, 256, (400, 8, 6), dtype=np.uint8),
    }[data]
    path = write_npz(tmp_path / "data.npz", x)
    run = tmp_path / "run"
    result = run_simulate(
        subprocess_env,
        "dataset=npz",
        f"dataset.path={path}",
        *overrides,
        f"hydra.run.dir={run}",
    )
    assert result.returncode != 0
    assert says in result.stderr, result.stderr[-2000:]
    assert "Ray" not in result.stderr and "ServerApp" not in result.stderr  # nothing started
    assert not (run / "config.yaml").exists()


class Payload:
    """Unpickling this runs code: it writes a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_a_checkpoint_that_carries_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"round": 1, "strategy": Payload(marker)}, run / "checkpoint.pt")
    with pytest.raises(RunFolderError, match=r"checkpoint\.pt holds more than tensors"):
        load_checkpoint(run / "checkpoint.pt")
    OmegaConf.save(default_config(), run / "config.yaml")
    assert export_main([str(run)]) == 2
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage",
    [lambda p: p.write_bytes(p.read_bytes()[:100]), lambda p: p.write_text("not a checkpoint")],
    ids=["truncated", "foreign"],
)
def test_a_damaged_checkpoint_is_an_error_naming_its_path(tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"round": 3, "strategy": {}, "config": {}, "wall_seconds": 1.0})
    assert load_checkpoint(path)["round"] == 3
    damage(path)
    with pytest.raises(RunFolderError, match=str(path)):
        load_checkpoint(path)


def snapshot(folder: Path) -> dict[str, tuple[float, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_folder_with_results_is_never_written_over(tmp_path, subprocess_env):
    run = tmp_path / "finished"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"accuracy": 0.9}))
    before = snapshot(run)
    result = run_simulate(subprocess_env, "federation=tiny", f"hydra.run.dir={run}")
    # refused before Ray starts, in one line (exit 2, no traceback)
    assert result.returncode == 2 and "resume=true" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert snapshot(run) == before  # not even Hydra's launch record


def test_a_refused_resume_changes_nothing(tmp_path, subprocess_env):
    run = tmp_path / "run"
    run.mkdir()
    flat = {"seed": 0, "federation.rounds": 3, "model.width": 16}
    save_checkpoint(
        run / "checkpoint.pt",
        {"round": 2, "strategy": {}, "config": flat, "wall_seconds": 1.0},
    )
    before = snapshot(run)
    result = run_simulate(subprocess_env, "federation=tiny", "resume=true", f"hydra.run.dir={run}")
    assert result.returncode == 2 and "configuration changed" in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(run) == before
    with pytest.raises(RunFolderError, match="no checkpoint"):
        check_run_folder(tmp_path / "empty", True, flat)


def test_the_report_names_a_damaged_run_and_reports_the_rest(tmp_path):
    sweep = tmp_path / "sweep"
    write_run(sweep / "0", {}, accuracy=0.8, macs=100_000, seed=0)
    write_run(sweep / "1", {}, accuracy=0.7, macs=100_000, seed=1)
    (sweep / "1" / "summary.json").write_text('{"accuracy": 0.7,')  # cut short
    report([sweep], tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "`1`: summary.json is damaged" in text  # named, with the reason
    assert "0.8000" in text  # and the healthy run is reported


def test_the_report_does_not_file_a_run_under_a_hand_edited_config(tmp_path):
    sweep = tmp_path / "sweep"
    for name, seed in (("0", 0), ("1", 1)):
        write_run(sweep / name, {}, accuracy=0.8, macs=100_000, seed=seed)
        cfg = OmegaConf.load(sweep / name / "config.yaml")
        state = {"round": 4, "strategy": {}, "config": to_flat(cfg), "wall_seconds": 1.0}
        save_checkpoint(sweep / name / "checkpoint.pt", state)
    cfg.adapt.gate_lr = 0.9  # run 1's config.yaml edited after the run
    OmegaConf.save(cfg, sweep / "1" / "config.yaml")
    report([sweep], tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "`1`: config.yaml differs from the settings in its checkpoint" in text
    assert "adapt.gate_lr: ran with 0.1, config.yaml says 0.9" in text
    assert "| metagater | 1 |" in text  # run 0 alone in the table


def test_a_checkpoint_of_an_earlier_version_cannot_resume_under_another_algorithm():
    """Runs from before model.norm existed used batch statistics, trusted claims and kept λ
    fixed: resuming them under today's defaults would change the algorithm mid-run, so it is
    refused by name."""
    current = to_flat(default_config())
    newer = ("model.norm", "robust.", "gating.lambda_lr")
    old = {k: v for k, v in current.items() if not k.startswith(newer)}
    with pytest.raises(RunFolderError, match=r"model\.norm: 'batch' -> 'metabn'"):
        check_resumable(old, current)
    check_resumable(old, {**current, **LEGACY_VALUES})  # as it was run: fine


def test_settings_a_strategy_cannot_use_are_refused():
    cfg = default_config()
    cfg.strategy.name = "fedavg"
    cfg.adapt.zero_head = True
    with pytest.raises(ValueError, match=r"adapt\.zero_head"):
        strategy_of(validate(cfg))


def test_an_older_run_folder_is_read_with_the_settings_it_ran_with(tmp_path):
    """A config.yaml written before gating.lambda_lr and model.norm existed: export reads it
    with the fixed λ and batch statistics that run used, not today's defaults."""
    cfg = OmegaConf.to_container(default_config())
    del cfg["gating"]["lambda_lr"], cfg["model"]["norm"]
    OmegaConf.save(OmegaConf.create(cfg), tmp_path / "config.yaml")
    typed = typed_config(OmegaConf.load(tmp_path / "config.yaml"), tmp_path / "config.yaml")
    assert typed.gating.lambda_lr == 0.0 and typed.model.norm is NormKind.batch


def test_a_run_folders_settings_are_read_typed_for_export(tmp_path):
    cfg = default_config()
    cfg.model.norm = "batch"
    OmegaConf.save(cfg, tmp_path / "config.yaml")
    typed = typed_config(OmegaConf.load(tmp_path / "config.yaml"), tmp_path / "config.yaml")
    assert meta_config(typed, 0.0).norm is NormKind.batch
    assert MetaConfig(norm="batch", cost="deployed").cost is GateCost.deployed


# ------------------------------------------------------------- faults found before Ray starts


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("+gating.target_ration=0.3", "unknown config key gating.target_ration (did you mean"),
        ("+foo=1", "unknown config key foo"),
        ("adapt.backbone_lr=inf", "adapt.backbone_lr=inf is invalid: expected a finite number"),
        ("gating.lambda=inf", "gating.lambda=inf"),
        ("privacy.noise_multiplier=inf", "privacy.noise_multiplier=inf"),
        ("model.gate_bias=nan", "model.gate_bias=nan"),
        ("seed=100000000000000000000000", "seed=100000000000000000000000 is invalid"),
        # 5 replies a round (the main job) cannot hold Bulyan's 4f + 3
        ("robust.aggregation=bulyan", "robust.byzantine=1 is invalid: expected small enough"),
    ],
)
def test_a_setting_no_run_can_use_is_refused_naming_the_key(override, says):
    with pytest.raises(ValueError) as error:
        validate(composed(override))
    assert says in str(error.value)


def test_a_tracking_uri_mlflow_cannot_open_is_refused():
    from server.tracking import check_tracking_store

    with pytest.raises(ValueError, match=r"tracking\.uri=foo://bar: MLflow has no tracking store"):
        check_tracking_store("mlflow", "foo://bar")
    check_tracking_store("mlflow", "sqlite:///never-created.db")  # a local store: the run's


def test_a_mistyped_added_key_ends_the_command_in_one_line(tmp_path, subprocess_env):
    run = tmp_path / "run"
    result = run_simulate(
        subprocess_env, "federation=tiny", "+gating.target_ration=0.3", f"hydra.run.dir={run}"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "did you mean gating.target_ratio?" in result.stderr


@pytest.mark.parametrize("damage", ["nan-parameters", "history", "other-network"])
def test_a_resume_from_a_damaged_run_is_refused_before_ray_starts(tmp_path, subprocess_env, damage):
    from gating.federated.settings import initial_parameters, spec_for

    cfg = composed("federation=tiny")
    flat = to_flat(cfg)
    run = tmp_path / "run"
    run.mkdir()
    params = initial_parameters(spec_for(cfg, 1, 8), 0)  # digits: 1x8x8
    if damage == "nan-parameters":
        params["gate.0.fc2.bias"][0] = float("nan")
    if damage == "other-network":
        params = initial_parameters(spec_for(cfg, 1, 8 * 4), 0)  # another image size
        params["backbone.head.weight"] = torch.zeros(5, 7)
    save_checkpoint(
        run / "checkpoint.pt",
        {"round": 2, "strategy": {"params": params}, "config": flat, "wall_seconds": 1.0},
    )
    lines = ['{"round": 1}\n', "{not json\n", '{"round": 2}\n']
    (run / "history.jsonl").write_text("".join(lines if damage == "history" else lines[::2]))
    before = snapshot(run)
    result = run_simulate(subprocess_env, "federation=tiny", "resume=true", f"hydra.run.dir={run}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    says = {
        "nan-parameters": "non-finite parameters (gate.0.fc2.bias)",
        "history": "history.jsonl:2 is not JSON",
        "other-network": "is not a checkpoint of this run's network",
    }[damage]
    assert says in result.stderr
    if damage != "other-network":  # found by the folder guard, before Hydra writes anything
        assert snapshot(run) == before


def test_a_folder_another_run_is_writing_into_is_refused(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from server.checkpoint import "
            "hold_run_folder; hold_run_folder(Path(sys.argv[1])); print('held', flush=True); "
            "time.sleep(60)",
            str(run),
        ],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match="in use by another run"):
            check_run_folder(run, False, to_flat(default_config()))
    finally:
        holder.kill()
        holder.wait()
    assert check_run_folder(run, False, to_flat(default_config())) is None  # free again
