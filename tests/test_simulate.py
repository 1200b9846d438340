"""`python simulate.py` as a user runs it: config errors, a Ray federation, interrupt and resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conf.schema import settings_from_flat, to_flat, validate
from gating.federated.round import BareFederation
from gating.federated.strategies import strategy_of
from server.checkpoint import read_history
from tests.support import composed, error_text, interrupt, subprocess_env, summary_of

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "federation=tiny",
    "federation.train_nodes=4",
    "federation.target_nodes=3",
    "federation.clients_per_round=2",
    "model.width=16",
    "task.queries=5",
]


def rounds_done(run_dir: Path) -> int:
    """Completed rounds of a running run, from its append-only history."""
    path = run_dir / "history.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def simulate(tmp_path: Path, run_dir: Path, *overrides: str, timeout: float = 300):
    return subprocess.run(
        [sys.executable, "simulate.py", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("federation.roundz=3", "roundz"),
        ("gating.lamda=0.5", "lamda"),
        ("federation.rounds=many", "federation.rounds"),
        ("adapt.order=sideways", "adapt.order"),
        ("strategy=fedmagic", "fedmagic"),
    ],
)
def test_a_mistyped_or_invalid_key_fails_naming_it(override, named):
    """In-process, as Hydra composes the command line (test_trust runs one such command whole:
    one line on stderr, exit 2, nothing written)."""
    with pytest.raises(Exception) as error:
        validate(composed(override))
    assert named in error_text(error.value)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (("strategy=fedmeta", "adapt.learn_step_sizes=true"), "adapt.learn_step_sizes"),
        (("strategy=metasgd", "adapt.learn_step_sizes=false"), "adapt.learn_step_sizes"),
        (("strategy=fedavg", "adapt.zero_head=true"), "adapt.zero_head"),
        (("strategy=metagater_fo", "meta.first_order=false"), "meta.first_order"),
        (("strategy=reptile", "adapt.zero_head=true"), "adapt.zero_head"),
        (("strategy=static_mask", "gating.shaping=0.5"), "gating.shaping"),
    ],
)
def test_what_a_strategy_name_implies_is_checked_naming_the_setting(overrides, named):
    """The strategy's record checks the run config wherever the run's strategy is looked up
    (preflight, the server, every node), flat Flower configs included."""
    cfg = validate(composed(*overrides))
    with pytest.raises(ValueError, match=re.escape(named)):
        strategy_of(cfg)
    flat = to_flat(cfg)
    with pytest.raises(ValueError, match=re.escape(named)):
        strategy_of(settings_from_flat(flat))


def test_learned_step_sizes_need_a_second_order_meta_gradient():
    with pytest.raises(Exception) as error:
        validate(
            composed("strategy=metagater", "adapt.learn_step_sizes=true", "meta.first_order=true")
        )
    assert "adapt.learn_step_sizes" in error_text(error.value)
    strategy_of(validate(composed("strategy=metagater", "adapt.learn_step_sizes=true")))


def test_a_removed_setting_says_what_replaced_it():
    with pytest.raises(KeyError, match=re.escape("strategy.name implies it")):
        settings_from_flat({"gating.enabled": False})
    with pytest.raises(Exception) as error:
        validate(composed("gating.enabled=false"))
    assert "enabled" in error_text(error.value)


@pytest.mark.ray
def test_ray_simulation_writes_every_output_and_adaptation_helps(tmp_path):
    run = tmp_path / "run"
    overrides = [*TINY, "federation.rounds=12", "federation.eval_every=6"]
    # a short warm-up: λ's dual ascent moves it from round 4 on, in Flower and in the bare loop
    result = simulate(tmp_path, run, *overrides, "gating.warmup_rounds=4")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in (
        "config.yaml",
        "history.json",
        "summary.json",
        "checkpoint.pt",
        "accuracy.png",
        "flops_ratio.png",
        "class_split.json",
        "history.jsonl",
    ):
        assert (run / name).stat().st_size > 0, name
    split = json.loads((run / "class_split.json").read_text())
    assert split["dataset"] == "digits" and split["disjoint"] is False  # 10 classes: none held out
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))  # the default tracker
    history = json.loads((run / "history.json").read_text())
    assert [h["round"] for h in history] == list(range(1, 13))
    assert "accuracy" in history[5] and "accuracy" not in history[4]
    summary = json.loads((run / "summary.json").read_text())
    expected = {
        "strategy",
        "dataset",
        "rounds",
        "accuracy",
        "accuracy_ci95",
        "accuracy_before",
        "flops_ratio",
        "macs",
        "dense_macs",
        "nearest_centroid_accuracy",
        "target_tasks",
        "wall_seconds",
    }
    assert expected <= set(summary)
    assert summary["target_tasks"] == 3 and summary["rounds"] == 12
    assert summary["accuracy"] > summary["accuracy_before"] + 0.1
    assert 0 < summary["flops_ratio"] <= 1.05
    assert "[round 12/12]" in result.stdout + result.stderr  # progress is shown
    # The Flower run did exactly the rounds of gating.federated.round, which the benchmarks use.
    cfg = settings_from_flat(to_flat(OmegaConf.load(run / "config.yaml")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a Ray actor: the same float arithmetic
    try:
        bare = BareFederation(cfg).train(12)
    finally:
        torch.set_num_threads(threads)
    final = torch.load(run / "checkpoint.pt", weights_only=True)["strategy"]["params"]
    for name, value in bare.items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=0)
    weights = [h["reg_weight"] for h in json.loads((run / "history.json").read_text())]
    assert len(set(weights[4:])) == 8  # λ moved every round after the warm-up
    # A finished run is never overwritten by accident.
    again = simulate(tmp_path, run, *TINY, "federation.rounds=12")
    assert again.returncode != 0 and "resume=true" in again.stderr + again.stdout


@pytest.mark.ray
def test_interrupted_run_resumes_to_the_same_parameters(tmp_path):
    overrides = [*TINY, "federation.rounds=6", "federation.eval_every=3", "output.plots=false"]
    overrides.append("gating.warmup_rounds=1")  # λ moves every round: it must resume too
    straight = tmp_path / "straight"
    assert simulate(tmp_path, straight, *overrides).returncode == 0

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, "simulate.py", *overrides, f"hydra.run.dir={interrupted}"],
        cwd=ROOT,
        env=subprocess_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if rounds_done(interrupted) >= 3:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the run never reached round 3")
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # as abrupt as a crash or a lost machine
        process.wait(timeout=60)
    assert not (interrupted / "summary.json").exists()

    resumed = simulate(tmp_path, interrupted, *overrides, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after round" in resumed.stdout + resumed.stderr
    final_a = torch.load(straight / "checkpoint.pt", weights_only=True)
    final_b = torch.load(interrupted / "checkpoint.pt", weights_only=True)
    assert final_b["round"] == final_a["round"] == 6
    # the history is appended to history.jsonl, not carried in every checkpoint: a checkpoint
    # costs the same at round 1,000 as at round 10
    assert "history" not in final_a
    for name, value in final_a["strategy"]["params"].items():
        torch.testing.assert_close(final_b["strategy"]["params"][name], value, rtol=0, atol=0)
    history_a = json.loads((straight / "history.json").read_text())
    history_b = json.loads((interrupted / "history.json").read_text())
    assert [h["train_loss"] for h in history_a] == [h["train_loss"] for h in history_b]
    weights = [h["reg_weight"] for h in history_a]
    assert len(set(weights)) == 6 and weights == [h["reg_weight"] for h in history_b]
    tasks_a = json.loads((straight / "task_accuracy.json").read_text())
    assert len(tasks_a) == 3  # TINY's target nodes, keyed by partition id
    assert tasks_a == json.loads((interrupted / "task_accuracy.json").read_text())

    # resume=true on a finished run evaluates its final parameters again (same tasks, same
    # numbers) without training further; a run cannot resume into fewer rounds than it did
    (straight / "task_accuracy.json").unlink()
    again = simulate(tmp_path, straight, *overrides, "resume=true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((straight / "task_accuracy.json").read_text()) == tasks_a
    final_state = torch.load(straight / "checkpoint.pt", weights_only=True)
    assert final_state["round"] == 6
    # the final evaluation is in the run's history too, so an extension keeps it
    assert read_history(straight, 6)[-1]["accuracy"] == pytest.approx(
        json.loads((straight / "summary.json").read_text())["accuracy"]
    )
    fewer = simulate(tmp_path, straight, *overrides, "federation.rounds=5", "resume=true")
    assert fewer.returncode != 0 and "past federation.rounds=5" in fewer.stderr + fewer.stdout

    # Ctrl-C (SIGINT to the terminal's process group) stops the run within seconds, with the
    # last completed round's checkpoint intact; resume=true then finishes it, identically.
    stopped = tmp_path / "stopped"
    code, out, err = interrupt(
        [sys.executable, "simulate.py", *overrides, f"hydra.run.dir={stopped}"],
        ROOT,
        subprocess_env(tmp_path),
        ready=lambda: rounds_done(stopped) >= 2,
    )
    output = out + err
    assert code == 130 and "Traceback" not in output, output[-2000:]
    (line,) = [x for x in output.splitlines() if x.startswith("Stopped: ")]
    assert line.endswith(f"resume=true hydra.run.dir={stopped}"), line
    assert not (stopped / "summary.json").exists()
    done = torch.load(stopped / "checkpoint.pt", weights_only=True)["round"]
    assert 2 <= done < 6
    resumed = simulate(tmp_path, stopped, *overrides, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final_c = torch.load(stopped / "checkpoint.pt", weights_only=True)
    for name, value in final_a["strategy"]["params"].items():
        torch.testing.assert_close(final_c["strategy"]["params"][name], value, rtol=0, atol=0)


@pytest.mark.ray
def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path):
    """As a process manager stops a job: SIGTERM to the driver alone. Ray's own SIGTERM handler
    (sys.exit mid-round) and its core's stack dump (exit status 134) must not take over."""
    run = tmp_path / "run"
    code, out, err = interrupt(
        [sys.executable, "simulate.py", *TINY, "federation.rounds=400", f"hydra.run.dir={run}"],
        ROOT,
        subprocess_env(tmp_path),
        ready=lambda: rounds_done(run) >= 2,
        sig=signal.SIGTERM,
        group=False,
    )
    output = out + err
    assert code == 143, output[-3000:]
    assert "Traceback" not in output and "SIGTERM received" not in output, output[-3000:]
    (line,) = [x for x in output.splitlines() if x.startswith("Stopped: ")]
    assert line.endswith(f"resume=true hydra.run.dir={run}"), line
    assert 2 <= torch.load(run / "checkpoint.pt", weights_only=True)["round"] < 400


@pytest.mark.ray
def test_a_simulation_that_cannot_start_ray_ends_instead_of_hanging(tmp_path):
    """With a 300 kB limit on file sizes (`ulimit -f 300`) Ray's node cannot start; Flower
    reports its runtime crashed, and the ServerApp's thread, waiting for nodes, must end too."""
    import resource

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (300 * 1024, 300 * 1024))

    result = subprocess.run(
        [sys.executable, "simulate.py", *TINY, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=240,  # it used to wait out federation.timeout (600 s), then hang at exit
        preexec_fn=small_files,
    )
    assert result.returncode == 1
    assert "Simulation Runtime crashed" in result.stderr + result.stdout


def test_a_missing_dataset_fails_before_ray_starts_and_says_how_to_get_it(tmp_path):
    result = simulate(tmp_path, tmp_path / "run", "dataset=npz", f"dataset.path={tmp_path}/no.npz")
    assert result.returncode != 0
    assert "no.npz" in result.stderr and "Ray" not in result.stderr
    mnist = simulate(tmp_path, tmp_path / "run2", "dataset=mnist")
    assert mnist.returncode != 0 and "dataset-fashion-mnist" in mnist.stderr


@pytest.mark.ray
@pytest.mark.parametrize(
    ("strategy", "extra"),
    [
        ("metagater_fo", []),
        ("fedmeta", []),
        ("fedavg", []),
        ("perfedavg", []),
        ("perfedavg", ["meta.first_order=true"]),
        ("metasgd", []),
        ("reptile", []),
    ],
)
def test_every_strategy_runs_end_to_end_on_digits(tmp_path, strategy, extra):
    run = tmp_path / "run"
    result = simulate(tmp_path, run, *TINY, f"strategy={strategy}", *extra, "output.plots=false")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summary_of(run)
    assert summary["strategy"] == strategy and summary["target_tasks"] == 3
    gated = strategy.startswith("metagater")
    assert (summary["flops_ratio"] != 1.0) == gated  # dense baselines pay exactly the dense price
