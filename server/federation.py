"""The server's round loop: discover nodes, meta-train, evaluate target nodes, keep results.

Shared by simulation (``simulate.py``), ``flwr run .`` and deployments; it only talks to a Grid.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from omegaconf import DictConfig, OmegaConf

from conf.choices import Weighting
from conf.schema import to_flat
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
from gating.federated.round import server_step_for
from gating.federated.settings import initial_parameters, regularizer_weight, spec_for
from gating.federated.updates import expected_examples
from gating.model import dense_macs
from server.checkpoint import (
    CHECKPOINT_NAME,
    append_history,
    check_run_folder,
    read_history,
    rewrite_history,
    save_checkpoint,
)
from server.results import SUMMARY_KEYS, TASK_ACCURACY_FILE, plot_history, write_json
from server.strategy import MetaLearningStrategy


class FederationError(RuntimeError):
    """The federation cannot run as configured (missing nodes, inconsistent data, ...)."""


class RunInterrupted(RuntimeError):
    """Stopped on request (Ctrl-C, SIGTERM); the last completed round's checkpoint is kept."""


#: Set (e.g. by a signal handler) to stop the run at the next poll, within a fraction of a
#: second, instead of after Flower's reply timeout.
STOP_REQUESTED = threading.Event()


def exchange(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """``grid.send_and_receive`` that gives up when :data:`STOP_REQUESTED` is set."""
    waiting = set(grid.push_messages(messages))
    interval = float(getattr(grid, "pull_interval", 0.1))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while waiting and time.monotonic() < deadline:
        if STOP_REQUESTED.is_set():
            raise RunInterrupted("stopped on request")
        pulled = list(grid.pull_messages(waiting))
        replies += pulled
        waiting -= {m.metadata.reply_to_message_id for m in pulled}
        if waiting:
            time.sleep(min(interval, 0.5))
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
    config = ConfigRecord(encode_config(cfg, **{ROUND_KEY: 0, REG_WEIGHT_KEY: 0.0}))
    messages = [
        Message(RecordDict({CONFIG: config}), dst_node_id=node, message_type=MessageType.QUERY)
        for node in node_ids
    ]
    roster = Roster(train={}, target={}, channels=0, image_size=0)
    shapes = set()
    for reply in exchange(grid, messages, cfg.federation.timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log(
                WARNING,
                "node %d left out: it could not set up its task: %s",
                node,
                reply.error.reason,
            )
            continue
        info, metrics = reply.content[NODE], reply.content[METRICS]
        role, partition = str(info["role"]), int(info[PARTITION_KEY])
        members = roster.train if role == "train" else roster.target
        if partition in members:
            raise FederationError(f"two nodes claim {role} partition {partition}")
        members[partition] = node
        shapes.add((int(metrics["channels"]), int(metrics["image-size"])))
    if len(shapes) > 1:
        raise FederationError(
            f"nodes disagree on the image shape (channels, size): {sorted(shapes)}"
        )
    if len(roster.train) < cfg.federation.clients_per_round:
        raise FederationError(
            f"{len(roster.train)} training nodes answered, federation.clients_per_round is "
            f"{cfg.federation.clients_per_round}"
        )
    if not roster.target:
        raise FederationError("no target node answered: nothing to evaluate fast adaptation on")
    roster.channels, roster.image_size = shapes.pop()
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


def run_federation(grid: Grid, cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run (or resume) the whole federation; returns the summary written to summary.json."""
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    flat = to_flat(cfg)
    saved = check_run_folder(out_dir, cfg.resume, flat)
    OmegaConf.save(cfg, out_dir / "config.yaml")

    if type(grid).__name__ == "InMemoryGrid":  # simulation: polling a local queue is cheap
        grid.pull_interval = 0.01  # Flower's 0.1 s default costs up to that much per exchange
    roster = discover(grid, cfg)
    spec = spec_for(cfg, roster.channels, roster.image_size)
    fed = cfg.federation
    strategy = MetaLearningStrategy(
        server_step_for(cfg, initial_parameters(spec, cfg.seed)),
        roster.train,
        roster.target,
        clients_per_round=fed.clients_per_round,
        min_train_replies=fed.min_train_replies or fed.clients_per_round // 2 + 1,
        eval_nodes=fed.eval_nodes,
        seed=cfg.seed,
        expected_examples=(
            None if cfg.robust.weighting is Weighting.claimed else expected_examples(cfg)
        ),
        gated_layers=spec.gated_layers,
    )
    history: list[dict[str, Any]] = []
    first_round, elapsed_before = 1, 0.0
    if saved is not None:
        try:
            strategy.load_state_dict(saved["strategy"])
        except (ValueError, KeyError) as error:
            raise FederationError(f"{checkpoint_path} does not fit this run: {error}") from error
        history, first_round = read_history(out_dir, saved["round"]), saved["round"] + 1
        rewrite_history(out_dir, history)
        elapsed_before = saved["wall_seconds"]
        log(INFO, "resuming after round %d from %s", saved["round"], checkpoint_path)
    strategy.summary()

    def evaluate(server_round: int, arrays, config, everyone: bool) -> dict[str, float]:
        messages = list(strategy.configure_evaluate(server_round, arrays, config, grid, everyone))
        replies = exchange(grid, messages, fed.timeout)
        evaluation = strategy.aggregate_evaluate(server_round, replies)
        return {} if evaluation is None else {k: float(v) for k, v in evaluation.items()}

    def round_config(server_round: int):
        weight = regularizer_weight(cfg, server_round)
        return ConfigRecord(
            encode_config(flat, **{ROUND_KEY: server_round, REG_WEIGHT_KEY: weight})
        )

    arrays, state = strategy.arrays(), saved
    for server_round in range(first_round, fed.rounds + 1):
        round_start = time.monotonic()
        config = round_config(server_round)
        messages = list(strategy.configure_train(server_round, arrays, config, grid))
        replies = exchange(grid, messages, fed.timeout)
        arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        record: dict[str, Any] = {
            "round": server_round,
            "train_loss": train_metrics["query-loss"],
            "train_accuracy": train_metrics["query-accuracy"],
            "train_flops_ratio": train_metrics["flops-ratio"],
            "replies": train_metrics["replies"],
            "clipped": train_metrics["clipped"],
            "update_norm": train_metrics["update-norm"],
            "bytes_per_client": train_metrics["bytes-down"] + train_metrics["bytes-up"],
            "reg_weight": config[REG_WEIGHT_KEY],
        }
        if cfg.privacy.noise_multiplier > 0:
            record["epsilon"] = epsilon(
                cfg.privacy.noise_multiplier, server_round, cfg.privacy.delta
            )
        final = server_round == fed.rounds
        if not final and server_round % fed.eval_every == 0:
            record.update(evaluate(server_round, arrays, config, everyone=False))
        record["seconds"] = time.monotonic() - round_start
        history.append(record)
        if not final:
            _log_round(record, fed.rounds)
        append_history(out_dir, record)
        state = {
            "round": server_round,
            "strategy": strategy.state_dict(),
            "config": flat,
            "wall_seconds": elapsed_before + time.monotonic() - started,
        }
        save_checkpoint(checkpoint_path, state)

    # The final evaluation (every target node) comes after the last round's checkpoint, so a
    # run interrupted during it resumes straight into it, and resume=true on a finished run
    # evaluates its final parameters again. Its result then joins the last round's history
    # record (kept by a later extension to more rounds); wall_seconds stays the training time.
    evaluation_start = time.monotonic()
    strategy.last_evaluation = {}  # a periodic evaluation's result must not pass for the final one
    final_record = evaluate(fed.rounds, arrays, round_config(fed.rounds), everyone=True)
    final_record["evaluation_seconds"] = time.monotonic() - evaluation_start
    history[-1].update(final_record)
    append_history(out_dir, {"round": fed.rounds, **final_record})
    _log_round(history[-1], fed.rounds)
    write_json(out_dir / "history.json", history)
    final_eval = strategy.last_evaluation
    if not final_eval:
        raise FederationError("the final evaluation got no result from any target node")
    write_json(out_dir / TASK_ACCURACY_FILE, final_eval["task_accuracy"])
    summary = {
        "strategy": str(cfg.strategy.name),
        "dataset": str(cfg.dataset.name),
        "rounds": fed.rounds,
        **{k: final_eval[k] for k in SUMMARY_KEYS if k in final_eval},
        "dense_macs": dense_macs(spec),
        "wall_seconds": elapsed_before + time.monotonic() - started,
        "seconds_per_round": float(np.median([h["seconds"] for h in history])),
        "bytes_per_client_round": float(np.mean([h["bytes_per_client"] for h in history])),
        "layer_active": final_eval["layer_active"],
        "ways": cfg.task.ways,
        "shots": cfg.task.shots,
        "seed": cfg.seed,
    }
    if cfg.privacy.noise_multiplier > 0:
        summary["epsilon"] = epsilon(cfg.privacy.noise_multiplier, fed.rounds, cfg.privacy.delta)
        summary["delta"] = cfg.privacy.delta
    write_json(out_dir / "summary.json", summary)
    if cfg.output.plots:
        plot_history(history, out_dir)
    log(
        INFO,
        "results in %s: accuracy %.4f ± %.4f (before %.4f, nearest centroid %.4f), "
        "flops_ratio %.3f",
        out_dir,
        summary["accuracy"],
        summary["accuracy_ci95"],
        summary["accuracy_before"],
        summary["nearest_centroid_accuracy"],
        summary["flops_ratio"],
    )
    return summary


def _log_round(record: dict[str, Any], rounds: int) -> None:
    line = (
        f"[round {record['round']}/{rounds}] train loss {record['train_loss']:.3f} "
        f"acc {record['train_accuracy']:.3f} flops {record['train_flops_ratio']:.3f}"
    )
    if "accuracy" in record:
        line += (
            f" | target acc {record['accuracy']:.3f} (before {record['accuracy_before']:.3f}) "
            f"flops {record['flops_ratio']:.3f}"
        )
    log(INFO, "%s | %.2fs", line, record["seconds"])
