"""`flwr run .` as a user runs it (docs/flwr-run.md), against a SuperLink this test starts.

The SuperLink that `flwr run . local` would start by itself keeps running after the command and
always takes port 39091; here one is started explicitly on a free port, with its own FLWR_HOME,
and the shared ``processes`` fixture (tests/conftest.py) stops it and everything it spawned by
PID afterwards.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from flwr.common.config import flatten_dict

from conf.choices import StrategyName
from conf.schema import FLWR_RUN_DEMO, default_config, settings_from_flat, to_flat
from server.app import resolve_output_dir
from tests.support import ProcessTree

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONNECTION = "metagater-test"
# The pyproject defaults are a 4 + 2 node federation.
FEDERATION = "num-supernodes=6 client-resources-num-cpus=1"


def app_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_run_config_lists_every_schema_key_and_is_valid():
    # Flower rejects a --run-config key that pyproject.toml does not list: list them all.
    config = flatten_dict(app_config())
    assert sorted(config) == sorted(to_flat(default_config()))
    # one source of defaults: the schema's, but for the demo federation named in FLWR_RUN_DEMO
    assert config == {**to_flat(default_config()), **FLWR_RUN_DEMO}
    cfg = settings_from_flat(config)
    assert cfg.federation.train_nodes + cfg.federation.target_nodes == 6  # == FEDERATION
    assert "{run_id}" in cfg.output.dir


def test_pyproject_has_no_federations_table():
    # `flwr run` would move it to $FLWR_HOME/config.toml and comment it out in pyproject.toml.
    assert "federations" not in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]


#: What runs and sweeps leave in a project, with the commas of a sweep over lists in the names.
RESULT_FOLDERS = (
    "multirun/seed=0,1_strategy=metagater,fedmeta/0_seed=0,strategy=metagater",
    "sweeps/rho,old/1_gating.target_ratio=0.3",
    "outputs/2026-12-07/10-00-00",
    "my results, 2026/run",
    # docs/edge.md's node folder holds a virtual environment: deeper than Flower allows (10)
    "edge/venv/lib/python3.11/site-packages/numpy-2.4.6.dist-info/licenses/numpy/random/src/pcg",
)


def app_with_results(tmp_path: Path) -> Path:
    """A copy of the project holding run and sweep folders such as users leave behind."""
    app = tmp_path / "app"
    shutil.copytree(
        ROOT,
        app,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", ".flwr_home", "__pycache__", "outputs", "multirun", "docs", "*.png"
        ),
    )
    for folder in RESULT_FOLDERS:
        run = app / folder
        run.mkdir(parents=True)
        (run / "config.yaml").write_text("seed: 0\n")
        (run / "summary.json").write_text('{"accuracy": 0.5}\n')
        (run / "history.jsonl").write_text('{"round": 1}\n')
        (run / "notes.md").write_text("a run\n")
    return app


def test_the_app_bundle_holds_the_apps_code_and_no_results(tmp_path):
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.install import install_from_fab

    fab = build_fab_from_disk(app_with_results(tmp_path))
    with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
        names = bundle.namelist()
    packages = {name.split("/")[0] for name in names}
    assert packages == {"client", "conf", "gating", "server", "pyproject.toml", ".info"}
    assert "server/app.py" in names and "client/app.py" in names
    # the strategies' YAMLs: their names are the valid strategy.name values on every node
    assert {f"conf/strategy/{name.value}.yaml" for name in StrategyName} <= set(names)
    # Flower installs it: its manifest of "path,sha256,bits" lines parses and every hash matches.
    installed = install_from_fab(fab, tmp_path / "apps", skip_prompt=True)
    assert (installed / "gating" / "model" / "convnet.py").exists()


def test_output_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    assert resolve_output_dir("outputs/{run_id}", 42) == tmp_path / "home" / "outputs" / "42"
    assert resolve_output_dir(str(tmp_path / "x-{run_id}"), 7) == tmp_path / "x-7"
    assert resolve_output_dir("fixed", 7, base=tmp_path) == tmp_path / "fixed"
    with pytest.raises(ValueError, match=r"output\.dir"):
        resolve_output_dir(" ", 7)


@dataclass
class SuperLink:
    """A SuperLink started through the ``processes`` fixture, which stops it and everything it
    spawned (SuperExec, ServerApp, the Ray simulation) when the test ends."""

    home: Path
    env: dict[str, str]
    log: Path
    processes: ProcessTree

    def flwr(self, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(
                [str(BIN / "flwr"), *args],
                cwd=self.home,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        finally:
            self.processes.track()  # what the SuperLink has spawned for the command

    def run(self, *args: str, app: Path = ROOT) -> subprocess.CompletedProcess:
        return self.flwr("run", str(app), CONNECTION, "--federation-config", FEDERATION, *args)

    def status(self, run_id: str) -> dict:
        result = self.flwr("ls", "--run-id", run_id, CONNECTION, "--format", "json", timeout=30)
        (run,) = json.loads(result.stdout)["runs"]
        return run

    def run_ids(self) -> set[str]:
        result = self.flwr("ls", CONNECTION, "--format", "json", timeout=30)
        return {run["run-id"] for run in json.loads(result.stdout)["runs"]}


@pytest.fixture
def superlink(tmp_path, subprocess_env, free_port, processes) -> SuperLink:
    home = tmp_path / "flwr_home"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    # subprocess_env puts this venv's bin first on PATH: the SuperLink starts flower-superexec
    # & co. by name, this venv's even when it is not active.
    env = {
        **subprocess_env,
        "FLWR_HOME": str(home),
        # Otherwise every run `uv sync`s the app's dependencies into a fresh environment.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    log = tmp_path / "superlink.log"
    proc = processes.start(
        "superlink",
        [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--simulation",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env,
        home,
        log=log,
    )
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, f"SuperLink exited:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).is_success:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"SuperLink not up:\n{log.read_text()[-3000:]}"
        time.sleep(0.3)
    return SuperLink(home, env, log, processes)


def _run_id(result: subprocess.CompletedProcess) -> str:
    match = re.search(r"Successfully started run (\d+)", result.stdout + result.stderr)
    assert match, result.stdout[-3000:] + result.stderr[-3000:]
    return match.group(1)


@pytest.mark.ray
def test_flwr_run(superlink, tmp_path):
    # The documented command, with a run-config override; results land in $FLWR_HOME/outputs/<id>.
    # The project holds earlier runs' and sweeps' folders (commas in their names): no matter.
    overrides = "federation.rounds=2 federation.eval_every=1"
    app = app_with_results(tmp_path)
    result = superlink.run("--run-config", overrides, "--stream", app=app)
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = _run_id(result)
    run = superlink.status(run_id)
    assert run["status"] == "finished:completed", run
    out = superlink.home / "outputs" / run_id
    for name in ("config.yaml", "history.json", "summary.json", "accuracy.png", "flops_ratio.png"):
        assert (out / name).stat().st_size > 0, name
    history = json.loads((out / "history.json").read_text())
    assert [h["round"] for h in history] == [1, 2]
    assert "accuracy" in json.loads((out / "summary.json").read_text())

    # A mistyped key: the SuperLink refuses to start the run (Flower checks override keys
    # against pyproject.toml); the CLI says only "Invalid run configuration", the SuperLink's
    # log names the key, and no run is created.
    before = superlink.run_ids()
    result = superlink.run("--run-config", "federation.roundz=2")
    assert result.returncode != 0
    assert "Invalid run configuration" in result.stdout + result.stderr
    assert "federation.roundz" in superlink.log.read_text()
    assert superlink.run_ids() == before

    # A known key with a bad value reaches the ServerApp: the run fails naming the key.
    result = superlink.run("--run-config", "federation.rounds='three'", "--stream")
    run = superlink.status(_run_id(result))
    assert run["status"] == "finished:failed", run
    assert "federation.rounds" in run["status-details"]
