"""Sliced gated ResNet inference: batch-1 CPU latency of an adapted gated ResNet run on its open
channels only, against the same network's dense pass, both in PyTorch ops.

    python benchmarks/gated_resnet_inference.py --run-dir RUN [--nodes 4]   # a finished run
    python benchmarks/gated_resnet_inference.py --widths 16-32-64-128       # random gates

With ``--run-dir`` (a finished ``simulate.py model=resnet12 ...`` run) each of ``--nodes``
held-out target nodes runs the one two-stage ``Adapt`` exactly as its ClientApp does
(``analysis.export.adapt_node``) and its query images are the measured inputs. Without it, a
randomly initialized gated ResNet whose gates open ``--open`` of each block's channels is
measured on random inputs (the cost structure only).

Variants, timed interleaved (``gated_inference.time_interleaved``; medians):
  torch_dense    every channel (``SlicedGatedResNet.forward_dense``)
  torch_sliced   the adapted gated network, open channels only  <- the product
  masked_dense   GatedResNet in GateMode.EVAL (closed channels multiplied by 0)
  module_dense   GatedResNet in GateMode.OFF
speedup = torch_dense / torch_sliced; efficiency = speedup * flops_ratio. There is no C engine
for the ResNets (gating/deploy/native.py runs Conv-N), so this measures slicing in PyTorch ops.
torch.set_num_threads(1) (``--threads``). The last line is ``RESULT key=value ...``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gated_inference import (  # benchmarks/ (the script's folder is on sys.path)
    latency_table,
    time_interleaved,
)
from host import describe_host

from analysis.export import adapt_node, load_run
from conf.choices import ModelArch
from gating.deploy import SlicedGatedResNet
from gating.model import GatedResNet, GateMode, ModelSpec, NormStats

NAMES = ["torch_dense", "torch_sliced", "masked_dense", "module_dense"]


def variants(sliced: SlicedGatedResNet, module: GatedResNet) -> tuple:
    stats = NormStats() if sliced.statistics is None else NormStats(frozen=sliced.statistics)

    def masked_dense(x: torch.Tensor) -> torch.Tensor:
        return module(x, mode=GateMode.EVAL, stats=stats).logits

    def module_dense(x: torch.Tensor) -> torch.Tensor:
        return module(x, mode=GateMode.OFF, stats=stats).logits

    return sliced.forward_dense, sliced.forward, masked_dense, module_dense


def module_of(sliced: SlicedGatedResNet) -> GatedResNet:
    module = GatedResNet(sliced.spec)
    module.load_state_dict(sliced.params, strict=True)
    return module.eval()


def run_cases(run_dir: Path, nodes: int, log) -> list[tuple[SlicedGatedResNet, list[torch.Tensor]]]:
    cfg, params, server_round, reg_weight = load_run(run_dir)
    first = cfg.federation.train_nodes
    cases = []
    for partition in range(first, first + min(nodes, cfg.federation.target_nodes)):
        export = adapt_node(cfg, params, partition, server_round, reg_weight, backend="torch")
        if not isinstance(export.model, SlicedGatedResNet):
            raise SystemExit(f"{run_dir} is not a ResNet run: use benchmarks/gated_inference.py")
        assert export.query_x is not None
        inputs = [export.query_x[i : i + 1].contiguous() for i in range(len(export.query_x))]
        cases.append((export.model, inputs))
        log(
            f"node {partition}: query accuracy sliced {export.accuracy:.3f} = masked dense "
            f"batch-1 {export.masked_dense_accuracy:.3f} (max |dlogit| "
            f"{export.max_logit_difference:.1e})"
        )
    log(f"model: run {run_dir} (round {server_round}), {cases[0][0].spec.describe()}")
    return cases


def synthetic_cases(args: argparse.Namespace) -> list[tuple[SlicedGatedResNet, list[torch.Tensor]]]:
    """A random gated ResNet whose gates open a fixed share ``--open`` of their channels."""
    spec = ModelSpec(
        in_channels=args.channels,
        image_size=args.image_size,
        arch=ModelArch(args.arch),
        widths=tuple(int(w) for w in args.widths.split("-")),
    )
    torch.manual_seed(args.seed)
    net = GatedResNet(spec)
    with torch.no_grad():
        for gate in net.gate:
            size = gate.fc2.bias.numel()
            bias = torch.full((size,), -1.0)
            bias[torch.randperm(size)[: max(1, round(args.open * size))]] = 1.0
            gate.fc2.weight.zero_()
            gate.fc2.bias.copy_(bias)
    params = {n: p.detach() for n, p in net.named_parameters()}
    inputs = [torch.randn(1, spec.in_channels, spec.image_size, spec.image_size) for _ in range(20)]
    return [(SlicedGatedResNet(spec, params), inputs)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, help="a finished ResNet run of simulate.py")
    parser.add_argument("--nodes", type=int, default=4, help="target nodes to adapt and measure")
    parser.add_argument("--arch", default="resnet12", help="without --run-dir: resnet12|resnet18")
    parser.add_argument("--widths", default="16-32-64-128", help="without --run-dir")
    parser.add_argument("--image-size", type=int, default=32, help="without --run-dir")
    parser.add_argument("--channels", type=int, default=3, help="without --run-dir")
    parser.add_argument("--open", type=float, default=0.5, help="without --run-dir: open share")
    parser.add_argument("--reps", type=int, default=10, help="passes over the measured inputs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, flush=True)

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    cases = run_cases(args.run_dir, args.nodes, log) if args.run_dir else synthetic_cases(args)
    log(f"machine: {describe_host()}")
    jobs, inputs, ratios = [], [], []
    for sliced, xs in cases:
        fns = variants(sliced, module_of(sliced))
        for x in xs:
            jobs.append(fns)
            inputs.append(x)
            ratios.append(sliced.flops_ratio(sliced.forward_with_open(x)[1]))
    times = time_interleaved(jobs, NAMES, inputs, args.reps, args.seed)
    med = {n: statistics.median(times[n]) for n in NAMES}
    flops_ratio = float(np.mean(ratios))
    speedup = med["torch_dense"] / med["torch_sliced"]

    log("")
    log(f"## Batch-1 latency, {cases[0][0].spec.describe()}, {len(inputs)} inputs x {args.reps}")
    log("")
    for line in latency_table(times, NAMES, "torch_dense"):
        log(line)
    log("")
    log(f"realized flops_ratio {flops_ratio:.3f} (MACs incl. gates)")
    log(f"total {time.perf_counter() - started:.0f}s")
    print(
        f"RESULT speedup={speedup:.3f} flops_ratio={flops_ratio:.3f} "
        f"efficiency={speedup * flops_ratio:.3f} dense_us={med['torch_dense']:.1f} "
        f"sliced_us={med['torch_sliced']:.1f} masked_dense_us={med['masked_dense']:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
