"""Deployment as docs/deploy.md describes it: a SuperLink with TLS and node authentication, real
SuperNodes that each load their own site data, `scripts/deploy/*` for certificates, keys,
registration and runs, on 127.0.0.1 with free ports.

Every process a test starts (SuperLink, SuperNodes, the run script) goes through the shared
``processes`` fixture (tests/conftest.py), which stops it by PID together with everything it
spawned (SuperExec, ServerApp and ClientApp processes), also when the test fails. The first
tests check the site-data path of ``gating.federated.nodes`` without any process.
"""

from __future__ import annotations

import contextlib
import json
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from conf.schema import default_config, settings_from_flat
from gating.data import DatasetError, load_dataset
from gating.federated.nodes import data_site_id, node_task, site_format
from server.checkpoint import CHECKPOINT_NAME, load_checkpoint
from tests.support import ProcessTree, summary_of

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPTS = ROOT / "scripts" / "deploy"
CONNECTION = "deploy-test"
RESULT_FILES = (
    "config.yaml",
    "history.json",
    "summary.json",
    CHECKPOINT_NAME,
    "accuracy.png",
    "flops_ratio.png",
)
# One training and one target site, two tiny rounds, an evaluation each round.
TWO_SITES = (
    "federation.train_nodes=1 federation.target_nodes=1 federation.clients_per_round=1 "
    "federation.rounds=2 federation.eval_every=1 federation.timeout=60"
)


# ------------------------------------------------------------------ site data (no processes)


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three sites' own .npz files with disjoint digits images, written by the documented script:
    two training sites and one target site."""
    folder = tmp_path_factory.mktemp("sites")
    script = SCRIPTS / "demo_sites.py"
    subprocess.run([sys.executable, script, folder, "--train-sites", "2"], check=True)
    return {name: folder / f"{name}.npz" for name in ("train-1", "train-2", "target-1")}


def test_site_task_loads_the_sites_own_data(sites):
    cfg = default_config()
    task = node_task(cfg, {"data-path": str(sites["train-1"]), "role": "train"})
    again = node_task(cfg, {"data-path": str(sites["train-1"]), "role": "train"})
    other = node_task(cfg, {"data-path": str(sites["train-2"]), "role": "train"})
    target = node_task(
        cfg, {"data-path": str(sites["target-1"]), "role": "target", "partition-id": 3}
    )
    assert task.role == "train" and target.role == "target"
    assert task.images.shape[1:] == (1, 8, 8)
    # No partition-id: a stable id from the data, distinct between sites.
    assert (
        task.partition_id
        == again.partition_id
        == data_site_id(load_dataset("npz", sites["train-1"]))
    )
    assert task.partition_id != other.partition_id
    assert target.partition_id == 3
    assert len(target.labels) == cfg.task.ways * (cfg.task.shots + cfg.task.queries)
    # The site's own samples, not a split of the run's dataset.
    site = load_dataset("npz", sites["train-1"])
    assert np.array_equal(task.images, site.images[task.sample_ids])


def test_site_task_errors_name_the_node_config(sites, tmp_path):
    cfg = default_config()
    missing = tmp_path / "missing.npz"
    with pytest.raises(DatasetError, match=r'data-path=".*missing\.npz" does not exist'):
        node_task(cfg, {"data-path": str(missing), "role": "train"})
    with pytest.raises(DatasetError, match='role="train" or role="target"'):
        node_task(cfg, {"data-path": str(sites["target-1"])})
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match=r"site data \(node-config data-path=.*cannot read npz"):
        node_task(cfg, {"data-path": str(broken), "role": "target"})
    with pytest.raises(DatasetError, match="partition-id"):
        node_task(cfg, {"data-path": str(sites["target-1"]), "role": "target", "partition-id": "a"})
    with pytest.raises(ValueError, match="data-path"):
        node_task(cfg, {})


def test_site_format(tmp_path, sites):
    digits_run = default_config()
    assert site_format(digits_run, str(sites["target-1"])) == "npz"
    idx = tmp_path / "idx"
    idx.mkdir()
    (idx / "train-images-idx3-ubyte.gz").write_bytes(b"")
    assert site_format(digits_run, str(idx)) == "mnist"
    assert site_format(digits_run, str(sites["target-1"].parent)) == "omniglot"
    # A run on another dataset names the sites' format.
    fashion = settings_from_flat({"dataset.name": "fashion_mnist"})
    assert site_format(fashion, str(idx)) == "fashion_mnist"


# ------------------------------------------------------------------ a TLS federation


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A development CA, a server certificate for 127.0.0.1 and node keys, made by the scripts."""
    folder = tmp_path_factory.mktemp("pki")
    subprocess.run([SCRIPTS / "make_certs.sh", "127.0.0.1", folder / "certs"], check=True)
    for name in ("site-a", "site-b", "site-c", "rogue"):
        subprocess.run([SCRIPTS / "make_node_key.sh", name, folder / "keys"], check=True)
    san = subprocess.run(
        ["openssl", "x509", "-in", folder / "certs" / "server.pem", "-noout", "-ext",
         "subjectAltName"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "IP Address:127.0.0.1" in san
    subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            folder / "certs" / "ca.crt",
            folder / "certs" / "server.pem",
        ],
        check=True,
        capture_output=True,
    )
    return folder


@dataclass
class Federation:
    """A running SuperLink (TLS, node authentication) and the means to add SuperNodes to it."""

    procs: ProcessTree
    pki: Path
    home: Path
    env: dict[str, str]
    fleet: str
    free_port: Callable[[], int]
    # the command line that runs a process of this name where it belongs (multi-host tests:
    # in the network namespace of its host); as is by default
    place: Callable[[str, list[str]], list[str]] = lambda name, args: args

    def log(self, name: str) -> str:
        return self.procs.logs[name].read_text(errors="replace")

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.command([str(BIN / "flwr"), *args], timeout=timeout)

    def command(self, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(
                args, cwd=self.home, env=self.env, capture_output=True, text=True, timeout=timeout
            )
        finally:
            self.procs.track()

    def register(self, *names: str) -> None:
        keys = [str(self.pki / "keys" / f"{n}.pub") for n in names]
        result = self.command([str(SCRIPTS / "register_node.sh"), CONNECTION, *keys])
        assert result.returncode == 0, result.stdout + result.stderr

    def supernode(
        self, name: str, node_config: str, *, key: str | None = None, tls: bool = True
    ) -> subprocess.Popen:
        """A SuperNode as docs/deploy.md starts it, with its own FLWR_HOME and runtime port."""
        home = self.home / name
        home.mkdir()
        args = [
            str(BIN / "flower-supernode"),
            "--superlink",
            self.fleet,
            "--port",
            str(self.free_port()),
            "--node-config",
            node_config,
        ]
        if tls:
            args += ["--root-certificates", str(self.pki / "certs" / "ca.crt")]
        else:
            args += ["--insecure", "--grpc-rere", "--max-retries", "2"]
        if key is not None:
            args += ["--auth-supernode-private-key", str(self.pki / "keys" / key)]
        env = {**self.env, "FLWR_HOME": str(home)}
        return self.procs.start(name, self.place(name, args), env, self.home)

    def site(self, name: str, data: Path, role: str) -> subprocess.Popen:
        return self.supernode(name, f'data-path="{data}" role="{role}"', key=name)

    def wait_online(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            listed = self.flwr("supernode", "list", CONNECTION, "--format", "json")
            nodes = json.loads(listed.stdout).get("nodes", []) if listed.returncode == 0 else []
            if sum(n["status"] == "online" for n in nodes) >= count:
                return
            for name, proc in self.procs.started.items():
                assert proc.poll() is None, f"{name} exited:\n{self.log(name)[-3000:]}"
            assert time.monotonic() < deadline, f"nodes not online: {nodes}"
            time.sleep(1)

    def run_args(self, overrides: str) -> list[str]:
        return [str(SCRIPTS / "run.sh"), CONNECTION, "--run-config", overrides]

    def run_past_round_1(self, name: str, overrides: str, out: Path, cwd: Path):
        """Start ``run.sh`` (log: cwd/NAME.log) for a run writing into ``out``; return it once
        its first round is in history.jsonl (appended as rounds end)."""
        run = self.procs.start(name, self.run_args(overrides), self.env, cwd)
        lines, log = out / "history.jsonl", cwd / f"{name}.log"
        deadline = time.monotonic() + 240
        while not (lines.exists() and lines.read_text().endswith("\n")):
            assert run.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            self.procs.track()
            time.sleep(0.2)
        return run


@pytest.fixture
def federation(processes, pki, tmp_path, subprocess_env, free_port) -> Federation:
    return start_federation(processes, pki, tmp_path, subprocess_env, free_port)


def start_federation(
    processes: ProcessTree,
    pki: Path,
    tmp_path: Path,
    subprocess_env: dict[str, str],
    free_port: Callable[[], int],
    host: str = "127.0.0.1",
    place: Callable[[str, list[str]], list[str]] = lambda name, args: args,
) -> Federation:
    """A SuperLink with TLS and node authentication at ``host`` (its certificate's address),
    started where ``place`` puts the process named "superlink", and the CLI's connection to it."""
    home = tmp_path / "superlink"
    home.mkdir()
    fleet, control = free_port(), free_port()
    env = {
        **subprocess_env,  # this venv's bin on PATH: flwr for the scripts
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    certs = pki / "certs"
    args = [
        str(BIN / "flower-superlink"),
        "--fleet-api-type",
        "grpc-rere",
        "--fleet-api-address",
        f"{host}:{fleet}",
        "--host",
        host,
        "--port",
        str(control),
        "--disable-runtime-dependency-installation",
        "--ssl-ca-certfile",
        str(certs / "ca.crt"),
        "--ssl-certfile",
        str(certs / "server.pem"),
        "--ssl-keyfile",
        str(certs / "server.key"),
        "--enable-supernode-auth",
    ]
    link = processes.start("superlink", place("superlink", args), env, home)
    fed = Federation(processes, pki, home, env, f"{host}:{fleet}", free_port, place)
    trust = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    deadline = time.monotonic() + 60
    while True:
        assert link.poll() is None, f"SuperLink exited:\n{fed.log('superlink')[-3000:]}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"https://{host}:{control}/health", verify=trust, timeout=1).is_success:
                break
        assert time.monotonic() < deadline, f"SuperLink not up:\n{fed.log('superlink')[-3000:]}"
        time.sleep(0.3)
    processes.track()
    result = fed.command(
        [str(SCRIPTS / "add_connection.sh"), CONNECTION, f"{host}:{control}", str(certs / "ca.crt")]
    )
    assert result.returncode == 0, result.stderr
    return fed


def _run_id(output: str) -> str:
    match = re.search(r"Successfully started run (\d+)", output)
    assert match, output[-3000:]
    return match.group(1)


# ------------------------------------------------------------------ the deployment tests


@pytest.mark.deploy
def test_tls_authenticated_two_site_run(federation, sites, tmp_path):
    # Two registered sites and a third whose data-path is missing: the server leaves it out.
    federation.register("site-a", "site-b", "site-c")
    federation.site("site-a", sites["train-1"], "train")
    federation.site("site-b", sites["target-1"], "target")
    federation.site("site-c", tmp_path / "missing.npz", "train")
    federation.wait_online(3)

    started = time.monotonic()
    result = federation.command(federation.run_args(TWO_SITES), timeout=300)
    wall = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "finished:completed" in output
    left_out = re.search(r".*left out: .*missing\.npz\" does not exist.*", output)
    assert left_out, output[-4000:]

    # Results on the SuperLink machine, in its $FLWR_HOME/outputs/<run id>, as run.sh says.
    out = federation.home / "outputs" / _run_id(output)
    assert f"results on the SuperLink in {out}" in output
    for name in RESULT_FILES:
        assert (out / name).stat().st_size > 0, name
    history = json.loads((out / "history.json").read_text())
    summary = summary_of(out)
    assert [h["round"] for h in history] == [1, 2]
    assert all(h["replies"] == 1 and "accuracy" in h for h in history)
    assert summary["target_tasks"] == 1
    assert load_checkpoint(out / CHECKPOINT_NAME)["round"] == 2
    rounds = ", ".join(f"{h['seconds']:.1f}" for h in history)
    print(f"\nTLS two-site run: wall {wall:.1f} s (run.sh, start to status), rounds {rounds} s")
    print(f"bad site: {left_out.group(0)}")


@pytest.mark.deploy
def test_unregistered_and_insecure_supernodes_are_refused(federation):
    federation.register("site-a")
    config = 'data-path="/nonexistent.npz" role="train"'
    refused = {
        "rogue": federation.supernode("rogue", config, key="rogue"),  # TLS, unregistered key
        "no-key": federation.supernode("no-key", config),  # TLS, no key at all
        "no-tls": federation.supernode("no-tls", config, tls=False),  # plain gRPC
    }
    for name, proc in refused.items():
        assert proc.wait(timeout=90) != 0, name
        assert "Exit Code: 305" in federation.log(name), federation.log(name)[-2000:]
    assert "must be registered" in federation.log("no-key")
    listed = federation.flwr("supernode", "list", CONNECTION, "--format", "json")
    assert not [n for n in json.loads(listed.stdout)["nodes"] if n["status"] == "online"]


@pytest.mark.deploy
def test_supernode_killed_during_run(federation, sites, tmp_path):
    federation.register("site-a", "site-b", "site-c")
    federation.site("site-a", sites["train-1"], "train")
    federation.site("site-b", sites["train-2"], "train")
    federation.site("site-c", sites["target-1"], "target")
    federation.wait_online(3)

    # Both training sites every round; one usable reply is enough; a silent node costs a round
    # federation.timeout seconds.
    out = tmp_path / "run-a"
    overrides = (
        "federation.train_nodes=2 federation.target_nodes=1 federation.clients_per_round=2 "
        "federation.min_train_replies=1 federation.rounds=2 federation.eval_every=2 "
        f"federation.timeout=25 output.dir='{out}'"
    )
    started = time.monotonic()
    run = federation.run_past_round_1("run-a", overrides, out, tmp_path)
    first = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["round"] for h in first] == [1] and first[0]["replies"] == 2
    federation.procs.kill("site-b")  # SIGKILL: the node and its ClientApp, mid-run
    killed_at = time.monotonic() - started

    assert run.wait(timeout=300) == 0, (tmp_path / "run-a.log").read_text()[-4000:]
    history = json.loads((out / "history.json").read_text())
    assert history[0] == first[0]  # what was written before the crash is kept as it was
    assert [h["round"] for h in history] == [1, 2] and history[1]["replies"] == 1
    assert (out / "summary.json").stat().st_size > 0
    assert load_checkpoint(out / CHECKPOINT_NAME)["round"] == 2
    print(
        f"\nkilled a site at {killed_at:.1f} s; run done at {time.monotonic() - started:.1f} s, "
        f"rounds {', '.join(str(round(h['seconds'], 1)) for h in history)} s"
    )

    # With one training site left, a run that needs two fails, and run.sh says so (exit 1).
    overrides = (
        "federation.train_nodes=2 federation.target_nodes=1 federation.clients_per_round=2 "
        "federation.rounds=2 federation.timeout=20"
    )
    started = time.monotonic()
    result = federation.command(federation.run_args(overrides), timeout=240)
    output = result.stdout + result.stderr
    print(f"failing run: {time.monotonic() - started:.1f} s")
    assert result.returncode == 1, output[-4000:]
    assert "finished:failed" in output and "training nodes answered" in output, output[-4000:]
