"""Print a model's per-layer MAC table: dense, and realized on a batch of real images.

python -m gating.mac_table --dataset fashion_mnist --width 32 --depth 4
python -m gating.mac_table --image-size 84 --in-channels 3      # dense only

A missing or malformed dataset, or a bad argument, is one line ``Error: ...`` on stderr and exit
status 2 (as ``simulate.py``), not a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

import torch

from gating.data import DatasetError, load_dataset
from gating.model import GatedConvNet, GateMode, LayerTrace, ModelSpec
from gating.model.macs import (
    active_counts,
    dense_macs,
    gate_macs,
    layer_costs,
    macs_per_layer,
    realized_macs,
)


def format_table(spec: ModelSpec, trace: list[LayerTrace] | None = None) -> str:
    """Dense MACs per layer and, given a gated forward trace, realized MACs averaged per input."""
    costs = layer_costs(spec)
    rows = [("layer", "in->out", "positions", "dense MACs", "realized MACs", "active out")]
    realized_by_layer: list[float] = []
    if trace is not None:
        batch = trace[0].mask.shape[0]
        counts = active_counts(spec, trace, batch, "cpu", torch.float64)
        realized_by_layer = [float(m.mean()) for m in macs_per_layer(spec, counts)]
    for index, cost in enumerate(costs):
        realized = f"{realized_by_layer[index]:,.0f}" if trace is not None else "-"
        active = "-"
        if trace is not None and index < len(trace):
            active = f"{float(trace[index].mask.mean()):.3f}"
        rows.append(
            (
                cost.name,
                f"{cost.in_channels}->{cost.out_channels}",
                str(cost.spatial),
                f"{cost.dense_macs:,}",
                realized,
                active,
            )
        )
    dense = dense_macs(spec)
    if trace is not None:
        rows.append(("gates", "", "", "-", f"{gate_macs(spec):,}", ""))
        total = float(realized_macs(spec, trace).mean())
        rows.append(("total", "", "", f"{dense:,}", f"{total:,.0f}", f"ratio {total / dense:.4f}"))
    else:
        rows.append(("total", "", "", f"{dense:,}", f"(+{gate_macs(spec):,} gates)", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines) + "\n(1 MAC = one multiply-add; per input)"


class _Refused(Exception):
    """An expected failure: the user's to fix, reported as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one ``Error: ...`` line (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        raise _Refused(f"{message} (see python -m gating.mac_table --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; 0, or 2 after one ``Error: ...`` line on stderr."""
    try:
        table(argv)
    except _Refused as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    return 0


def table(argv: Sequence[str] | None = None) -> None:
    parser = _Parser(prog="python -m gating.mac_table", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="real images to run through a fresh model (e.g. digits)")
    parser.add_argument("--path", help="dataset folder or file, where the dataset needs one")
    parser.add_argument("--image-size", type=_positive_int, default=28)
    parser.add_argument("--in-channels", type=_positive_int, default=1)
    parser.add_argument("--width", type=_positive_int, default=32)
    parser.add_argument("--depth", type=_positive_int, default=4)
    parser.add_argument("--classes", type=_positive_int, default=5)
    parser.add_argument("--batch", type=_positive_int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.path is not None and not args.dataset:
        parser.error("--path needs --dataset (which dataset the path holds)")

    images = None
    if args.dataset:
        try:
            data = load_dataset(args.dataset, args.path)
        except DatasetError as error:  # missing, malformed: the message says what to do
            raise _Refused(str(error)) from error
        generator = torch.Generator().manual_seed(args.seed)
        pick = torch.randperm(len(data.images), generator=generator)[: args.batch]
        images = torch.from_numpy(data.images[pick.numpy()].copy())
        channels, size, _ = data.image_shape
        args.in_channels, args.image_size = channels, size
    try:
        spec = ModelSpec(
            in_channels=args.in_channels,
            image_size=args.image_size,
            num_classes=args.classes,
            width=args.width,
            depth=args.depth,
        )
    except ValueError as error:  # an impossible model
        raise _Refused(str(error)) from error
    print(
        f"Conv-{spec.depth} width {spec.width}, input {spec.in_channels}x{spec.image_size}x"
        f"{spec.image_size}, {spec.num_classes} classes"
    )
    trace = None
    if images is not None:
        torch.manual_seed(args.seed)
        model = GatedConvNet(spec).eval()
        with torch.no_grad():
            trace = model(images, mode=GateMode.EVAL).trace
        print(f"realized on {len(images)} {args.dataset} images, fresh model, deterministic gates")
    print(format_table(spec, trace))


if __name__ == "__main__":
    sys.exit(main())
