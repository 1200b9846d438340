"""Which channels open, for a few inputs of a few nodes: a picture of conditional gating.

    python -m analysis.gate_map RUN_DIR --partitions 50 51 --inputs 15 --out gate_map.png

Each node runs the one two-stage ``Adapt`` from the run's final meta-initialization exactly as
its ClientApp does (``analysis.export.adapt_node``), then classifies ``--inputs`` of its query
images (the first few of each class) one at a time with the exported sliced model. One panel
per node: a row per input (its class on the left), a column per gated channel, grouped by
layer; dark = open. A static mask paints vertical stripes, the same in every panel;
conditional gates paint rows that differ.
The last line is ``RESULT`` with each node's share of channels that change between its rows.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np

from analysis.export import adapt_node, load_run
from gating.model import gate_shapes

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure


def open_matrix(
    run_dir: Path, partition: int, inputs: int
) -> tuple[np.ndarray, list[int], list[int]]:
    """(inputs x gated channels) 0/1 of what the node's exported model opened, the inputs'
    global classes, and the channels of each gate."""
    cfg, params, server_round, reg_weight = load_run(run_dir)
    node = adapt_node(cfg, params, partition, server_round, reg_weight)
    assert node.query_x is not None and node.query_y is not None
    labels = node.query_y.numpy()
    rank = np.array([int(np.sum(labels[:i] == labels[i])) for i in range(len(labels))])
    picked = np.lexsort((labels, rank))[:inputs]  # each class's first input, then its second...
    order = picked[np.lexsort((rank[picked], labels[picked]))]  # shown grouped by class
    channels = [shape.out_channels for shape in gate_shapes(node.model.spec)]
    rows = []
    for index in order:
        _, opened = node.model.forward_with_open(node.query_x[int(index) : int(index) + 1])
        row = np.zeros(sum(channels))
        offsets = np.cumsum([0, *channels[:-1]])
        for offset, layer in zip(offsets, opened, strict=True):
            row[offset + np.asarray(layer, dtype=int)] = 1
        rows.append(row)
    classes = [node.classes[int(node.query_y[int(i)])] for i in order]
    return np.stack(rows), classes, channels


def gate_map_figure(panels: dict[int, tuple[np.ndarray, list[int]]], channels: list[int]) -> Figure:
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(10, 1.2 + 0.22 * sum(len(m) for m, _ in panels.values())),
        squeeze=False,
    )
    for ax, (partition, (matrix, classes)) in zip(axes[:, 0], panels.items(), strict=True):
        ax.imshow(matrix, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        for boundary in np.cumsum(channels)[:-1]:
            ax.axvline(boundary - 0.5, color="tab:red", linewidth=1)
        ax.set_yticks(range(len(classes)), [f"class {c}" for c in classes], fontsize=7)
        varying = float(np.mean(matrix.min(0) != matrix.max(0)))
        ax.set_title(
            f"node {partition}: {varying:.0%} of gated channels differ between these inputs",
            fontsize=9,
        )
        centers = np.cumsum(channels) - np.asarray(channels) / 2 - 0.5
        ax.set_xticks(centers, [f"gate {i + 1}" for i in range(len(channels))], fontsize=8)
    fig.suptitle("open channels (dark) per query input, deterministic gates after Adapt")
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.gate_map", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--partitions", type=int, nargs="+", required=True)
    parser.add_argument("--inputs", type=int, default=15, help="query inputs per node")
    parser.add_argument("--out", type=Path, default=Path("gate_map.png"))
    args = parser.parse_args(argv)
    try:
        opened = {p: open_matrix(args.run_dir, p, args.inputs) for p in args.partitions}
    except (FileNotFoundError, ValueError) as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    panels = {p: (matrix, classes) for p, (matrix, classes, _) in opened.items()}
    channels = next(iter(opened.values()))[2]
    figure = gate_map_figure(panels, channels)
    figure.savefig(args.out, dpi=110, bbox_inches="tight")
    shares = {p: float(np.mean(m.min(0) != m.max(0))) for p, (m, _) in panels.items()}
    print(f"wrote {args.out}")
    print("RESULT " + " ".join(f"node{p}_varying={v:.3f}" for p, v in shares.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
