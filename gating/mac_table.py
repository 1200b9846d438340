"""Print a model's per-layer MAC table: dense, and realized on a batch of real images.

python -m gating.mac_table --dataset fashion_mnist --width 32 --depth 4
python -m gating.mac_table --image-size 84 --in-channels 3      # dense only
"""

from __future__ import annotations

import argparse

import torch

from gating.data import load_dataset
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="real images to run through a fresh model (e.g. digits)")
    parser.add_argument("--path", help="dataset folder or file, where the dataset needs one")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    images = None
    if args.dataset:
        data = load_dataset(args.dataset, args.path)
        generator = torch.Generator().manual_seed(args.seed)
        pick = torch.randperm(len(data.images), generator=generator)[: args.batch]
        images = torch.from_numpy(data.images[pick.numpy()].copy())
        channels, size, _ = data.image_shape
        args.in_channels, args.image_size = channels, size
    spec = ModelSpec(
        in_channels=args.in_channels,
        image_size=args.image_size,
        num_classes=args.classes,
        width=args.width,
        depth=args.depth,
    )
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
    main()
