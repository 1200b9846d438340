"""Plain helpers the test files share (the fixtures built on them are in tests/conftest.py):
the environment of the processes the end-to-end tests start, a tracker that stops those
processes with everything they spawned, a central-difference gradient check, and hosts made of
network namespaces for the tests that need several machines."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from conf.schema import default_config
from gating.meta import MetaConfig

VENV_BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    """A private Flower home, no telemetry, no stray Ray cluster, this venv's tools on PATH."""
    return {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        "FLWR_HOME": str(tmp_path / "flwr_home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def _running(process: psutil.Process) -> bool:
    """Alive and still the same process: not gone, not a zombie, its PID not reused."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class ProcessTree:
    """The processes a test started, by name, and every process they spawned.

    Each spawned process is remembered as a ``psutil.Process``, which knows its create time, so a
    reused PID is never signalled. Call ``track`` whenever new processes may have appeared (after
    a CLI command, while polling): a process that has spawned and ended in between is not seen.
    """

    def __init__(self) -> None:
        self.started: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self._roots: dict[str, psutil.Process] = {}
        self._spawned: dict[str, dict[int, psutil.Process]] = {}

    def start(
        self,
        name: str,
        args: list[str],
        env: dict[str, str],
        cwd: Path,
        log: Path | None = None,
    ) -> subprocess.Popen:
        """Start ``args`` in ``cwd`` with stdout and stderr to ``log`` (default cwd/NAME.log)."""
        assert name not in self.started, name
        log = cwd / f"{name}.log" if log is None else log
        with log.open("w") as out:
            proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        self.started[name], self.logs[name], self._spawned[name] = proc, log, {}
        with contextlib.suppress(psutil.Error):  # exited and reaped already: nothing to track
            self._roots[name] = psutil.Process(proc.pid)
        return proc

    def track(self) -> None:
        """Remember every descendant each started process has now, also the descendants of an
        earlier descendant whose parent has died since (they now hang off init)."""
        for name, spawned in self._spawned.items():
            root = self._roots.get(name)
            known = [p for p in (root, *spawned.values()) if p is not None and _running(p)]
            pids = {p.pid for p in known}
            for parent in known:
                try:
                    if parent is not root and parent.ppid() in pids:
                        continue  # found again through its parent
                    children = parent.children(recursive=True)
                except psutil.Error:
                    continue
                for child in children:
                    if child.pid not in spawned or not _running(spawned[child.pid]):
                        spawned[child.pid] = child

    def alive(self, name: str) -> list[psutil.Process]:
        """The processes ``name`` spawned that are still running."""
        return [p for p in self._spawned[name].values() if _running(p)]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal one started process and everything it spawned; wait until all are gone,
        escalating to SIGKILL."""
        self.track()
        proc = self.started[name]
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)  # a no-op once the process has been waited for
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        self.track()  # what it spawned while stopping
        for child_sig in (sig, signal.SIGKILL):
            for process in self.alive(name):
                with contextlib.suppress(psutil.Error):
                    process.send_signal(child_sig)  # psutil refuses a reused PID
            deadline = time.monotonic() + 10
            while self.alive(name) and time.monotonic() < deadline:
                time.sleep(0.2)
        survivors = [p.pid for p in self.alive(name)]
        assert not survivors, f"{name}: processes {survivors} survived"

    def stop_all(self) -> None:
        """SIGTERM every started process and its tree, the last started first (SuperNodes before
        the SuperLink); every one is tried before a survivor fails the test."""
        self.track()
        errors = []
        for name in reversed(list(self.started)):
            try:
                self.kill(name, signal.SIGTERM)
            except AssertionError as error:
                errors.append(str(error))
        assert not errors, "; ".join(errors)


def assert_matches_central_differences(
    grads, params, objective, eps: float = 1e-6, entries: int = 3
) -> None:
    """Every group gets a gradient, and ``entries`` random entries per tensor match central
    differences of ``objective(params)`` (a float) in float64."""
    import pytest
    import torch

    generator = torch.Generator().manual_seed(0)
    for name, value in params.items():
        assert grads[name].abs().sum() > 0, f"no meta-gradient reaches {name}"
        for index in torch.randperm(value.numel(), generator=generator)[:entries].tolist():
            losses = []
            for sign in (1, -1):
                probe = {k: v.clone().requires_grad_(True) for k, v in params.items()}
                with torch.no_grad():
                    probe[name].view(-1)[index] += sign * eps
                losses.append(objective(probe))
            numeric = (losses[0] - losses[1]) / (2 * eps)
            assert grads[name].reshape(-1)[index].item() == pytest.approx(
                numeric, rel=1e-4, abs=1e-7
            ), name


def tiny_fo_federation():
    """A 4 + 2 node first-order MetaGater config that trains in seconds (its gates close fast:
    short warm-up, ρ = 0.4, large meta step sizes); a test sets its network on top."""

    cfg = default_config()
    cfg.federation.train_nodes = 4
    cfg.federation.target_nodes = 2
    cfg.federation.clients_per_round = 2
    cfg.gating.warmup_rounds = 2
    cfg.gating.target_ratio = 0.4
    cfg.meta.first_order = True
    cfg.strategy.name = "metagater_fo"
    cfg.meta.backbone_lr = cfg.meta.gate_lr = 0.03
    return cfg


# Hard gates, the expected-cost regularizer and large step sizes: the straight-through paths the
# meta-gradient tests check (a test relaxes or reorders it with dataclasses.replace).
STRAIGHT_THROUGH_META = MetaConfig(
    backbone_lr=0.3,
    gate_lr=0.7,
    reg_weight=0.5,
    target_ratio=0.3,
    train_gates="hard",
    cost="expected",
)


def interrupt(
    command: list[str],
    cwd: Path,
    env: dict[str, str],
    ready: Callable[[], bool],
    sig: int = signal.SIGINT,
    group: bool = True,
    again_after: float | None = None,
) -> tuple[int, str, str]:
    """Start ``command`` in a session of its own, wait (at most 4 minutes) until ``ready()``,
    send ``sig`` to its whole process group (as a terminal's Ctrl-C does) or, with
    ``group=False``, to the process alone (as a process manager's SIGTERM does), once more
    ``again_after`` seconds later if given (an impatient second Ctrl-C), and return its exit
    status, stdout and stderr. A stop that hangs fails after a minute and a half; whatever is
    left is killed."""
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not ready():
            assert process.poll() is None, "it ended before it was ready"
            assert time.monotonic() < deadline, "it was not ready within 4 minutes"
            time.sleep(0.05)
        for pause in [0.0] if again_after is None else [0.0, again_after]:
            time.sleep(pause)
            if group:
                os.killpg(process.pid, sig)
            else:
                process.send_signal(sig)
        out, err = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
    return process.returncode, out, err


def run_simulate(
    env: dict[str, str], *overrides: str, timeout: float = 180
) -> subprocess.CompletedProcess:
    """``python simulate.py OVERRIDES`` from the repository root, its output captured."""
    return subprocess.run(
        [sys.executable, "simulate.py", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_run_folder(
    folder: Path, cfg, params, rounds: int, regularizer_weight, partitions
) -> dict[str, float]:
    """``params`` after ``rounds`` written as a run of simulate.py writes it (config.yaml, the
    checkpoint through the server's own writer, task_accuracy.json with what the ClientApps of
    ``partitions`` report at the final evaluation); returns those reports' accuracies."""
    import json

    from omegaconf import OmegaConf

    from conf.schema import to_flat
    from gating.federated.budget import CHECKPOINT_KEY
    from gating.federated.evaluation import evaluate_node
    from gating.federated.nodes import partition_task
    from server.checkpoint import save_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    state = {
        "round": rounds,
        "strategy": {"params": params},
        "config": to_flat(cfg),
        CHECKPOINT_KEY: regularizer_weight.state_dict(),
        "wall_seconds": 1.0,
    }
    save_checkpoint(folder / "checkpoint.pt", state)
    weight = regularizer_weight(rounds)
    reported = {
        str(p): evaluate_node(cfg, partition_task(cfg, p), params, rounds, weight)["accuracy"]
        for p in partitions
    }
    (folder / "task_accuracy.json").write_text(json.dumps(reported))
    return reported


def summary_of(run: Path) -> dict:
    """A finished run's summary.json, checked against its task_accuracy.json: the accuracy is
    the mean over the target tasks it lists (one per target node), and it lists all of them."""
    import json
    import math

    summary = json.loads((run / "summary.json").read_text())
    tasks = json.loads((run / "task_accuracy.json").read_text())
    assert len(tasks) == summary["target_tasks"]
    assert math.isclose(summary["accuracy"], sum(tasks.values()) / len(tasks), rel_tol=1e-12)
    return summary


def composed(*overrides: str):
    """simulate.py's config with ``overrides``, composed by Hydra in this process as on the
    command line."""
    from hydra import compose, initialize_config_dir

    import simulate  # noqa: F401  (registers the config store and the resolvers)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose("config", overrides=list(overrides))


def error_text(error: BaseException) -> str:
    """An exception's message with those of its causes (Hydra wraps OmegaConf's)."""
    parts = []
    while error is not None:
        parts.append(str(error))
        error = error.__cause__
    return " | ".join(parts)


# ------------------------------------------------------------------ hosts on one machine


@dataclass
class NetworkHosts:
    """Hosts on this machine, each a network namespace with its own address and loopback, on
    virtual links into one bridge (the root namespace is ``SUBNET.254``)."""

    subnet: str
    number: dict[str, int]  # host name -> last byte of its address
    space: dict[str, str]  # host name -> its network namespace
    cable: dict[str, str]  # host name -> the root-namespace end of its link (down: offline)

    def address(self, name: str) -> str:
        return f"{self.subnet}.{self.number[name]}"

    def on(self, name: str, args: list[str]) -> list[str]:
        """``args`` run on host ``name``: its network only; files as on this machine."""
        return ["ip", "netns", "exec", self.space[name], *args]

    def on_machine(self, name: str, root: Path, command: str) -> list[str]:
        """A shell ``command`` run on host ``name`` as on a machine of its own: its network,
        its own temporary directory (``TMPDIR=root/name``, where Ray keeps a node's session and
        sockets: keep ``root`` short, a socket path has at most 107 bytes) and its own
        ``/dev/shm`` (Ray's object store); the project's files stay shared, as a mount would."""
        private = root / name
        private.mkdir(parents=True, exist_ok=True)
        setup = f"mount -t tmpfs tmpfs /dev/shm && export TMPDIR='{private}' && cd '{ROOT}'"
        return self.on(
            name,
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "bash",
                "-c",
                f"{setup} && {command}",
            ],
        )

    def kill_all(self, name: str) -> None:
        """Every process on host ``name`` killed at once: the machine dies."""
        listed = subprocess.run(
            ["ip", "netns", "pids", self.space[name]], capture_output=True, text=True
        )
        for pid in listed.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def network_hosts(number: dict[str, int], subnet: str) -> Iterator[NetworkHosts]:
    """``number``'s hosts, ``subnet.N/24`` each, removed with every process left on them at the
    end. Skips the test, with the reason, where network namespaces cannot be made (they need
    root or CAP_NET_ADMIN, and iproute2)."""
    import pytest

    tag = f"{os.getpid() % 100000}"
    bridge = f"mgbr{tag}"
    hosts = NetworkHosts(
        subnet,
        number,
        {name: f"mg{tag}-{name}" for name in number},
        {name: f"mv{tag}{n}" for name, n in number.items()},
    )

    def remove() -> None:
        for name, space in hosts.space.items():
            with contextlib.suppress(OSError):
                hosts.kill_all(name)
            with contextlib.suppress(OSError, subprocess.CalledProcessError):
                _ip("netns", "del", space)
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            _ip("link", "del", bridge)

    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{subnet}.254/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for name in number:
            space, outer, inner = hosts.space[name], hosts.cable[name], f"{hosts.cable[name]}n"
            _ip("netns", "add", space)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", space)
            _ip("link", "set", outer, "master", bridge, "up")
            _ip("-n", space, "addr", "add", f"{hosts.address(name)}/24", "dev", inner)
            _ip("-n", space, "link", "set", inner, "up")
            _ip("-n", space, "link", "set", "lo", "up")
    except (OSError, subprocess.CalledProcessError) as error:  # no iproute2, no privilege
        remove()
        reason = getattr(error, "stderr", "") or str(error)
        pytest.skip(f"network namespaces are not available here: {reason.strip()}")
    try:
        yield hosts
    finally:
        remove()
