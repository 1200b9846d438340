"""How a run shows its progress: a bar on a terminal, periodic lines elsewhere, every round in
the log.

The bar (tqdm) shows the elapsed time, the ETA and the last training loss, target accuracy and
flops_ratio; each round's full line goes to the ``metagater.rounds`` logger (``simulate.py``
sends it to the run's log file). Where the output is not a terminal (CI, a pipe) the bar would
be noise, so a plain line is printed every ``every`` rounds and at every evaluation instead.
Without a reporter (``flwr run``, deployments) the ServerApp logs every round through Flower's
logger, as its console is a log anyway.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from typing import Any, TextIO

from flwr.common.logger import log
from tqdm import tqdm

ROUNDS = logging.getLogger("metagater.rounds")


def _figure(record: dict[str, Any], key: str) -> str:
    """A training figure, or "-" where the run does not release it (under DP)."""
    return f"{record[key]:.3f}" if key in record else "-"


def round_line(record: dict[str, Any], rounds: int) -> str:
    line = (
        f"[round {record['round']}/{rounds}] train loss {_figure(record, 'train_loss')} "
        f"acc {_figure(record, 'train_accuracy')} flops {_figure(record, 'train_flops_ratio')}"
    )
    if "accuracy" in record:
        line += (
            f" | target acc {record['accuracy']:.3f} (before {record['accuracy_before']:.3f}) "
            f"flops {record['flops_ratio']:.3f}"
        )
    return f"{line} | {record['seconds']:.2f}s"


def _columns(stream: TextIO) -> int:
    """The terminal's width (a pseudo-terminal of size 0 cannot show a bar)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return 80  # a stream without a file descriptor that says it is a terminal


class RoundReporter:
    """Every round as a line of Flower's log (the ServerApp's console under ``flwr run``)."""

    def start(self, rounds: int, first_round: int) -> None:
        self.rounds = rounds

    def round(self, record: dict[str, Any]) -> None:
        log(logging.INFO, "%s", round_line(record, self.rounds))

    def close(self) -> None:
        pass


class ProgressReporter(RoundReporter):
    """A bar where ``stream`` is a terminal, else a line every ``every`` rounds; the full line
    of every round goes to :data:`ROUNDS`."""

    def __init__(self, stream: TextIO | None = None, every: int | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty() and _columns(self.stream) > 0
        self.every = every
        self.bar: tqdm | None = None
        self.last_accuracy: float | None = None

    def start(self, rounds: int, first_round: int) -> None:
        super().start(rounds, first_round)
        if self.every is None:
            self.every = max(1, rounds // 20)
        if self.interactive:
            self.bar = tqdm(
                total=rounds,
                initial=first_round - 1,
                desc="rounds",
                unit="round",
                file=self.stream,
                dynamic_ncols=True,
            )

    def round(self, record: dict[str, Any]) -> None:
        line = round_line(record, self.rounds)
        ROUNDS.info("%s", line)
        if self.bar is not None:
            shown = {
                "loss": _figure(record, "train_loss"),
                "flops": f"{record['train_flops_ratio']:.2f}",
            }
            if "accuracy" in record:
                self.last_accuracy = record["accuracy"]
            if self.last_accuracy is not None:
                shown["target acc"] = f"{self.last_accuracy:.3f}"
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(max(0, record["round"] - self.bar.n))
        elif record["round"] % self.every == 0 or "accuracy" in record:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
