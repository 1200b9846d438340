"""Scale: does a round cost the same with 1,000 or 10,000 simulated nodes as with 100?

    python benchmarks/scale.py                  # 100 / 1,000 / 10,000 nodes, Flower as shipped
    python benchmarks/scale.py --pump patched   # docs/patches/flwr-1.39.0-simulation-pump.patch
    python benchmarks/scale.py --nodes 100,1000 --reps 3 dataset=fashion_mnist

Each run is ``simulate.simulate(cfg, out_dir)`` in this process (Ray actors run the
ClientApps), with the configuration ``python simulate.py`` composes plus
``federation.train_nodes=N`` (N from ``--nodes``), ``federation.clients_per_round=10``,
``federation.target_nodes=--targets``, ``--rounds`` rounds and evaluation only in the last one.
The node counts alternate (100, 1000, 10000, then 10000, 1000, 100, ...) over ``--reps``
repetitions, so a drifting background load hits all alike.

Per-round time: ``history.json``'s seconds of the steady rounds (after ``--warmup``, without
the last, evaluation round), median over every repetition's rounds. Start-up (Ray, actors, and
the discovery round that asks every node who it is, which does grow with N) is reported apart.

Memory of all processes: this driver and everything it started (Ray's GCS, raylet, dashboard and
log processes, the ClientApp actors, idle workers), found as its descendants in /proc and
sampled every ``--sample`` seconds; PSS (shared pages split between the processes sharing them,
so shared libraries are not counted once per process) and RSS, from /proc/PID/smaps_rollup.
Peaks are over the steady rounds, and over the whole run (start-up included); ratios are each
count's medians over repetitions against the smallest count's. Linux only.

``--pump patched`` runs Flower with the proposed patch of its simulation message pump
(``docs/patches/flwr-1.39.0-simulation-pump.patch``, applied in this process by
``benchmarks/flower_patch.py``; the files on disk are untouched).

Bytes per client and round: ``summary.json``'s ``bytes_per_client_round``: the parameters sent
down plus the update sent back, both as ``ArrayRecord.count_bytes`` (server/strategy.py).
The last lines are ``RESULT nodes=N time_ratio=... memory_ratio=... startup_ratio=...``, one per
count above the smallest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# As simulate.py does, before Flower is imported: no telemetry, no update check, local state.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_HOME", str(ROOT / ".flwr_home"))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from flwr.app import MessageType  # noqa: E402
from host import compose_config, describe_host  # noqa: E402  (benchmarks/host.py; the script folder is on sys.path)
from omegaconf import DictConfig  # noqa: E402

import server.app as server_app_module  # noqa: E402
import simulate  # noqa: E402

# --------------------------------------------------------------------------- memory


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, from the parent ids in /proc/PID/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                # The command name may hold spaces; the parent id follows its closing ")".
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def memory_kb(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in kB; (0, 0) when it has gone."""
    values = {"Pss:": 0, "Rss:": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                key, _, rest = line.partition(" ")
                if key in values:
                    values[key] = int(rest.split()[0])
    except OSError:
        pass
    return values["Pss:"], values["Rss:"]


class MemorySampler:
    """Samples the summed PSS/RSS of this process tree in a thread until stopped."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.samples: list[tuple[float, int, int, int]] = []  # time, PSS kB, RSS kB, processes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        root = os.getpid()
        while not self._stop.is_set():
            pids = descendants(root)
            pss = rss = 0
            for pid in pids:
                p, r = memory_kb(pid)
                pss, rss = pss + p, rss + r
            self.samples.append((time.perf_counter(), pss, rss, len(pids)))
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak_mb(self, since: float = 0.0, until: float = float("inf")) -> tuple[float, float, int]:
        """Peak PSS and RSS (MB) and most processes among the samples in [since, until]."""
        window = [s for s in self.samples if since <= s[0] <= until] or self.samples
        return (
            max(s[1] for s in window) / 1024,
            max(s[2] for s in window) / 1024,
            max(s[3] for s in window),
        )


# --------------------------------------------------------------------------- runs


def process_cpu_seconds() -> float:
    """CPU time of this process so far (all threads: the ServerApp, Flower's engine threads)."""
    times = os.times()
    return times.user + times.system


class RoundClock:
    """Delegates to Flower's grid and notes when each training round's messages go out, and
    this process's CPU time then."""

    def __init__(self, grid: Any, starts: dict[int, float], cpu: dict[int, float]) -> None:
        self._grid, self._starts, self._cpu = grid, starts, cpu

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def push_messages(self, messages: Any) -> Any:
        messages = list(messages)
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            self._cpu[len(self._starts) + 1] = process_cpu_seconds()
            self._starts[len(self._starts) + 1] = time.perf_counter()
        return self._grid.push_messages(messages)


@dataclass
class Run:
    nodes: int
    round_seconds: list[float]  # steady rounds
    driver_cpu_s: float  # this process's CPU seconds per steady round
    startup_s: float
    peak_pss_mb: float  # steady rounds
    peak_rss_mb: float
    peak_pss_all_mb: float  # whole run, start-up included
    processes: int
    bytes_per_client: float


def run_once(cfg: DictConfig, warmup: int, sample: float, out_dir: Path) -> Run:
    starts: dict[int, float] = {}
    cpu: dict[int, float] = {}
    original = server_app_module.run_federation

    def run_federation(grid: Any, settings: DictConfig, folder: Path, *rest: Any) -> Any:
        return original(RoundClock(grid, starts, cpu), settings, folder, *rest)

    server_app_module.run_federation = run_federation
    launched = time.perf_counter()
    try:
        with MemorySampler(sample) as sampler:
            simulate.simulate(cfg, out_dir)
    finally:
        server_app_module.run_federation = original
    rounds = cfg.federation.rounds
    history = json.loads((out_dir / "history.json").read_text())
    summary = json.loads((out_dir / "summary.json").read_text())
    steady = [h["seconds"] for h in history if warmup < h["round"] < rounds]
    pss, rss, processes = sampler.peak_mb(starts[warmup + 1], starts[rounds])
    return Run(
        nodes=cfg.federation.train_nodes,
        round_seconds=steady,
        driver_cpu_s=(cpu[rounds] - cpu[warmup + 1]) / (rounds - warmup - 1),
        startup_s=starts[1] - launched,
        peak_pss_mb=pss,
        peak_rss_mb=rss,
        peak_pss_all_mb=sampler.peak_mb()[0],
        processes=processes,
        bytes_per_client=float(summary["bytes_per_client_round"]),
    )


PATCH = ROOT / "docs" / "patches" / "flwr-1.39.0-simulation-pump.patch"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="simulate.py overrides, e.g. dataset=...")
    parser.add_argument("--nodes", default="100,1000,10000", help="training-node counts")
    parser.add_argument("--clients", type=int, default=10, help="sampled per round")
    parser.add_argument("--targets", type=int, default=10, help="target nodes")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="first rounds left out")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--sample", type=float, default=0.5, help="memory sampling, seconds")
    parser.add_argument(
        "--pump",
        choices=("flower", "patched"),
        default="flower",
        help=f"Flower's simulation message pump as shipped, or with {PATCH.name}",
    )
    args = parser.parse_args()
    if args.pump == "patched":
        from flower_patch import apply  # benchmarks/flower_patch.py

        print(f"{PATCH.name} installed: {', '.join(apply(PATCH))}", flush=True)
    counts = sorted(int(n) for n in args.nodes.split(","))
    if len(counts) < 2:
        parser.error("--nodes needs at least two counts, e.g. 100,1000")
    runs: dict[int, list[Run]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        for rep in range(args.reps):
            for nodes in counts if rep % 2 == 0 else counts[::-1]:
                cfg = compose_config(
                    [
                        f"federation.train_nodes={nodes}",
                        f"federation.target_nodes={args.targets}",
                        f"federation.clients_per_round={args.clients}",
                        f"federation.rounds={args.rounds}",
                        f"federation.eval_every={args.rounds}",
                        "output.plots=false",
                        *args.overrides,
                    ]
                )
                print(f"--- {nodes} training nodes, repetition {rep + 1}", flush=True)
                folder = Path(tmp) / f"{nodes}-{rep}"
                runs[nodes].append(run_once(cfg, args.warmup, args.sample, folder))

    def med(nodes: int, field: str) -> float:
        return statistics.median(getattr(r, field) for r in runs[nodes])

    def round_s(nodes: int) -> float:
        return statistics.median(s for r in runs[nodes] for s in r.round_seconds)

    print()
    print(f"machine: {describe_host()}")
    cfg = compose_config(args.overrides)
    print(
        f"job: {cfg.strategy.name} on {cfg.dataset.name}, {args.clients} clients per round, "
        f"{args.targets} target nodes, {cfg.ray.num_cpus} CPUs for "
        f"{int(cfg.ray.num_cpus // cfg.ray.client_cpus)} actors; rounds {args.warmup + 1}.."
        f"{args.rounds - 1} of {args.rounds}, {args.reps} repetitions, medians; "
        f"message pump: {args.pump}"
    )
    print()
    header = (
        f"{'nodes':>6}{'round s':>9}{'driver CPU s':>14}{'startup s':>11}{'peak PSS MB':>13}"
        f"{'peak RSS MB':>13}{'PSS all MB':>12}{'processes':>11}{'bytes/client':>14}"
    )
    print(header)
    print("-" * len(header))
    for nodes in counts:
        print(
            f"{nodes:>6}{round_s(nodes):>9.3f}{med(nodes, 'driver_cpu_s'):>14.3f}"
            f"{med(nodes, 'startup_s'):>11.1f}"
            f"{med(nodes, 'peak_pss_mb'):>13.0f}{med(nodes, 'peak_rss_mb'):>13.0f}"
            f"{med(nodes, 'peak_pss_all_mb'):>12.0f}{med(nodes, 'processes'):>11.0f}"
            f"{med(nodes, 'bytes_per_client'):>14.0f}"
        )
    print()
    print(
        "round s: steady-state seconds per round; driver CPU s: CPU seconds this process (the\n"
        "ServerApp and Flower's engine threads) spends per steady round; peak PSS/RSS: summed\n"
        "over the process tree, steady rounds; PSS all: whole run incl. start-up;\n"
        "bytes/client: parameters down + update up per round. Ratios: against the smallest count."
    )
    base = counts[0]
    for nodes in counts[1:]:

        def ratio(field: str, nodes: int = nodes) -> float:
            return med(nodes, field) / med(base, field)

        print(
            f"RESULT nodes={nodes} pump={args.pump} "
            f"time_ratio={round_s(nodes) / round_s(base):.3f} "
            f"memory_ratio={ratio('peak_pss_mb'):.3f} rss_ratio={ratio('peak_rss_mb'):.3f} "
            f"memory_ratio_with_startup={ratio('peak_pss_all_mb'):.3f} "
            f"startup_ratio={ratio('startup_s'):.3f} "
            f"driver_cpu_ratio={ratio('driver_cpu_s'):.3f} "
            f"bytes_per_client={med(nodes, 'bytes_per_client'):.0f}"
        )


if __name__ == "__main__":
    main()
