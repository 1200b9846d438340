"""A simulation whose ClientApp actors run on two Ray nodes, joined by ``ray.address``: a head and
a second node with one CPU each in this process's machine (``ray.cluster_utils.Cluster``, as
Ray's own tests build multi-node clusters), and docs/cluster.md followed as written on two
machines made of network namespaces, one of which dies mid-run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, network_hosts, run_simulate, summary_of


@pytest.fixture
def two_ray_nodes() -> Iterator[tuple[str, list[str]]]:
    """The cluster's address and its two node ids; stopped with everything it started."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster.address, [node.node_id for node in cluster.list_all_nodes()]
    finally:
        cluster.shutdown()


@pytest.mark.ray
def test_clientapps_run_on_both_ray_nodes_and_the_summary_counts_them(
    two_ray_nodes, subprocess_env, tmp_path
):
    address, node_ids = two_ray_nodes
    run = tmp_path / "run"
    # one CPU per ClientApp actor: the two actors of a round cannot both fit on one node
    result = run_simulate(
        subprocess_env,
        "federation=tiny",
        f"ray.address={address}",
        "ray.client_cpus=1",
        "output.plots=false",
        f"hydra.run.dir={run}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summary_of(run)
    served = summary["replies_per_ray_node"]
    assert set(served) == set(node_ids), (served, node_ids)
    history = json.loads((run / "history.json").read_text())
    evaluations = sum("accuracy" in h for h in history)  # rounds 2 and 3 (final), all targets
    expected = sum(h["replies"] for h in history) + evaluations * summary["target_tasks"]
    assert sum(served.values()) == expected
    print(f"\nreplies per Ray node: {served}")
    assert "ClientApp replies per Ray node" in result.stdout + result.stderr


# ------------------------------------------------------------------ docs/cluster.md, two machines

GUIDE = ROOT / "docs" / "cluster.md"
GUIDE_ADDRESSES = {"head": "10.0.0.1", "worker": "10.0.0.2"}  # the guide's example machines


def guide_commands(heading: str) -> list[tuple[str, str]]:
    """The commands of the first bash block under ``heading`` in docs/cluster.md, each with the
    machine its comment names: ``worker`` for "each other machine", else ``head``."""
    text = GUIDE.read_text()
    block = text[text.index(heading) :].split("```bash\n", 1)[1].split("```", 1)[0]
    commands, machine = [], "head"
    for line in block.splitlines():
        if line.startswith("#"):
            machine = "worker" if "other machine" in line else "head"
        elif line.strip():
            commands.append((machine, line.split("  #")[0].strip()))
    return commands


def cluster_cpu_total(status: str) -> float:
    """The CPUs ``ray status`` counts in the cluster ("Total Usage: used/total CPU"); 0 while
    it says "No cluster status" (the first seconds after the head starts)."""
    found = re.search(r"Total Usage:\s*[\d.]+/([\d.]+) CPU", status)
    return float(found[1]) if found else 0.0


@pytest.mark.ray
def test_the_cluster_guide_works_verbatim_on_two_machines_and_after_one_dies(
    subprocess_env, tmp_path
):
    """Steps 2 and 3 and "When a Ray node dies" of docs/cluster.md, as written, on two hosts
    with their own network, temporary directory and /dev/shm (the guide's addresses swapped
    for theirs). The hosts, with every process on them, go before their directories."""
    with (
        tempfile.TemporaryDirectory(prefix="mg") as private,
        network_hosts({"head": 1, "worker": 2}, "10.78.0") as hosts,
    ):
        private = Path(private)

        def here(command: str) -> str:
            for name, address in GUIDE_ADDRESSES.items():
                command = command.replace(address, hosts.address(name))
            return command

        def on(machine: str, command: str, **kwargs) -> subprocess.CompletedProcess:
            return subprocess.run(
                hosts.on_machine(machine, private, here(command)),
                env=subprocess_env,
                capture_output=True,
                text=True,
                **kwargs,
            )

        *start, (_, status_command) = guide_commands("### 2. Start the cluster")
        for machine, command in start:
            done = on(machine, command, timeout=120)
            assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
        per_machine = os.cpu_count()

        def cluster_cpus() -> tuple[str, float]:
            """``ray status`` on the head, and the CPUs it counts in the cluster."""
            status = on("head", status_command, timeout=60).stdout
            return status, cluster_cpu_total(status)

        deadline = time.monotonic() + 60  # the second node's first report takes a few seconds
        while (found := cluster_cpus())[1] != 2 * per_machine:
            assert time.monotonic() < deadline, found[0]
            time.sleep(1)
        status = found[0]
        ray_nodes = set(re.findall(r"node_([0-9a-f]{56})", status.split("Pending", 1)[0]))
        assert len(ray_nodes) == 2, status

        ((_, run_command),) = guide_commands("### 3. Run")
        small = (
            "federation.train_nodes=4 federation.target_nodes=2 federation.clients_per_round=2 "
            "federation.eval_nodes=2 output.plots=false"
        )
        run = tmp_path / "run"
        done = on(
            "head",
            f"{run_command} {small} federation.rounds=3 federation.eval_every=3 "
            f"hydra.run.dir={run}",
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        served = summary_of(run)["replies_per_ray_node"]
        assert set(served) == ray_nodes, (served, ray_nodes)  # both machines ran ClientApps
        history = json.loads((run / "history.json").read_text())
        assert sum(served.values()) == sum(h["replies"] for h in history) + 2  # + 2 targets

        # The worker machine dies in round 4 of 12: the run stops with the line that says how
        # to go on; once `ray status` no longer counts its CPUs, that line's command, run on
        # the head, finishes the run with every completed round as it was.
        run = tmp_path / "lost"
        log = tmp_path / "lost.log"
        command = here(
            f"{run_command} {small} federation.rounds=12 federation.eval_every=12 "
            f"hydra.run.dir={run}"
        )
        with log.open("w") as out:
            first = subprocess.Popen(
                hosts.on_machine("head", private, command),
                env=subprocess_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        lines = run / "history.jsonl"
        deadline = time.monotonic() + 300
        while not (lines.exists() and len(lines.read_text().splitlines()) >= 3):
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        hosts.kill_all("worker")
        died = time.monotonic()
        assert first.wait(timeout=300) == 1, log.read_text()[-3000:]
        # both replies of a round are needed (the default): the run ends on one line that says
        # why, what is kept and how to go on
        error = log.read_text().strip().splitlines()[-1]
        assert error.startswith("Error: round"), error
        assert "usable replies" in error and "the last completed round is checkpointed" in error
        assert f"resume=true hydra.run.dir={run}" in error and "continue with " in error
        before = [json.loads(line) for line in lines.read_text().splitlines()]

        while cluster_cpus()[1] != per_machine:
            assert time.monotonic() < died + 180, "Ray did not mark the dead machine's node dead"
            time.sleep(1)
        noticed = time.monotonic() - died
        resumed = on("head", error.split("continue with ", 1)[1], timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        history = json.loads((run / "history.json").read_text())
        assert [h["round"] for h in history] == list(range(1, 13))
        for kept in before:
            assert history[kept["round"] - 1] == kept
        print(f"\nRay counted the dead machine's CPUs out {noticed:.0f} s after it died")
