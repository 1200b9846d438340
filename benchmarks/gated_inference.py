"""Real gated inference: batch-1 CPU latency of the adapted gated network run on its open
channels only (weights sliced by the realized masks, no multiply-by-zero) against the dense one.

    python benchmarks/gated_inference.py                        # meta-trains a model here (A)
    python benchmarks/gated_inference.py --run-dir RUN [--nodes 4]   # a finished run (B)

(A) meta-trains MetaGater in-process on Fashion-MNIST tasks (``gating.federated.round``: the
federation's round without Flower): first-order meta-gradients (the ``metagater_fo``
strategy), target ratio 0.5 with the lambda warm-up, separate Adam optimizers for backbone and
gates, 4 training nodes per step.
(B) takes the meta-initialization of a finished ``python simulate.py dataset=fashion_mnist ...``
run. Either way each of ``--nodes`` held-out target nodes runs the one two-stage ``Adapt`` on its
fixed support set exactly as its ClientApp does (``analysis.export.adapt_node``); the measured
inputs are those nodes' query images.

Variants, timed interleaved (each input runs every variant of its group in rotating order;
medians); the first two form one group, the PyTorch ones another:
  dense          the plain backbone, every channel, on the C++ engine of gating/deploy/
  sliced         the adapted gated network, open channels only, same engine  <- the product
  masked_dense   GatedConvNet in GateMode.EVAL (PyTorch; closed channels multiplied by 0)
  module_dense   GatedConvNet in GateMode.OFF (PyTorch)
  torch_dense / torch_sliced   the same two algorithms as dense/sliced in PyTorch ops
speedup = dense / sliced (same engine, so the ratio is the slicing, not the engine);
flops_ratio = realized MACs (gates included) / dense MACs, averaged over the measured inputs;
efficiency = speedup * flops_ratio (1 = latency falls exactly as the MAC count).
torch.set_num_threads(1) (``--threads``): one core, as on an edge device; the C engine is
single-threaded. The last line is ``RESULT key=value ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from host import describe_host  # benchmarks/host.py (the script's folder is on sys.path)
from omegaconf import DictConfig

from analysis.export import Export, adapt_node, load_run
from conf.choices import StrategyName
from conf.schema import default_config, validate
from gating.deploy import SlicedGatedNet, native_available
from gating.federated.round import BareFederation, BareRound
from gating.model import GatedConvNet, GateMode, ModelSpec, dense_macs, layer_costs

Params = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- model (A or B)


def train_config(args: argparse.Namespace) -> DictConfig:
    """Option A's run configuration: the project's schema with the benchmark's choices."""
    cfg = default_config()
    cfg.dataset.name = "fashion_mnist"
    cfg.dataset.path = args.data
    cfg.strategy.name = StrategyName.metagater_fo
    cfg.meta.first_order = True  # about 3x cheaper per step than second order on this CPU
    cfg.meta.backbone_lr = args.backbone_lr
    cfg.meta.gate_lr = args.gate_lr
    cfg.gating.target_ratio = 0.5
    cfg.gating.warmup_rounds = max(1, args.steps // 5)
    cfg.federation.train_nodes = 20
    cfg.federation.target_nodes = max(args.nodes, 4)
    cfg.federation.clients_per_round = 4
    cfg.federation.rounds = args.steps
    cfg.seed = args.seed
    return validate(cfg)


def meta_train(cfg: DictConfig, log: Callable[[str], None]) -> tuple[Params, float]:
    """Federated meta-training without Flower: the federation's own round (sampling, each
    node's meta-gradient, the example-weighted mean and one Adam step per group). Returns the
    meta-initialization and the λ a final evaluation would use."""
    started = time.perf_counter()
    rounds = cfg.federation.rounds

    def progress(step: int, result: BareRound) -> None:
        if step % 25 == 0 or step == rounds:
            accuracy = np.mean([u.accuracy for u in result.updates])
            ratio = np.mean([u.flops_ratio for u in result.updates])
            log(
                f"  meta-step {step}/{rounds}: query acc {accuracy:.3f}, train flops_ratio "
                f"{ratio:.3f}, {time.perf_counter() - started:.0f}s"
            )

    federation = BareFederation(cfg)
    params = federation.train(rounds, progress)
    return params, federation.regularizer_weight(rounds)


# --------------------------------------------------------------------------- timing


@dataclass
class Case:
    """One adapted node: its sliced model (both backends), its module, its query inputs."""

    export: Export
    sliced_torch: SlicedGatedNet
    module: GatedConvNet
    inputs: list[torch.Tensor]
    opened: list[list[np.ndarray]]


def build_case(export: Export, cfg: DictConfig) -> Case:
    model = export.model
    assert export.query_x is not None
    inputs = [export.query_x[i : i + 1].contiguous() for i in range(len(export.query_x))]
    module = GatedConvNet(model.spec)
    module.load_state_dict(model.params, strict=True)
    module.eval()
    return Case(
        export=export,
        sliced_torch=SlicedGatedNet(model.spec, model.params, backend="torch"),
        module=module,
        inputs=inputs,
        opened=[model.forward_with_open(x)[1] for x in inputs],
    )


def variants(case: Case) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    native, module = case.export.model, case.module

    def masked_dense(x: torch.Tensor) -> torch.Tensor:
        return module(x, mode=GateMode.EVAL).logits

    def module_dense(x: torch.Tensor) -> torch.Tensor:
        return module(x, mode=GateMode.OFF).logits

    return {
        "dense": native.forward_dense,
        "sliced": native.forward,
        "masked_dense": masked_dense,
        "module_dense": module_dense,
        "torch_dense": case.sliced_torch.forward_dense,
        "torch_sliced": case.sliced_torch.forward,
    }


def time_interleaved(
    jobs: list[tuple[Callable[[torch.Tensor], torch.Tensor], ...]],
    names: list[str],
    inputs: list[torch.Tensor],
    reps: int,
    seed: int,
) -> dict[str, list[float]]:
    """Microseconds per call. Every rep visits every input (shuffled) and runs all variants on
    it back to back in a rotating order, so drifts of a shared machine hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in names}
    order = list(range(len(inputs)))
    rng = random.Random(seed)
    clock = time.perf_counter_ns
    gc.collect()
    gc.disable()
    try:
        with torch.inference_mode():
            for job, x in zip(jobs, inputs, strict=True):  # warm-up
                for fn in job:
                    fn(x)
            for rep in range(reps):
                rng.shuffle(order)
                for k, i in enumerate(order):
                    x, job = inputs[i], jobs[i]
                    shift = (rep + k) % len(names)
                    for v in range(len(names)):
                        j = (v + shift) % len(names)
                        fn = job[j]
                        start = clock()
                        fn(x)
                        times[names[j]].append((clock() - start) / 1e3)
    finally:
        gc.enable()
    return times


def latency_table(times: dict[str, list[float]], names: list[str], baseline: str) -> list[str]:
    """Median, p10 and p90 microseconds per variant, and its speed against ``baseline``."""
    med = {n: statistics.median(times[n]) for n in names}
    lines = [
        f"| variant | median us | p10 us | p90 us | vs {baseline} |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for n in names:
        p10, p90 = np.percentile(times[n], [10, 90])
        lines.append(
            f"| {n} | {med[n]:.1f} | {p10:.1f} | {p90:.1f} | {med[baseline] / med[n]:.2f}x |"
        )
    return lines


def fixed_share_network(
    spec: ModelSpec, layer_ratios: list[float], gate_weight: float = 0.0
) -> GatedConvNet:
    """A random width-``spec.width`` network whose gates open a fixed share of channels per
    layer (the trained model's ratios), chosen at random by the gates' last bias. Gate weights
    of 0 make the gates constant; a tiny ``gate_weight`` keeps them computed from the input."""
    torch.manual_seed(0)
    net = GatedConvNet(spec)
    with torch.no_grad():
        for layer, ratio in zip(net.gate, layer_ratios, strict=True):
            keep = max(1, round(ratio * spec.width))
            bias = torch.full((spec.width,), -1.0)
            bias[torch.randperm(spec.width)[:keep]] = 1.0
            layer.fc2.weight.fill_(gate_weight)
            layer.fc2.bias.copy_(bias)
    return net


def synthetic_case(spec: ModelSpec, layer_ratios: list[float], inputs: list[torch.Tensor]):
    """The cost structure of a gated model at another width: :func:`fixed_share_network` on the
    C engine and in PyTorch ops."""
    net = fixed_share_network(spec, layer_ratios)
    params = {n: p.detach() for n, p in net.named_parameters()}
    native = SlicedGatedNet(spec, params, backend="native")
    ratio = float(np.mean([native.flops_ratio(native.forward_with_open(x)[1]) for x in inputs]))
    return native, SlicedGatedNet(spec, params, backend="torch"), ratio


def stage_table(cases: list[Case], reps: int) -> list[str]:
    """Median microseconds per stage of the C engine, dense vs sliced, next to MAC ratios."""
    dense: dict[str, list[float]] = {}
    sliced: dict[str, list[float]] = {}
    for _ in range(reps):
        for case in cases:
            for x in case.inputs:
                for key, value in case.export.model.stage_times(x, dense=True).items():
                    dense.setdefault(key, []).append(value)
                for key, value in case.export.model.stage_times(x).items():
                    sliced.setdefault(key, []).append(value)
    spec = cases[0].export.model.spec
    k2 = spec.kernel_size**2
    costs = layer_costs(spec)
    counts = np.array([[spec.in_channels] + [len(o) for o in op] for c in cases for op in c.opened])
    mac_ratio = {}
    for i, cost in enumerate(costs[:-1]):
        macs = k2 * cost.spatial * counts[:, i] * counts[:, i + 1]
        mac_ratio[f"L{i}.conv"] = float(np.mean(macs)) / cost.dense_macs
    mac_ratio["head"] = float(np.mean(counts[:, -1])) / spec.width
    lines = [
        "| stage | dense us | sliced us | time ratio | MAC ratio |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key in dense:
        d, s = statistics.median(dense[key]), statistics.median(sliced[key])
        ratio = f"{s / d:.2f}" if d > 0.2 else "-"
        macs = f"{mac_ratio[key]:.2f}" if key in mac_ratio else ""
        lines.append(f"| {key} | {d:.2f} | {s:.2f} | {ratio} | {macs} |")
    total_d = sum(statistics.median(v) for v in dense.values())
    total_s = sum(statistics.median(v) for v in sliced.values())
    lines.append(f"| sum | {total_d:.2f} | {total_s:.2f} | {total_s / total_d:.2f} | |")
    return lines


# --------------------------------------------------------------------------- main


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that pick the measured model: a finished run (B) or in-process training (A)."""
    parser.add_argument("--run-dir", type=Path, help="(B) a finished simulate.py run folder")
    parser.add_argument("--nodes", type=int, default=4, help="target nodes to adapt and measure")
    parser.add_argument("--steps", type=int, default=120, help="(A) meta-training steps")
    parser.add_argument("--backbone-lr", type=float, default=2e-3, help="(A) meta Adam lr")
    parser.add_argument("--gate-lr", type=float, default=1e-2, help="(A) meta Adam lr of gates")
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--reps", type=int, default=12, help="passes over the measured inputs")
    parser.add_argument("--seed", type=int, default=0)


def adapted_nodes(
    args: argparse.Namespace, log: Callable[[str], None]
) -> tuple[DictConfig, list[Export]]:
    """The run's (or freshly meta-trained) model adapted at the first ``--nodes`` target nodes,
    each with the C engine, as a deployed node runs it."""
    if args.run_dir is not None:
        cfg, params, server_round, reg_weight = load_run(args.run_dir)
        source = f"run {args.run_dir} (round {server_round})"
    else:
        cfg = train_config(args)
        log(
            f"(A) meta-training {args.steps} first-order steps on Fashion-MNIST 5-way 5-shot, "
            "target ratio 0.5 (use --run-dir for a finished run)"
        )
        params, reg_weight = meta_train(cfg, log)
        server_round = args.steps
        source = f"in-process meta-training, {args.steps} first-order steps, seed {args.seed}"
    if cfg.model.arch != "conv":
        raise SystemExit("error: the C engine runs Conv-N only: give a Conv-N run")
    first = cfg.federation.train_nodes
    partitions = list(range(first, first + min(args.nodes, cfg.federation.target_nodes)))
    exports = [
        adapt_node(cfg, params, p, server_round, reg_weight, backend="native") for p in partitions
    ]
    log(f"model: {source}; adapted target nodes {partitions}")
    return cfg, exports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--widths", default="32,64", help="widths for the synthetic-gate table")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, flush=True)

    ok, reason = native_available()
    if not ok:
        print(f"error: the C engine is unavailable ({reason}); nothing to measure", file=sys.stderr)
        return 2

    started = time.perf_counter()
    # One thread throughout: an edge device's core, and on a shared machine a second OpenMP
    # thread mostly spins waiting for a core (training too was several times slower with 2).
    torch.set_num_threads(args.threads)
    cfg, exports = adapted_nodes(args, log)
    cases = [build_case(e, cfg) for e in exports]
    spec = cases[0].export.model.spec
    log(f"machine: {describe_host()}")

    # -- main comparison: the adapted models on their real query inputs
    names = list(variants(cases[0]))
    jobs, inputs, ratios, opened = [], [], [], []
    for case in cases:
        fns = variants(case)
        for x, op in zip(case.inputs, case.opened, strict=True):
            jobs.append(fns)
            inputs.append(x)
            ratios.append(case.export.model.flops_ratio(op))
            opened.append([len(o) / spec.width for o in op])
    # Two groups, each interleaved within itself: the engine's dense and sliced runs alternate
    # with nothing else between them (a PyTorch call in between evicts the engine's weights and
    # buffers from the caches, which costs the dense run more and would flatter slicing).
    times: dict[str, list[float]] = {}
    for group in (names[:2], names[2:]):
        group_jobs = [tuple(fns[n] for n in group) for fns in jobs]
        times.update(time_interleaved(group_jobs, group, inputs, args.reps, args.seed))
    med = {n: statistics.median(times[n]) for n in names}
    flops_ratio = float(np.mean(ratios))
    speedup = med["dense"] / med["sliced"]
    efficiency = speedup * flops_ratio
    layer_active = np.mean(opened, axis=0)

    log("")
    log(
        f"## Batch-1 latency, Conv-{spec.depth} width {spec.width} {spec.image_size}x"
        f"{spec.image_size}, {len(inputs)} query inputs x {args.reps} reps (median us)"
    )
    log("")
    for line in latency_table(times, names, "dense"):
        log(line)
    log("")
    log(
        f"realized flops_ratio {flops_ratio:.3f} (MACs incl. gates; dense {dense_macs(spec)} MACs)"
        f"; open channels per layer: {', '.join(f'{r:.2f}' for r in layer_active)}"
    )
    log(
        f"speedup dense/sliced {speedup:.3f}; efficiency {efficiency:.3f} "
        f"(target >= 0.7); PyTorch ops: torch_dense/torch_sliced "
        f"{med['torch_dense'] / med['torch_sliced']:.3f}"
    )
    for e in exports:
        log(
            f"node {e.partition}: query accuracy sliced {e.accuracy:.3f} = masked dense batch-1 "
            f"{e.masked_dense_accuracy:.3f} (max |dlogit| {e.max_logit_difference:.1e}); "
            f"transductive (whole query set as one batch) {e.transductive_accuracy:.3f}"
        )

    log("")
    log("## Where the time goes (C engine, median us per stage, one input)")
    log("")
    for line in stage_table(cases, max(2, args.reps // 4)):
        log(line)

    widths = [int(w) for w in args.widths.split(",") if w.strip()]
    if widths:
        log("")
        log(
            "## Other widths: random weights, gates fixed to the trained per-layer open ratios "
            "(synthetic; cost structure only)"
        )
        log("")
        log("| width | flops_ratio | dense us | sliced us | speedup | efficiency | torch speedup |")
        log("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        probe = inputs[: min(len(inputs), 60)]
        for width in widths:
            wspec = dataclasses.replace(spec, width=width)
            native, torch_net, ratio = synthetic_case(wspec, list(layer_active), probe)
            fns = (native.forward_dense, native.forward, torch_net.forward_dense, torch_net.forward)
            wnames = ["dense", "sliced", "torch_dense", "torch_sliced"]
            wt = time_interleaved([fns] * len(probe), wnames, probe, args.reps, args.seed)
            wm = {n: statistics.median(t) for n, t in wt.items()}
            s = wm["dense"] / wm["sliced"]
            log(
                f"| {width} | {ratio:.3f} | {wm['dense']:.1f} | {wm['sliced']:.1f} | {s:.2f} | "
                f"{s * ratio:.2f} | {wm['torch_dense'] / wm['torch_sliced']:.2f} |"
            )
    log("")
    log(f"total {time.perf_counter() - started:.0f}s")
    print(
        f"RESULT speedup={speedup:.3f} flops_ratio={flops_ratio:.3f} efficiency={efficiency:.3f} "
        f"dense_us={med['dense']:.1f} sliced_us={med['sliced']:.1f} "
        f"masked_dense_us={med['masked_dense']:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
