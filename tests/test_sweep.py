"""Sweeps as a researcher runs them: Hydra multirun, the sweep report, Optuna, a Ray cluster.

The ``sweep`` tests run ``simulate.py`` as a subprocess on a tiny federation; the others check the
report and the failure bookkeeping on synthetic run folders in well under a second.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from analysis.callbacks import folder_name, hydra_quoted, sweep_name
from analysis.report import build_rows, report
from analysis.runs import FAILURE_FILE, find_runs, write_failure
from conf.schema import SimulateConfig
from tests.support import interrupt, summary_of

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "federation=tiny",
    "federation.rounds=1",
    "model.width=16",
    "task.queries=5",
    "output.plots=false",
]


def multirun(
    env: dict[str, str],
    sweep_dir: Path | None,
    *overrides: str,
    cwd: Path = ROOT,
    timeout: float = 300,
    **extra_env: str,
):
    """``python simulate.py -m OVERRIDES`` in ``cwd``; without ``sweep_dir`` the sweep goes to
    its default folder, ``multirun/<the overrides>`` under ``cwd``."""
    where = [] if sweep_dir is None else [f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.run(
        [sys.executable, str(ROOT / "simulate.py"), "-m", *overrides, *where],
        cwd=cwd,
        env={**env, **extra_env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir())


def printed_sweep_folder(result: subprocess.CompletedProcess, cwd: Path) -> Path:
    """The one folder the sweep announced, at its start and its end alike."""
    named = re.findall(r"^sweep folder: (.+)$", result.stdout, flags=re.MULTILINE)
    assert len(named) == 2 and named[0] == named[1], result.stdout[-3000:]
    return cwd / named[0]


@pytest.mark.sweep
def test_the_readme_sweep_writes_one_folder_and_its_printed_report_command_works(
    tmp_path, subprocess_env
):
    # As the README gives it, without hydra.sweep.dir: the default folder is named by the
    # command, and every job lands under that one folder (its name safe for Flower's manifest).
    result = multirun(
        subprocess_env, None, "strategy=metagater,fedmeta", "seed=0,1", *TINY, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\x1b[" not in result.stdout + result.stderr  # a pipe gets no colour codes
    sweep = printed_sweep_folder(result, tmp_path)
    assert [p.name for p in (tmp_path / "multirun").iterdir()] == [sweep.name]
    assert "," not in sweep.name and "strategy=metagater+fedmeta" in sweep.name
    jobs = job_dirs(sweep)
    assert [j.name.split("_")[0] for j in jobs] == ["0", "1", "2", "3"]
    for job in jobs:
        assert "," not in job.name
        for name in ("config.yaml", "history.json", "summary.json", "checkpoint.pt"):
            assert (job / name).stat().st_size > 0, (job, name)
    assert "strategy=fedmeta" in jobs[2].name and "seed=1" in jobs[3].name

    (command,) = re.findall(r"^report: (.+)$", result.stdout, flags=re.MULTILINE)
    program, *args = shlex.split(command)
    assert program == "python" and args[:2] == ["-m", "analysis.report"]
    out = subprocess.run(
        [sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    markdown = (sweep / "report.md").read_text()
    assert "## digits 5-way 5-shot" in markdown and "Failed runs" not in markdown
    with (sweep / "report.csv").open() as handle:
        rows = {row["configuration"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"metagater", "fedmeta"}
    for name, row in rows.items():
        assert row["seeds"] == "2"
        accuracies = [
            json.loads((job / "summary.json").read_text())["accuracy"]
            for job in jobs
            if f"strategy={name}_" in job.name + "_"
        ]
        assert float(row["accuracy"]) == pytest.approx(sum(accuracies) / 2)
        for key in ("accuracy_std", "flops_ratio", "macs", "wall_seconds", "wall_seconds_std"):
            assert row[key] != "", (name, key)
    assert float(rows["fedmeta"]["flops_ratio"]) == 1.0
    assert (sweep / "accuracy_vs_macs_digits_5_5.png").stat().st_size > 5000


@pytest.mark.sweep
def test_a_failed_job_is_recorded_and_reported_while_the_others_complete(tmp_path, subprocess_env):
    # Job 0 asks for more clients per round than the federation has: it fails, job 1 still runs.
    # The default sweep folder: the failure is found there and listed, and the exit status is 1.
    result = multirun(
        subprocess_env, None, "federation.clients_per_round=99,2", *TINY, cwd=tmp_path
    )
    assert result.returncode == 1
    sweep = printed_sweep_folder(result, tmp_path)
    failed, finished = job_dirs(sweep)
    assert "clients_per_round=99" in failed.name
    reason = (failed / FAILURE_FILE).read_text()
    assert "federation.clients_per_round" in reason and "ValueError" in reason
    assert (finished / "summary.json").exists() and not (finished / FAILURE_FILE).exists()
    # The end of the output names the failed job and why.
    assert "1 job(s) of the sweep" in result.stderr
    assert failed.name in result.stderr and "federation.clients_per_round" in result.stderr

    report([sweep], sweep)
    markdown = (sweep / "report.md").read_text()
    assert "## Failed runs" in markdown and failed.name in markdown
    assert "| metagater | 1 |" in markdown  # the finished job, alone in the table


@pytest.mark.sweep
def test_optuna_search_of_3_trials_runs_and_records_its_best_parameters(tmp_path, subprocess_env):
    # Each trial has its own sampled overrides: all the same, they land in the one folder.
    result = multirun(
        subprocess_env,
        None,
        "+search=steps",
        "hydra.sweeper.n_trials=3",
        *TINY,
        cwd=tmp_path,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\x1b[" not in result.stdout + result.stderr  # Optuna's colorlog too, in a pipe
    sweep = printed_sweep_folder(result, tmp_path)
    assert [p.name for p in (tmp_path / "multirun").iterdir()] == [sweep.name]
    trials = job_dirs(sweep)
    assert [t.name for t in trials] == ["0", "1", "2"]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    params = dict(best.best_params)
    assert set(params) == {"adapt.backbone_lr", "adapt.gate_lr", "meta.backbone_lr", "meta.gate_lr"}
    assert 0.02 <= params["adapt.backbone_lr"] <= 2.0 and 1e-4 <= params["meta.gate_lr"] <= 1e-1
    # The best value is the objective (target accuracy) of the trial that used those parameters.
    objectives = {}
    for trial in trials:
        config = OmegaConf.load(trial / "config.yaml")
        key = tuple(OmegaConf.select(config, k) for k in params)
        objectives[key] = json.loads((trial / "summary.json").read_text())["accuracy"]
    assert best.best_value == pytest.approx(max(objectives.values()))
    assert objectives[tuple(params.values())] == pytest.approx(best.best_value)


def stop_process_group(pgid: int) -> None:
    """SIGTERM, then SIGKILL, the processes of one group: only the cluster this test started.

    Ray's GCS server ignores SIGTERM (`ray stop` also ends with SIGKILL after a grace period).
    """
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 15.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@pytest.fixture
def ray_cluster(subprocess_env, free_port):
    """A one-node Ray cluster on 127.0.0.1, as `ray start --head` makes it; stopped by PID.

    It runs in its own session, so every Ray process it starts shares one process group, which
    teardown stops (`ray stop` would stop every Ray instance of the machine). Its files live under
    a temp folder of its own, short because socket paths are limited: a process whose TMPDIR is
    that folder sees the cluster as this machine's current one, as every process would after a
    plain `ray start`, while other Ray users of the machine do not.
    """
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    assert ray, "the ray CLI comes with flwr[simulation]"
    tmpdir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    port = free_port()
    command = [
        ray,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={tmpdir / 'ray'}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
    ]
    start = subprocess.Popen(
        command,
        env=subprocess_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = start.communicate(timeout=120)
        assert start.returncode == 0, output[-3000:]
        (session,) = (tmpdir / "ray").glob("session_2*")
        yield {"address": f"127.0.0.1:{port}", "tmpdir": tmpdir, "session": session, "ray": ray}
    finally:
        if start.poll() is None:
            start.kill()
            start.wait()
        stop_process_group(start.pid)
        shutil.rmtree(tmpdir, ignore_errors=True)


def actor_jobs(session: Path) -> set[str]:
    """The Ray job ids (one per driver that attached) whose ClientApp actors ran in ``session``."""
    return {
        log.name.split("-")[2]
        for log in session.glob("logs/worker-*.out")
        if "actor_name:ClientAppActor" in log.read_text(errors="replace")
    }


@pytest.mark.sweep
def test_simulation_attached_to_a_local_ray_cluster_completes_and_leaves_it_running(
    tmp_path, subprocess_env, ray_cluster
):
    address, session = ray_cluster["address"], ray_cluster["session"]
    sweep = tmp_path / "sweep"
    # Job 0 attaches to the cluster. Job 1 (ray.address=null) starts a Ray of its own, although
    # the cluster is this machine's current one (TMPDIR) and a plain ray.init() would join it.
    tmpdir = str(ray_cluster["tmpdir"])
    result = multirun(subprocess_env, sweep, f"ray.address={address},null", *TINY, TMPDIR=tmpdir)
    assert result.returncode == 0, result.stderr[-3000:]
    for job in job_dirs(sweep):
        assert summary_of(job)["rounds"] == 1
    # Job 0's ClientApps ran as actors in the cluster's workers, job 1's elsewhere.
    assert len(actor_jobs(session)) == 1
    others = [s for s in (ray_cluster["tmpdir"] / "ray").glob("session_2*") if s != session]
    assert len(others) == 1 and actor_jobs(others[0])
    # Detaching did not stop the cluster.
    status = subprocess.run(
        [ray_cluster["ray"], "status", f"--address={address}"],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stdout + status.stderr


def _run_folder(
    root: Path, name: str, seed: int, accuracy: float, flops: float, **settings
) -> Path:
    """A finished run folder as simulate.py writes it (config.yaml and summary.json)."""
    folder = root / name
    folder.mkdir(parents=True)
    cfg = OmegaConf.structured(SimulateConfig)
    cfg.seed = seed
    for key, value in settings.items():
        OmegaConf.update(cfg, key, value)
    OmegaConf.save(cfg, folder / "config.yaml")
    summary = {
        "accuracy": accuracy,
        "accuracy_ci95": 0.05,
        "accuracy_before": 0.2,
        "flops_ratio": flops,
        "macs": 1000 * flops,
        "dense_macs": 1000,
        "nearest_centroid_accuracy": 0.3,
        "wall_seconds": 10.0 + seed,
        "seconds_per_round": 0.5,
        "bytes_per_client_round": 100.0,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_report_merges_settings_a_strategy_does_not_read_and_says_so(tmp_path):
    # -m strategy=metagater,fedmeta gating.target_ratio=0.3,0.7 seed=0,1 (fedmeta: ρ unused)
    for seed in (0, 1):
        for rho in (0.3, 0.7):
            acc = 0.5 + 0.1 * seed + rho / 10
            _run_folder(tmp_path, f"m{seed}{rho}", seed, acc, rho, **{"gating.target_ratio": rho})
            dense = {
                "strategy.name": "fedmeta",
                "gating.target_ratio": rho,
            }
            _run_folder(tmp_path, f"f{seed}{rho}", seed, 0.4 + 0.1 * seed, 1.0, **dense)
    rows = {row.label: row for row in build_rows(find_runs(tmp_path))}
    assert set(rows) == {"fedmeta", "metagater ρ=0.3", "metagater ρ=0.7"}
    fedmeta = rows["fedmeta"]
    assert fedmeta.values["seeds"] == 2 and fedmeta.values["runs"] == 4
    # Duplicates of one seed are averaged first: the spread is over the 2 seeds, not 4 runs.
    assert fedmeta.values["accuracy"] == pytest.approx(0.45)
    assert fedmeta.values["accuracy_std"] == pytest.approx(0.0707107, rel=1e-4)
    assert "gating.target_ratio not used by fedmeta" in fedmeta.note
    assert rows["metagater ρ=0.3"].values["flops_ratio_std"] == pytest.approx(0.0)
    assert rows["metagater ρ=0.3"].note == ""

    report([tmp_path], tmp_path / "out")
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| fedmeta | 2 | 0.4500 ± 0.0707 |" in markdown
    assert "- fedmeta: 4 runs for 2 seed(s)" in markdown
    with (tmp_path / "out" / "report.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert {row["gating.target_ratio"] for row in table} == {"", "0.3", "0.7"}


def test_report_keeps_apart_a_setting_varied_within_a_strategy(tmp_path):
    # meta.backbone_lr differs per strategy (fedavg's SGD) *and* is swept within metagater.
    for lr in (1e-3, 1e-2):
        _run_folder(tmp_path, f"m{lr}", 0, 0.5 + lr, 0.6, **{"meta.backbone_lr": lr})
    fedavg = {
        "strategy.name": "fedavg",
        "meta.first_order": True,
        "meta.optimizer": "sgd",
        "meta.backbone_lr": 1.0,
    }
    _run_folder(tmp_path, "fedavg", 0, 0.3, 1.0, **fedavg)
    labels = sorted(row.label for row in build_rows(find_runs(tmp_path)))
    # rows stay apart; each label names what varies among its own strategy's runs
    assert labels == [
        "fedavg",
        "metagater β_backbone=0.001",
        "metagater β_backbone=0.01",
    ]


def test_write_failure_keeps_the_chain_of_causes_in_one_paragraph(tmp_path):
    try:
        try:
            raise ValueError("config key federation.clients_per_round=99 is invalid")
        except ValueError as inner:
            raise RuntimeError("An error was encountered.\nEnding simulation.") from inner
    except RuntimeError as error:
        path = write_failure(tmp_path, error)
    first = path.read_text().splitlines()[0]
    assert first.startswith("RuntimeError: An error was encountered. Ending simulation.")
    assert "<- caused by ValueError: config key federation.clients_per_round=99" in first
    # a wrapper that repeats its cause's words (simulate.py's Refused) is not said twice
    try:
        try:
            raise ValueError("config key seed=-1: must be >= 0")
        except ValueError as inner:
            raise TypeError(str(inner)) from inner
    except TypeError as error:
        path = write_failure(tmp_path, error)
    assert path.read_text().count("config key seed=-1") == 1


@pytest.mark.sweep
def test_an_interrupted_sweep_run_again_runs_only_what_is_missing(tmp_path, subprocess_env):
    args = ["seed=0,1,2", *TINY]
    whole = tmp_path / "whole"
    assert multirun(subprocess_env, whole, *args).returncode == 0

    sweep = tmp_path / "sweep"
    process = subprocess.Popen(
        [sys.executable, "simulate.py", "-m", *args, f"hydra.sweep.dir={sweep}"],
        cwd=ROOT,
        env=subprocess_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not list(sweep.glob("0_*/summary.json")) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # as abrupt as a lost machine
        process.wait(timeout=60)
    assert len(list(sweep.glob("*/summary.json"))) < 3

    again = multirun(subprocess_env, sweep, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert log.count("not run again") == 1  # job 0 is complete; jobs 1 and 2 trained
    assert f"sweep folder: {sweep}" in log

    def rows(folder: Path) -> dict[str, tuple]:
        return {
            row.label: (row.values["accuracy"], row.values["flops_ratio"], len(row.runs))
            for row in build_rows(find_runs(folder))
        }

    assert rows(sweep) == rows(whole)


@pytest.mark.sweep
def test_one_ctrl_c_stops_the_whole_sweep_in_one_line_and_the_same_command_continues_it(
    tmp_path, subprocess_env
):
    args = ["seed=0,1,2", *TINY, "federation.rounds=60"]
    # Ctrl-C in a terminal signals its whole process group: the driver and Ray's processes.
    code, out, err = interrupt(
        [sys.executable, str(ROOT / "simulate.py"), "-m", *args],
        tmp_path,
        subprocess_env,
        ready=lambda: bool(list(tmp_path.glob("multirun/*/0_*/checkpoint.pt"))),
    )
    assert code == 130, err[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("Stopped: ")]
    assert line.endswith("python simulate.py " + shlex.join(["-m", *args])), line
    (sweep,) = (tmp_path / "multirun").iterdir()
    # Only job 0 ran, and it stopped between rounds: its checkpoint is whole, nothing else began.
    (job,) = job_dirs(sweep)
    assert job.name.startswith("0_") and not (job / "summary.json").exists()
    stopped_at = torch.load(job / "checkpoint.pt", weights_only=True)["round"]
    assert 1 <= stopped_at < 60

    # The line's command: job 0 resumes from its checkpoint, jobs 1 and 2 run.
    again = multirun(subprocess_env, None, *args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming the job in" in again.stdout + again.stderr
    jobs = job_dirs(sweep)
    assert len(jobs) == 3 and all((j / "summary.json").exists() for j in jobs)
    history = json.loads((jobs[0] / "history.json").read_text())
    assert [h["round"] for h in history] == list(range(1, 61))


@pytest.mark.sweep
def test_ctrl_c_after_a_jobs_last_round_still_stops_the_sweep_and_a_second_one_ends_it_at_once(
    tmp_path, subprocess_env
):
    args = ["seed=0,1", *TINY, "federation.rounds=30"]
    command = [sys.executable, str(ROOT / "simulate.py"), "-m", *args]
    # Job 0's results are written and Flower is tearing its federation down: the job is
    # complete, but the Ctrl-C is the user's to stop the sweep, not to end this job alone.
    code, out, err = interrupt(
        command,
        tmp_path,
        subprocess_env,
        ready=lambda: bool(list(tmp_path.glob("multirun/*/0_*/summary.json"))),
    )
    assert code == 130 and "Traceback" not in out + err, err[-3000:]
    assert [x for x in err.splitlines() if x.startswith("Stopped")], err[-3000:]
    (sweep,) = (tmp_path / "multirun").iterdir()
    (job,) = job_dirs(sweep)  # job 1 never started
    assert (job / "summary.json").exists()

    # Continued, then two Ctrl-C 0.3 s apart while job 1 trains: the second one ends the
    # process at once instead of waiting on Flower's and Ray's threads, which could hang.
    code, out, err = interrupt(
        command,
        tmp_path,
        subprocess_env,
        ready=lambda: bool(list(sweep.glob("1_*/checkpoint.pt"))),
        again_after=0.3,
    )
    assert code == 130 and "Traceback" not in out + err, err[-3000:]
    assert [x for x in err.splitlines() if x.startswith("Stopped")], err[-3000:]
    (resumable,) = sweep.glob("1_*/checkpoint.pt")
    assert 1 <= torch.load(resumable, weights_only=True)["round"] < 30

    again = multirun(subprocess_env, None, *args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all((j / "summary.json").exists() for j in job_dirs(sweep)) and len(job_dirs(sweep)) == 2


def test_sweep_folder_names_are_stable_and_safe_for_flowers_manifest():
    overrides = ["seed=0,1", "strategy=metagater,fedmeta"]
    assert sweep_name(overrides) == sweep_name(overrides[::-1])
    assert sweep_name(overrides) == "seed=0+1_strategy=metagater+fedmeta"
    assert sweep_name(["dataset.path=/data/x.npz"]) == "dataset.path=-data-x.npz"
    assert folder_name("+x=[1, 2]_y='a b'") == "+x=-1+-2-_y=-a-b-"
    long = sweep_name([f"k{i}=" + "v" * 20 for i in range(10)])
    assert len(long) <= 111 and long != sweep_name([f"k{i}=" + "v" * 21 for i in range(10)])
    config = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "config.yaml"))
    assert config["hydra"]["sweep"]["dir"] == "multirun/${sweep_name:${hydra.overrides.task}}"


@pytest.mark.parametrize(
    "folder", ["multirun/seed=0+1_a=b", "/tmp/it's here", "C:\\\\x\\'y\\", "a,b c=d"]
)
def test_the_pinned_sweep_folder_reaches_every_job_unchanged(folder):
    # SweepFolder hands the folder to each job as an override: Hydra must parse it back intact.
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (override,) = OverridesParser.create().parse_overrides(
        [f"hydra.sweep.dir={hydra_quoted(folder)}"]
    )
    assert override.value() == folder and not override.is_sweep_override()
