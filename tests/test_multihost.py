"""Sites on separate hosts: the SuperLink and two SuperNodes each in a network namespace of its
own (own address, own loopback), joined by virtual links through a bridge, as docs/deploy.md's
multi-host section sets them up. TLS certificates name the SuperLink's address; nodes
authenticate with their keys. Skips, with the reason, where network namespaces cannot be made
(they need root, or CAP_NET_ADMIN, and iproute2).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest

from server.checkpoint import CHECKPOINT_NAME, load_checkpoint
from tests.support import NetworkHosts, network_hosts, summary_of
from tests.test_deploy import SCRIPTS, Federation, start_federation
from tests.test_deploy import sites as sites  # the fixture, re-exported

SUBNET = "10.77.0"
HOSTS = {"superlink": 1, "site-a": 2, "site-b": 3}


@pytest.fixture
def hosts() -> Iterator[NetworkHosts]:
    """A namespace per host, ``10.77.0.N/24`` (the root namespace, where the flwr CLI runs, is
    ``10.77.0.254``)."""
    with network_hosts(HOSTS, SUBNET) as made:
        yield made


@pytest.fixture
def remote(processes, hosts, tmp_path, subprocess_env, free_port) -> Federation:
    """The federation of tests/test_deploy.py, every process on its own host."""
    pki = tmp_path / "pki"
    address = hosts.address("superlink")
    subprocess.run([SCRIPTS / "make_certs.sh", address, pki / "certs"], check=True)
    for name in ("site-a", "site-b"):
        subprocess.run([SCRIPTS / "make_node_key.sh", name, pki / "keys"], check=True)

    return start_federation(
        processes, pki, tmp_path, subprocess_env, free_port, host=address, place=hosts.on
    )


@pytest.mark.deploy
def test_sites_on_separate_hosts_run_to_the_end_and_one_that_loses_its_link_rejoins(
    remote, hosts, sites, tmp_path
):
    remote.register("site-a", "site-b")
    remote.site("site-a", sites["train-1"], "train")
    remote.site("site-b", sites["target-1"], "target")
    remote.wait_online(2)

    # Four rounds; the training site's link goes down after the first one ends.
    out = tmp_path / "run"
    overrides = (
        "federation.train_nodes=1 federation.target_nodes=1 federation.clients_per_round=1 "
        f"federation.rounds=4 federation.eval_every=2 federation.timeout=120 output.dir='{out}'"
    )
    started = time.monotonic()
    run = remote.run_past_round_1("run", overrides, out, tmp_path)
    # The training site's network is cut for 8 s as round 2 starts: its pull of the round's
    # message, or its reply, falls into the outage (gRPC waits it out, or retries on the
    # reset connection: "Connection attempt failed, retrying" in its log).
    cable = hosts.cable["site-a"]
    subprocess.run(["ip", "link", "set", cable, "down"], check=True)
    down_at = time.monotonic()
    time.sleep(8)
    subprocess.run(["ip", "link", "set", cable, "up"], check=True)
    outage = time.monotonic() - down_at

    assert run.wait(timeout=400) == 0, (tmp_path / "run.log").read_text()[-4000:]
    history = json.loads((out / "history.json").read_text())
    assert [h["round"] for h in history] == [1, 2, 3, 4]
    assert all(h["replies"] == 1 for h in history)  # no round lost its one training reply
    assert summary_of(out)["target_tasks"] == 1
    assert load_checkpoint(out / CHECKPOINT_NAME)["round"] == 4
    for name in ("site-a", "site-b"):
        assert remote.procs.started[name].poll() is None, remote.log(name)[-2000:]
    seconds = ", ".join(f"{h['seconds']:.1f}" for h in history)
    retried = "Connection attempt failed, retrying" in remote.log("site-a")
    print(
        f"\nmulti-host run: link of site-a down at {down_at - started:.1f} s for {outage:.1f} s "
        f"(it retried: {retried}); rounds {seconds} s"
    )
