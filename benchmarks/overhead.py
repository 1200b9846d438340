"""Framework overhead: steady-state seconds per round of the Flower simulation against a bare
single-process PyTorch loop doing the same meta-training work.

    python benchmarks/overhead.py                          # default job: digits, ~2-4 min
    python benchmarks/overhead.py dataset=fashion_mnist    # any simulate.py override

Both sides run the configuration ``python simulate.py`` composes (plus the overrides given),
with ``federation.rounds`` = ``--rounds`` and evaluation only in the last round.

Flower side: ``simulate.simulate(cfg, out_dir)`` in this process, unchanged (Ray actors run the
ClientApps, the ServerApp runs ``server.federation.run_federation``). Its grid is wrapped so
that right before each training round's messages go out, the *bare loop* runs the same round
here, while the actors are idle: the two are interleaved round by round and see the same
background load. A Flower round's time is from its training messages' push to the next round's
(so it includes everything the server does between rounds: aggregation, checkpoint, history,
tracking, progress) minus the bare round that ran inside it.

Bare side: ``gating.federated.round.BareFederation``, the round the ClientApp and the strategy
run, called directly: the strategy's ``NodeSampler``, ``client_update`` for each sampled node,
the ``ServerStep``. One process, ``torch.set_num_threads(1)`` (each Ray actor gets
OMP_NUM_THREADS=1). After the run its parameters are checked against Flower's checkpoint.

Parallelism: Flower runs ``A`` actors (``ray.num_cpus`` / ``ray.client_cpus``). The bare figure
it is compared with is the ideal ``A``-worker time of the same client updates: their measured
times greedily scheduled in dispatch order on ``A`` workers, plus the server update; for one
actor that is the serial time. The bare loop runs on a thread at the actors' niceness (Ray starts
its workers at nice 15; on a shared CPU a nice-0 loop would get the larger share). Phases, each
its own simulation with its own interleaved bare rounds:
  1actor       ray.num_cpus=1: one actor against the serial bare loop  <- flower_over_bare
  1actor_pull  the same with the grid's reply polling (InMemoryGrid.pull_interval, 0.1 s) at
               ``--poll`` seconds: a setting the ServerApp could change
  1actor_pump  also the simulation engine's message pump (vce_api.add_messages_to_queue, a
               hard-coded 0.1 s loop over every node) at ``--poll``: needs patching Flower
  2actors      the default (2 actors) against the ideal 2-worker bare time  <- startup_s
Steady state drops the first ``--warmup`` rounds and the last (evaluation) round; figures are
medians over rounds, ratios the medians of per-round ratios. ``startup_s``: from the call of
``simulate.simulate`` to the first training round (Ray, actors, node discovery), 2actors phase.
The ClientApp runs behind a timing mod (its handlers unchanged) that reports its seconds inside
the actor, so Flower's exchange splits into ClientApp work and the rest.
The last line is ``RESULT flower_over_bare=... startup_s=... ...``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# As simulate.py does, before Flower is imported: no telemetry, no update check, local state.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_HOME", str(ROOT / ".flwr_home"))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import torch  # noqa: E402
from flwr.app import Context, Message, MessageType  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from host import compose_config, describe_host  # noqa: E402  (benchmarks/host.py; the script folder is on sys.path)
from omegaconf import DictConfig  # noqa: E402

import client.app as client_app_module  # noqa: E402
import server.app as server_app_module  # noqa: E402
import simulate  # noqa: E402
from gating.federated.protocol import CONFIG, METRICS, ROUND_KEY  # noqa: E402
from gating.federated.round import BareFederation  # noqa: E402
from server.checkpoint import CHECKPOINT_NAME, load_checkpoint  # noqa: E402
from server.federation import POLL_IN_SIMULATION  # noqa: E402

PHASES = ("1actor", "1actor_pull", "1actor_pump", "2actors")
CLIENTAPP_SECONDS = "clientapp-seconds"
CLIENTAPP_NICE = "clientapp-nice"
RAY_WORKER_NICENESS = 15  # Ray's default for its workers; read back from the actors


# --------------------------------------------------------------------------- the bare loop


def makespan(seconds: Iterable[float], workers: int) -> float:
    """Greedy list scheduling of jobs on ``workers`` workers, in order, as Flower's worker
    threads take queued messages: the ideal parallel time of those jobs."""
    free = [0.0] * workers
    for job in seconds:
        heapq.heappush(free, heapq.heappop(free) + job)
    return max(free)


@dataclass
class BareTiming:
    client_seconds: list[float]  # per sampled node, in dispatch order
    server_seconds: float

    def ideal(self, workers: int) -> float:
        """The client updates on ``workers`` ideal workers, then the server update."""
        return makespan(self.client_seconds, workers) + self.server_seconds


# --------------------------------------------------------------------------- interleaving


def time_clientapp(message: Message, context: Context, call_next: Any) -> Message:
    """A Flower mod: the ClientApp's own seconds inside the actor, and the actor's niceness,
    go back in the reply's metrics (the exchange then splits into ClientApp work and the rest)."""
    start = time.perf_counter()
    reply = call_next(message, context)
    if not reply.has_error() and METRICS in reply.content.metric_records:
        reply.content[METRICS][CLIENTAPP_SECONDS] = time.perf_counter() - start
        reply.content[METRICS][CLIENTAPP_NICE] = os.getpriority(os.PRIO_PROCESS, 0)
    return reply


def timed_client_app() -> ClientApp:
    """``client.app.app``'s very handlers behind the timing mod."""
    app = ClientApp(mods=[time_clientapp])
    app.query()(client_app_module.query)
    app.train()(client_app_module.train)
    app.evaluate()(client_app_module.evaluate)
    return app


@dataclass
class Interleaving:
    """What the wrapped grid saw: bare rounds and Flower's send-and-receive times by round."""

    bare: BareFederation
    launched: float
    nice: int = RAY_WORKER_NICENESS
    first_round_at: float | None = None
    pushed_at: dict[int, float] = field(default_factory=dict)  # a training round's push, entry
    bare_rounds: dict[int, BareTiming] = field(default_factory=dict)
    bare_seconds: dict[int, float] = field(default_factory=dict)
    exchange_seconds: dict[int, float] = field(default_factory=dict)
    clientapp_seconds: dict[int, list[float]] = field(default_factory=dict)
    _runner: ThreadPoolExecutor | None = None

    def run_bare(self, server_round: int) -> None:
        """One bare round, on a thread of its own at the actors' niceness: Ray starts its
        workers at nice 15, and on a shared CPU a nice-0 bare loop would get the larger share."""
        if self._runner is None:
            nice = self.nice

            def renice() -> None:  # Linux: the nice value belongs to the thread
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)

            self._runner = ThreadPoolExecutor(1, initializer=renice)
        start = time.perf_counter()
        done = self._runner.submit(self.bare.round, server_round).result()
        self.bare_rounds[server_round] = BareTiming(done.client_seconds, done.server_seconds)
        self.bare_seconds[server_round] = time.perf_counter() - start

    def close(self) -> None:
        if self._runner is not None:
            self._runner.shutdown()


def _reply_values(replies: Iterable[Message], key: str) -> list[float]:
    return [
        float(m.content[METRICS][key])
        for m in replies
        if not m.has_error() and METRICS in m.content.metric_records and key in m.content[METRICS]
    ]


class InterleavedGrid:
    """Delegates to Flower's grid; before a training round's messages go out, the bare loop
    runs the same round (so each Flower round holds exactly one bare round, timed apart)."""

    def __init__(self, grid: Any, log: Interleaving, pull: float | None) -> None:
        self._grid, self._log = grid, log
        self._pending: tuple[int, int, float, list[Message]] | None = None
        # The round loop's own setting for a simulation's in-memory grid (it polls the wrapper).
        self.pull_interval = POLL_IN_SIMULATION if pull is None else pull

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """The round loop (``server.federation.exchange``) pushes, then pulls until every
        reply is in: a training round's bare twin runs right before its messages go out."""
        messages = list(messages)
        kind = messages[0].metadata.message_type if messages else None
        if kind == MessageType.TRAIN:
            server_round = int(messages[0].content[CONFIG][ROUND_KEY])
            self._log.pushed_at[server_round] = time.perf_counter()
            if self._log.first_round_at is None:
                self._log.first_round_at = self._log.pushed_at[server_round]
            self._log.run_bare(server_round)
            self._pending = (server_round, len(messages), time.perf_counter(), [])
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        if nice := _reply_values(replies, CLIENTAPP_NICE):
            self._log.nice = int(max(nice))
        if self._pending is not None:
            server_round, expected, start, got = self._pending
            got += replies
            if len(got) >= expected:
                self._log.exchange_seconds[server_round] = time.perf_counter() - start
                self._log.clientapp_seconds[server_round] = _reply_values(got, CLIENTAPP_SECONDS)
                self._pending = None
        return replies


def fast_message_pump(interval: float) -> None:
    """Replace the simulation engine's message pump (it polls the link state every 0.1 s) by
    the same loop polling every ``interval`` seconds."""
    from flwr.server.superlink.fleet.vce import vce_api

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop: threading.Event) -> None:
        while not f_stop.is_set():
            for node_id in nodes_mapping:
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(interval)

    vce_api.add_messages_to_queue = add_messages_to_queue


@dataclass
class Phase:
    name: str
    actors: int
    flower: list[float]  # steady-state seconds per round, bare round subtracted
    bare: list[float]  # ideal `actors`-worker bare seconds, same rounds
    serial: list[float]  # serial bare seconds, same rounds
    exchange: list[float]  # Flower's send_and_receive per round
    outside: list[float]  # of which not in ClientApps: exchange - makespan(ClientApp seconds)
    client: list[float]  # mean bare seconds per client update per round
    clientapp: list[float]  # mean ClientApp seconds per message (inside the actor) per round
    startup_s: float
    bare_startup_s: float
    nice: int  # the actors' niceness, which the bare thread took
    max_param_diff: float

    @property
    def server(self) -> list[float]:
        """The round outside send_and_receive: config encoding, sampling, checks, aggregation
        and the Adam steps, checkpoint, history, tracking and progress, every round."""
        return [f - e for f, e in zip(self.flower, self.exchange, strict=True)]

    @property
    def ratio(self) -> float:
        return statistics.median(f / b for f, b in zip(self.flower, self.bare, strict=True))


def run_phase(
    name: str,
    cfg: DictConfig,
    actors: int,
    warmup: int,
    pull: float | None,
    pump: float | None,
    out_dir: Path,
) -> Phase:
    from flwr.server.superlink.fleet.vce import vce_api

    original_pump = vce_api.add_messages_to_queue
    original_run = server_app_module.run_federation
    original_app = client_app_module.app
    launched = time.perf_counter()
    bare = BareFederation(cfg)
    bare_startup = time.perf_counter() - launched
    log = Interleaving(bare=bare, launched=time.perf_counter())

    def run_federation(grid: Any, settings: DictConfig, folder: Path, *rest: Any) -> Any:
        return original_run(InterleavedGrid(grid, log, pull), settings, folder, *rest)

    server_app_module.run_federation = run_federation
    client_app_module.app = timed_client_app()  # simulate.simulate imports it at call time
    if pump is not None:
        fast_message_pump(pump)
    try:
        simulate.simulate(cfg, out_dir)
    finally:
        log.close()
        server_app_module.run_federation = original_run
        client_app_module.app = original_app
        vce_api.add_messages_to_queue = original_pump

    history = json.loads((out_dir / "history.json").read_text())
    steady = [h for h in history if warmup < h["round"] < cfg.federation.rounds]
    # Push to next push: the whole round, the server's work after the exchange included.
    flower = [
        log.pushed_at[h["round"] + 1] - log.pushed_at[h["round"]] - log.bare_seconds[h["round"]]
        for h in steady
    ]
    rounds = [log.bare_rounds[h["round"]] for h in steady]
    saved = load_checkpoint(out_dir / CHECKPOINT_NAME)["strategy"]["params"]
    diff = max(float((saved[n] - bare.params[n]).abs().max()) for n in bare.params)
    return Phase(
        name=name,
        actors=actors,
        flower=flower,
        bare=[r.ideal(actors) for r in rounds],
        serial=[r.ideal(1) for r in rounds],
        exchange=[log.exchange_seconds[h["round"]] for h in steady],
        outside=[
            log.exchange_seconds[h["round"]] - makespan(log.clientapp_seconds[h["round"]], actors)
            for h in steady
        ],
        client=[statistics.fmean(r.client_seconds) for r in rounds],
        clientapp=[statistics.fmean(log.clientapp_seconds[h["round"]]) for h in steady],
        startup_s=log.first_round_at - log.launched,
        bare_startup_s=bare_startup,
        nice=log.nice,
        max_param_diff=diff,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="simulate.py overrides, e.g. dataset=...")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=4, help="first rounds left out")
    parser.add_argument("--poll", type=float, default=0.01, help="seconds, *_pull/*_pump phases")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the bare loop as one Ray actor runs (OMP_NUM_THREADS=1)
    base = [
        f"federation.rounds={args.rounds}",
        f"federation.eval_every={args.rounds}",
        "output.plots=false",
        *args.overrides,
    ]
    one_actor = ["ray.num_cpus=1", "ray.client_cpus=1"]
    specs = {  # overrides, grid pull interval, engine pump interval
        "1actor": (one_actor, None, None),
        "1actor_pull": (one_actor, args.poll, None),
        "1actor_pump": (one_actor, args.poll, args.poll),
        "2actors": ([], None, None),
    }
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        for name in args.phases.split(","):
            extra, pull, pump = specs[name]
            cfg = compose_config([*base, *extra])
            actors = int(cfg.ray.num_cpus // cfg.ray.client_cpus)
            print(f"--- phase {name}: {actors} actor(s), {args.rounds} rounds", flush=True)
            folder = Path(tmp) / name
            phases.append(run_phase(name, cfg, actors, args.warmup, pull, pump, folder))

    cfg = compose_config(base)
    fed = cfg.federation
    print()
    print(f"machine: {describe_host()}")
    print(
        f"job: {cfg.strategy.name} on {cfg.dataset.name}, {cfg.task.ways}-way "
        f"{cfg.task.shots}-shot, {fed.clients_per_round} of {fed.train_nodes} training nodes "
        f"per round (+{fed.target_nodes} target), model width {cfg.model.width} depth "
        f"{cfg.model.depth}, first_order={cfg.meta.first_order}; rounds {args.warmup + 1}.."
        f"{fed.rounds - 1} of {fed.rounds} (medians over rounds)"
    )
    print()
    columns = [
        ("phase", "{:<11}", lambda p: p.name),
        ("actors", "{:>6}", lambda p: p.actors),
        ("flower s", "{:>8.3f}", lambda p: statistics.median(p.flower)),
        ("bare s", "{:>6.3f}", lambda p: statistics.median(p.bare)),
        ("serial s", "{:>8.3f}", lambda p: statistics.median(p.serial)),
        ("flower/bare", "{:>11.2f}", lambda p: p.ratio),
        ("server s", "{:>8.3f}", lambda p: statistics.median(p.server)),
        ("exchange s", "{:>10.3f}", lambda p: statistics.median(p.exchange)),
        ("outside s", "{:>9.3f}", lambda p: statistics.median(p.outside)),
        ("client s", "{:>8.3f}", lambda p: statistics.median(p.client)),
        ("clientapp s", "{:>11.3f}", lambda p: statistics.median(p.clientapp)),
        ("startup s", "{:>9.1f}", lambda p: p.startup_s),
        ("nice", "{:>4}", lambda p: p.nice),
        ("max|dθ|", "{:>7.0e}", lambda p: p.max_param_diff),
    ]
    header = " ".join(
        name.ljust(11) if name == "phase" else name.rjust(len(fmt.format(get(phases[0]))))
        for name, fmt, get in columns
    )
    print(header)
    print("-" * len(header))
    for p in phases:
        print(" ".join(fmt.format(get(p)) for _, fmt, get in columns))
    print()
    print(
        "flower s: a Flower round (push to next push, minus the bare round run inside it);\n"
        "bare s: the same round's bare work on as many ideal workers as Flower has actors\n"
        "  (1 actor: serial s, the single-process loop); flower/bare: median per-round ratio;\n"
        "server s: the round outside send_and_receive (encode, aggregate, checkpoint);\n"
        "exchange s: Flower's send_and_receive; outside s: the part of it not spent in\n"
        "  ClientApps (Ray calls, the engine's threads and 0.1 s polling loops);\n"
        "client s / clientapp s: one client update, bare / as a ClientApp inside its actor;\n"
        "startup s: simulate() call to the first round; nice: the actors' niceness, which the\n"
        "  bare loop's thread takes too (a fair share of a shared CPU);\n"
        "max|dθ|: Flower's final parameters against the bare loop's (they did the same work)."
    )
    by_name = {p.name: p for p in phases}
    measured = by_name.get("1actor", phases[0])  # same parallelism on both sides
    default = by_name.get("2actors", phases[-1])  # the configuration users run
    extras = " ".join(f"flower_over_bare_{p.name}={p.ratio:.3f}" for p in phases)
    diff = max(p.max_param_diff for p in phases)  # 0: both sides did the same work
    print(
        f"RESULT flower_over_bare={measured.ratio:.3f} startup_s={default.startup_s:.1f} {extras} "
        f"max_param_diff={diff:.3g}"
    )


if __name__ == "__main__":
    main()
