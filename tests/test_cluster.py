"""A simulation whose ClientApp actors run on two Ray nodes: a head and a second node, each with
one CPU of its own, on this machine (``ray.cluster_utils.Cluster``, as Ray's own tests build
multi-node clusters), joined by ``ray.address`` as docs/cluster.md describes for real machines."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.support import ROOT, run_simulate, summary_of


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


@pytest.mark.ray
def test_a_ray_node_lost_mid_run_fails_in_one_line_and_the_run_resumes_without_a_lost_round(
    subprocess_env, tmp_path
):
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        run = tmp_path / "run"
        overrides = [
            "federation=tiny",
            "federation.rounds=200",
            "federation.eval_every=100",
            f"ray.address={cluster.address}",
            "output.plots=false",
            f"hydra.run.dir={run}",
        ]
        log = tmp_path / "first.log"
        with log.open("w") as out:
            first = subprocess.Popen(
                [sys.executable, "simulate.py", *overrides],
                cwd=ROOT,
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
        cluster.remove_node(worker, allow_graceful=False)  # the machine of one Ray node dies
        assert first.wait(timeout=300) == 1, log.read_text()[-3000:]
        output = log.read_text()
        # both replies of a round are needed (the default): the round fails, and the run ends
        # on one line that says why, what is kept and how to go on (Ray logs the lost actor's
        # traceback before it)
        error = output.strip().splitlines()[-1]
        assert error.startswith("Error: round"), output[-3000:]
        assert "usable replies" in error and "the last completed round is checkpointed" in error
        assert f"resume=true hydra.run.dir={run}" in error
        before = [json.loads(line) for line in lines.read_text().splitlines()]

        # once Ray has marked the lost node dead (`ray status` no longer lists it), the head
        # node alone runs the rest, from the last completed round; a resume started before
        # that would wait for an actor on the dead node's CPU
        import ray

        ray.init(address=cluster.address, log_to_driver=False)
        try:
            deadline = time.monotonic() + 120
            while sum(node["Alive"] for node in ray.nodes()) > 1:
                assert time.monotonic() < deadline, ray.nodes()
                time.sleep(0.5)
        finally:
            ray.shutdown()
        resumed = run_simulate(subprocess_env, *overrides, "resume=true", timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        history = json.loads((run / "history.json").read_text())
        assert [h["round"] for h in history] == list(range(1, 201))
        for kept in before:  # every round completed before the loss, as it was
            assert history[kept["round"] - 1] == kept
    finally:
        cluster.shutdown()
