"""The server's round loop: discover nodes, meta-train, evaluate target nodes, keep results.

Shared by simulation (``simulate.py``), ``flwr run .`` and deployments; it only talks to a Grid.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.superlink.grid import InMemoryGrid
from omegaconf import DictConfig, OmegaConf

from conf.schema import to_flat
from gating.data import DatasetError, class_split, load_dataset
from gating.federated.budget import CHECKPOINT_KEY as REGULARIZER_STATE
from gating.federated.budget import RegularizerWeight
from gating.federated.evaluation import scalar_figures
from gating.federated.privacy import epsilon
from gating.federated.protocol import (
    CONFIG,
    METRICS,
    NODE,
    PARTITION_KEY,
    REG_WEIGHT_KEY,
    ROUND_KEY,
    encode_config,
)
from gating.federated.round import server_step_for, weight_bound
from gating.federated.settings import run_parameters, spec_for, task_spec
from gating.federated.strategies import strategy_of
from gating.model import ModelSpec, gate_shapes
from server.checkpoint import (
    CHECKPOINT_NAME,
    HISTORY_LINES,
    append_history,
    check_run_folder,
    read_history,
    rewrite_history,
    save_checkpoint,
)
from server.progress import RoundReporter
from server.results import (
    CONDITIONALITY_KEYS,
    SUMMARY_KEYS,
    TASK_ACCURACY_FILE,
    plot_history,
    write_json,
)
from server.strategy import MetaLearningStrategy
from server.tracking import check_tracking_store, make_tracker
from server.validation import node_problem


class FederationError(RuntimeError):
    """The federation cannot run as configured (missing nodes, inconsistent data, ...)."""


class RunInterrupted(RuntimeError):
    """Stopped on request (Ctrl-C, SIGTERM); the last completed round's checkpoint is kept."""


#: Seconds between polls of a simulation's in-memory grid: Flower's 0.1 s default costs up to
#: that much per exchange, and polling a local queue is cheap.
POLL_IN_SIMULATION = 0.01

#: The most of an exchange's time that asking for replies may take. One ask costs time in
#: proportion to the messages still awaited (Flower's link state checks each, under the lock its
#: message pump and reply store need too): with 10,000 awaited (the first round's question to
#: every node of a large federation) a fixed 0.01 s poll would hold that lock most of the time.
PULL_SHARE = 0.1

#: The longest wait between two asks that cost next to nothing (how late a reply may be noticed).
MAX_PULL_WAIT = 0.5

#: Set (e.g. by a signal handler) to stop the run at the next poll, within a fraction of a
#: second, instead of after Flower's reply timeout.
STOP_REQUESTED = threading.Event()


def exchange(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """``grid.send_and_receive`` that gives up when :data:`STOP_REQUESTED` is set, and waits
    between asks for replies at least the grid's ``pull_interval`` and long enough that asking
    takes at most :data:`PULL_SHARE` of the time."""
    waiting = set(grid.push_messages(messages))
    interval = float(getattr(grid, "pull_interval", 0.1))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while waiting and time.monotonic() < deadline:
        if STOP_REQUESTED.is_set():
            raise RunInterrupted("stopped on request")
        asked = time.monotonic()
        pulled = list(grid.pull_messages(waiting))
        asking = time.monotonic() - asked
        replies += pulled
        waiting -= {m.metadata.reply_to_message_id for m in pulled}
        if waiting:
            time.sleep(max(min(interval, MAX_PULL_WAIT), asking * (1 / PULL_SHARE - 1)))
    return replies


@dataclass
class Roster:
    """Who is in the federation: partition id -> node id, per role, and the data's shape."""

    train: dict[int, int]
    target: dict[int, int]
    channels: int
    image_size: int


def discover(grid: Grid, cfg: DictConfig) -> Roster:
    """Ask every connected node who it is; nodes that cannot load their data are left out."""
    node_ids = wait_for_nodes(grid, cfg)
    return roster_of(ask_nodes(grid, cfg, node_ids), cfg)


def wait_for_nodes(grid: Grid, cfg: DictConfig) -> list[int]:
    """The connected nodes once the federation's are all there, or as many as connected
    within ``federation.timeout`` (none: an error saying what to check)."""
    expected = cfg.federation.train_nodes + cfg.federation.target_nodes
    deadline = time.monotonic() + cfg.federation.timeout
    next_note = time.monotonic()
    while len(node_ids := list(grid.get_node_ids())) < expected:
        if time.monotonic() >= next_note:
            log(INFO, "waiting for nodes: %d of %d connected", len(node_ids), expected)
            next_note += 10
        if STOP_REQUESTED.is_set():
            raise RunInterrupted("stopped on request while waiting for nodes")
        if time.monotonic() > deadline:
            log(
                WARNING,
                "only %d of %d nodes connected; continuing with them",
                len(node_ids),
                expected,
            )
            break
        time.sleep(0.5)
    if not node_ids:
        raise FederationError(
            f"no node connected within federation.timeout={cfg.federation.timeout} s: start "
            "the SuperNodes (or check their address, certificates and keys)"
        )
    return node_ids


def ask_nodes(grid: Grid, cfg: DictConfig, node_ids: list[int]) -> list[Message]:
    """The usable discovery replies of ``node_ids`` (who each node is, its images' shape), by
    node id; each unusable one is logged with its reason."""
    config = ConfigRecord(encode_config(cfg, **{ROUND_KEY: 0, REG_WEIGHT_KEY: 0.0}))
    messages = [
        Message(RecordDict({CONFIG: config}), dst_node_id=node, message_type=MessageType.QUERY)
        for node in node_ids
    ]
    replies = sorted(
        exchange(grid, messages, cfg.federation.timeout), key=lambda m: m.metadata.src_node_id
    )
    if not replies:
        raise FederationError(
            f"none of the {len(node_ids)} connected nodes answered within "
            f"federation.timeout={cfg.federation.timeout} s (raise it for slow nodes)"
        )
    usable = []
    for reply in replies:
        if problem := node_problem(reply):
            log(WARNING, "node %d left out: %s", reply.metadata.src_node_id, problem)
        else:
            usable.append(reply)
    if not usable:
        raise FederationError("no node could take part (see the reasons above)")
    return usable


def roster_of(replies: list[Message], cfg: DictConfig) -> Roster:
    """Training and target nodes by partition from usable discovery replies: the images' shape
    is the most common one (a node with another is left out, as is a second node claiming a
    partition), and the run needs enough of each role."""
    shape_of = {
        m.metadata.src_node_id: (
            int(m.content[METRICS]["channels"]),
            int(m.content[METRICS]["image-size"]),
        )
        for m in replies
    }
    shape = Counter(shape_of.values()).most_common(1)[0][0]
    roster = Roster(train={}, target={}, channels=shape[0], image_size=shape[1])
    for reply in replies:
        node = reply.metadata.src_node_id
        info = reply.content[NODE]
        role, partition = str(info["role"]), int(info[PARTITION_KEY])
        members = roster.train if role == "train" else roster.target
        if shape_of[node] != shape:
            log(
                WARNING,
                "node %d left out: its images are %s, most nodes' %s (channels, size)",
                node,
                shape_of[node],
                shape,
            )
        elif partition in members:
            log(
                WARNING,
                "node %d left out: node %d already is %s partition %d",
                node,
                members[partition],
                role,
                partition,
            )
        else:
            members[partition] = node
    if len(roster.train) < cfg.federation.clients_per_round:
        raise FederationError(
            f"{len(roster.train)} training nodes answered, federation.clients_per_round is "
            f"{cfg.federation.clients_per_round}"
        )
    if not roster.target:
        raise FederationError("no target node answered: nothing to evaluate fast adaptation on")
    log(
        INFO,
        "federation: %d training nodes, %d target nodes, images %dx%dx%d",
        len(roster.train),
        len(roster.target),
        roster.channels,
        roster.image_size,
        roster.image_size,
    )
    return roster


def record_class_split(cfg: DictConfig, out_dir: Path) -> None:
    """Which classes meta-train and which are the target nodes' (held-out classes when the
    dataset has many), as ``class_split.json``. Deployed sites with their own data have no
    split of the run's dataset: then nothing is written."""
    try:
        dataset = load_dataset(cfg.dataset.name, cfg.dataset.path, cfg.dataset.image_size)
    except DatasetError as error:
        log(INFO, "no class split recorded (the server cannot read the dataset: %s)", error)
        return
    write_json(out_dir / "class_split.json", class_split(dataset, task_spec(cfg), cfg.seed))


def run_federation(
    grid: Grid, cfg: DictConfig, out_dir: Path, reporter: RoundReporter | None = None
) -> dict[str, Any]:
    """Run (or resume) the whole federation; returns the summary written to summary.json.
    ``reporter`` shows the progress (default: a line per round in Flower's log)."""
    run = FederatedRun(grid, cfg, out_dir, reporter or RoundReporter())
    try:  # the constructor has opened the tracker: close it whatever happens next
        run.train()
        summary = run.finish()
    except BaseException:
        run.abort()
        raise
    return summary


def strategy_for(cfg: DictConfig, spec: ModelSpec, roster: Roster) -> MetaLearningStrategy:
    """The run's strategy over the discovered nodes, at its initial parameters."""
    fed = cfg.federation
    return MetaLearningStrategy(
        server_step_for(cfg, run_parameters(cfg, spec)),
        roster.train,
        roster.target,
        clients_per_round=fed.clients_per_round,
        min_train_replies=fed.min_train_replies or fed.clients_per_round // 2 + 1,
        eval_nodes=fed.eval_nodes,
        seed=cfg.seed,
        expected_examples=weight_bound(cfg),
        gated_layers=spec.gated_layers,
        gated_channels=sum(g.out_channels for g in gate_shapes(spec))
        if strategy_of(cfg).gated
        else 0,
        regularizer_weight=RegularizerWeight(cfg),
    )


class FederatedRun:
    """One run in its folder: set up (or resumed) from the checkpoint, then trained round by
    round, then evaluated on every target node."""

    def __init__(self, grid: Grid, cfg: DictConfig, out_dir: Path, reporter: RoundReporter):
        self.started = time.monotonic()
        self.grid, self.cfg, self.out_dir, self.reporter = grid, cfg, out_dir, reporter
        self.checkpoint = out_dir / CHECKPOINT_NAME
        self.flat = to_flat(cfg)
        saved = self._claim_folder()
        if isinstance(grid, InMemoryGrid):  # simulation: polling a local queue is cheap
            grid.pull_interval = POLL_IN_SIMULATION
        roster = discover(grid, cfg)
        self.spec = spec_for(cfg, roster.channels, roster.image_size)
        self.strategy = strategy_for(cfg, self.spec, roster)
        # released per round under DP: the update sum, and with gates the deployed-ratio sum
        self.mechanisms = 2 if strategy_of(cfg).gated else 1
        self.history: list[dict[str, Any]] = []
        self.first_round, self.elapsed_before = 1, 0.0
        if saved is not None:
            self._resume(saved)
        self.strategy.summary()
        tracking = cfg.tracking
        self.tracker = make_tracker(
            tracking.backend, out_dir, self.flat, tracking.uri, tracking.experiment
        )
        self.arrays = self.strategy.arrays()

    def _claim_folder(self) -> dict[str, Any] | None:
        """Check the run folder (and the tracking store) before any node is asked, record the
        run's config and class split there; the checkpoint to resume from, if any."""
        cfg, out_dir = self.cfg, self.out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        saved = check_run_folder(out_dir, cfg.resume, self.flat)
        check_tracking_store(cfg.tracking.backend, cfg.tracking.uri)
        OmegaConf.save(cfg, out_dir / "config.yaml")
        record_class_split(cfg, out_dir)
        return saved

    def _resume(self, saved: dict[str, Any]) -> None:
        """The strategy's state, λ and the history as the checkpoint left them."""
        try:
            self.strategy.load_state_dict(saved["strategy"])
            self.strategy.regularizer_weight = RegularizerWeight.from_checkpoint(self.cfg, saved)
        except (ValueError, KeyError) as error:
            raise FederationError(f"{self.checkpoint} does not fit this run: {error}") from error
        out_dir = self.out_dir
        if "history" in saved and not (out_dir / HISTORY_LINES).exists():
            rewrite_history(out_dir, saved["history"])  # an earlier version kept it inside
        self.history = read_history(out_dir, saved["round"])
        rewrite_history(out_dir, self.history)
        self.first_round = saved["round"] + 1
        self.elapsed_before = saved["wall_seconds"]
        log(INFO, "resuming after round %d from %s", saved["round"], self.checkpoint)

    @property
    def regularizer(self) -> RegularizerWeight:
        """λ round by round: the strategy's, which every aggregated round moves."""
        assert self.strategy.regularizer_weight is not None
        return self.strategy.regularizer_weight

    # ------------------------------------------------------------------ rounds
    def round_config(self, server_round: int) -> ConfigRecord:
        weight = self.regularizer(server_round)
        return ConfigRecord(
            encode_config(self.flat, **{ROUND_KEY: server_round, REG_WEIGHT_KEY: weight})
        )

    def evaluate(self, server_round: int, everyone: bool) -> dict[str, Any]:
        """The target nodes' summary (:meth:`MetaLearningStrategy.summarize_evaluation`), or
        {} when none reported."""
        strategy, config = self.strategy, self.round_config(server_round)
        messages = list(
            strategy.configure_evaluate(server_round, self.arrays, config, self.grid, everyone)
        )
        replies = exchange(self.grid, messages, self.cfg.federation.timeout)
        return strategy.summarize_evaluation(server_round, replies) or {}

    def train_round(self, server_round: int) -> dict[str, Any]:
        """One round: sample, exchange, aggregate; the record for the history."""
        cfg, strategy = self.cfg, self.strategy
        config = self.round_config(server_round)
        messages = list(strategy.configure_train(server_round, self.arrays, config, self.grid))
        replies = exchange(self.grid, messages, cfg.federation.timeout)
        self.arrays, metrics = strategy.aggregate_train(server_round, replies)
        record: dict[str, Any] = {
            "round": server_round,
            "train_loss": metrics["query-loss"],
            "train_accuracy": metrics["query-accuracy"],
            "train_flops_ratio": metrics["flops-ratio"],
            "train_deployed_flops_ratio": metrics["deployed-flops-ratio"],
            "replies": metrics["replies"],
            "clipped": metrics["clipped"],
            "update_norm": metrics["update-norm"],
            "bytes_per_client": metrics["bytes-down"] + metrics["bytes-up"],
            "reg_weight": config[REG_WEIGHT_KEY],
        }
        # under DP what the clients measured is not released (the strategy left it as NaN)
        record = {k: v for k, v in record.items() if not (isinstance(v, float) and v != v)}
        if (noise := cfg.privacy.noise_multiplier) > 0:
            record["epsilon"] = epsilon(noise, server_round, cfg.privacy.delta, self.mechanisms)
        return record

    def train(self) -> None:
        fed = self.cfg.federation
        self.reporter.start(fed.rounds, self.first_round)
        for server_round in range(self.first_round, fed.rounds + 1):
            round_start = time.monotonic()
            record = self.train_round(server_round)
            final = server_round == fed.rounds
            if not final and server_round % fed.eval_every == 0:
                record.update(scalar_figures(self.evaluate(server_round, everyone=False)))
            record["seconds"] = time.monotonic() - round_start
            self.history.append(record)
            append_history(self.out_dir, record)
            if not final:
                self.reporter.round(record)
                self.tracker.round(record)
            self.state = {
                "round": server_round,
                "strategy": self.strategy.state_dict(),
                REGULARIZER_STATE: self.regularizer.state_dict(),
                "config": self.flat,
                "wall_seconds": self.elapsed_before + time.monotonic() - self.started,
            }
            save_checkpoint(self.checkpoint, self.state)

    # ------------------------------------------------------------------ results
    def finish(self) -> dict[str, Any]:
        """The final evaluation and the run's results.

        It comes after the last round's checkpoint, so a run interrupted during it resumes
        straight into it, and resume=true on a finished run evaluates its final parameters
        again. Its result joins the last round's history record (kept by a later extension to
        more rounds); wall_seconds stays the training time.
        """
        cfg, fed, out_dir, history = self.cfg, self.cfg.federation, self.out_dir, self.history
        evaluation_start = time.monotonic()
        final_eval = self.evaluate(fed.rounds, everyone=True)
        final_record: dict[str, Any] = scalar_figures(final_eval)
        final_record["evaluation_seconds"] = time.monotonic() - evaluation_start
        history[-1].update(final_record)
        append_history(out_dir, {"round": fed.rounds, **final_record})
        self.reporter.round(history[-1])
        self.reporter.close()
        self.tracker.round(history[-1])
        write_json(out_dir / "history.json", history)
        if not final_eval:
            raise FederationError("the final evaluation got no result from any target node")
        write_json(out_dir / TASK_ACCURACY_FILE, final_eval["task_accuracy"])
        summary = {
            "strategy": str(cfg.strategy.name),
            "dataset": str(cfg.dataset.name),
            "rounds": fed.rounds,
            **{k: final_eval[k] for k in SUMMARY_KEYS if k in final_eval},
            "wall_seconds": self.elapsed_before + time.monotonic() - self.started,
            "seconds_per_round": float(np.median([h["seconds"] for h in history])),
            "bytes_per_client_round": float(np.mean([h["bytes_per_client"] for h in history])),
            "layer_active": final_eval["layer_active"],
            **{k: final_eval[k] for k in CONDITIONALITY_KEYS if k in final_eval},
            "ways": cfg.task.ways,
            "shots": cfg.task.shots,
            "seed": cfg.seed,
        }
        if (noise := cfg.privacy.noise_multiplier) > 0:
            summary["epsilon"] = epsilon(noise, fed.rounds, cfg.privacy.delta, self.mechanisms)
            summary["delta"] = cfg.privacy.delta
        if served := self.strategy.served:  # a simulation on Ray: its replies per Ray node
            summary["replies_per_ray_node"] = dict(sorted(served.items()))
            log(INFO, "ClientApp replies per Ray node: %s", summary["replies_per_ray_node"])
        write_json(out_dir / "summary.json", summary)
        plots = plot_history(history, out_dir, cfg.gating.target_ratio) if cfg.output.plots else []
        self.tracker.finish(summary, [*plots, out_dir / "summary.json", out_dir / "history.json"])
        ci95 = summary["accuracy_ci95"]
        log(
            INFO,
            "results in %s: accuracy %.4f %s (before %.4f, nearest centroid %.4f), "
            "flops_ratio %.3f",
            out_dir,
            summary["accuracy"],
            "(one target task: no interval)" if math.isnan(ci95) else f"± {ci95:.4f}",
            summary["accuracy_before"],
            summary["nearest_centroid_accuracy"],
            summary["flops_ratio"],
        )
        return summary

    def abort(self) -> None:
        self.reporter.close()
        self.tracker.abort()
