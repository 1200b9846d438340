"""Meta-gradient cost: time and peak memory per task of second- versus first-order MetaGater and
dense MAML, batching a client's tasks through ``torch.func.vmap`` against a Python loop, and the
client update of the gated ResNets (ResNet-12, ResNet-18) beside Conv-4.

    python benchmarks/metagrad.py                      # digits and Fashion-MNIST, ~1-3 min
    python benchmarks/metagrad.py --datasets digits --tasks 8 --reps 20
    python benchmarks/metagrad.py --sections archs --datasets fashion_mnist \
        --widths "16,32,64,128;32,64,128,256;48,96,192,384" --budget 3

Architectures (section ``archs``, on the first dataset): for each of ``--archs`` (Conv-4 width
32, ResNet-12 and ResNet-18 at their default widths), seconds and peak tensor memory of one
client update (``task.tasks_per_client=1``: one ``meta_gradients`` call) in second and first
order (strategies metagater and metagater_fo), and their ratio. ``--widths`` lists further
ResNet-12 stage widths (``;``-separated): each is measured the same way, and the widest whose
second-order client update stays under ``--budget`` seconds is reported, with the round it
implies (5 clients on 2 actors: three client updates one after another per actor).

What is timed is exactly what a ClientApp computes for one task, ``gating.meta.meta_gradients``
(Conv-4 width 32 with its gates, the default model; 5-way 5-shot 15-query episodes of training
node 0; lambda at its full value so the regularizer is in both losses), in four variants:
  gated_so       gating on, second order (strategy metagater, the default)
  gated_fo       gating on, first order (metagater_fo)
  maml_so        gating off, second order (fedmeta: dense MAML)
  maml_fo        gating off, first order (fedmeta meta.first_order=true: dense FOMAML)
and, for ``--tasks`` tasks of one client, the loop ``[meta_gradients(...) for each task]``
against ``gating.meta.meta_gradients_batched`` (one vmapped pass over the tasks).

Method: one thread (``torch.set_num_threads(1)``, as in a Ray actor); every variant runs once
untimed, then ``--reps`` passes, each over all variants in a rotating order on that pass's
episode(s); medians; ratios are medians of per-pass ratios. Peak memory: bytes of tensors alive
at once during one call above what existed before it (tracked per storage by a
TorchDispatchMode; the allocator's own overhead is not included), i.e. mostly the autograd
graph. The last line is ``RESULT so_over_fo=... vmap_speedup=... peak_mb_so=... ...`` (digits,
MetaGater, ``--tasks`` tasks), followed by the other figures as extra keys.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from host import describe_host  # benchmarks/host.py (the script's folder is on sys.path)
from omegaconf import DictConfig
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conf.choices import StrategyName
from conf.schema import default_config, validate
from gating.data import DatasetError
from gating.federated.nodes import partition_task
from gating.federated.settings import (
    initial_parameters,
    meta_config,
    model_for,
    model_spec,
    seed_torch,
)
from gating.federated.strategies import strategy_of
from gating.meta import Batch, MetaConfig, meta_gradients, meta_gradients_batched
from gating.model import GatedModel

VARIANTS = {  # strategy, meta.first_order
    "gated_so": (StrategyName.metagater, False),
    "gated_fo": (StrategyName.metagater_fo, True),
    "maml_so": (StrategyName.fedmeta, False),
    "maml_fo": (StrategyName.fedmeta, True),
}
BATCHED = ("gated_so", "gated_fo", "maml_so")


class PeakTensorMemory(TorchDispatchMode):
    """Bytes of tensor storage alive at once while active: every op's outputs are counted once
    per storage until the storage is freed. Works under autograd and torch.func transforms."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self._seen:
                    nbytes = storage.nbytes()
                    self._seen.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, key, nbytes)
        return out


def peak_mb(fn: Callable[[], Any]) -> float:
    with PeakTensorMemory() as tracker:
        fn()
    return tracker.peak / 2**20


@dataclass
class Setup:
    model: GatedModel
    params: dict[str, torch.Tensor]
    configs: dict[str, MetaConfig]
    episodes: list[list[tuple[Batch, Batch]]]  # per pass, ``tasks`` episodes
    image: str
    label: str = "Conv-4 width 32"  # the network, as ModelSpec.describe() says it


def setup(
    dataset: str, passes: int, tasks: int, seed: int, arch: str = "conv", widths: str = ""
) -> Setup:
    configs: dict[str, MetaConfig] = {}
    cfg: DictConfig | None = None
    for name, (strategy, first_order) in VARIANTS.items():
        cfg = default_config()
        cfg.dataset.name = dataset
        cfg.model.arch = arch
        cfg.model.widths = widths
        cfg.strategy.name = strategy
        cfg.meta.first_order = first_order
        cfg.seed = seed
        validate(cfg)
        gated = strategy_of(cfg).gated
        configs[name] = meta_config(cfg, float(cfg.gating["lambda"]) if gated else 0)
    assert cfg is not None
    task = partition_task(cfg, 0)
    spec = model_spec(cfg, task)
    rng = np.random.default_rng(seed)

    def episode() -> tuple[Batch, Batch]:
        drawn = task.episode(rng)
        return Batch(drawn.support_x, drawn.support_y), Batch(drawn.query_x, drawn.query_y)

    return Setup(
        model=model_for(spec),
        params=initial_parameters(spec, seed),
        configs=configs,
        episodes=[[episode() for _ in range(tasks)] for _ in range(passes)],
        image=f"{spec.in_channels}x{spec.image_size}x{spec.image_size}",
        label=spec.describe(),
    )


def interleaved(jobs: dict[str, Callable[[int], Any]], reps: int) -> dict[str, list[float]]:
    """Seconds per job and pass: one untimed warm-up each, then every pass runs all jobs in a
    rotating order (so drifting background load hits every job alike)."""
    names = list(jobs)
    for name in names:
        jobs[name](reps)  # warm-up on the spare episodes
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            seed_torch(rep)
            start = time.perf_counter()
            jobs[name](rep)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(numerator, denominator, strict=True))


@dataclass
class Figures:
    dataset: str
    image: str
    per_task_s: dict[str, float]
    per_task_mb: dict[str, float]
    so_over_fo: float
    maml_so_over_fo: float
    gated_over_dense_so: float
    loop_s: dict[str, float]  # per task, in the loop of ``tasks``
    vmap_s: dict[str, float]  # per task, in the vmapped pass
    speedup: dict[str, float]
    loop_mb: dict[str, float]
    vmap_mb: dict[str, float]
    dense_max_rel_diff: float  # maml_so, vmapped against the loop (no gate noise: they agree)


def measure(dataset: str, reps: int, tasks: int, seed: int) -> Figures:
    s = setup(dataset, reps + 1, tasks, seed)

    def single(name: str) -> Callable[[int], Any]:
        return lambda rep: meta_gradients(s.model, s.params, *s.episodes[rep][0], s.configs[name])

    def loop(name: str) -> Callable[[int], Any]:
        return lambda rep: [
            meta_gradients(s.model, s.params, sup, que, s.configs[name])
            for sup, que in s.episodes[rep]
        ]

    def batched(name: str) -> Callable[[int], Any]:
        return lambda rep: meta_gradients_batched(
            s.model, s.params, s.episodes[rep], s.configs[name]
        )

    per_task = interleaved({name: single(name) for name in VARIANTS}, reps)
    per_task_mb = {name: peak_mb(lambda n=name: single(n)(0)) for name in VARIANTS}
    jobs = {}
    for name in BATCHED:
        jobs[f"loop:{name}"] = loop(name)
        jobs[f"vmap:{name}"] = batched(name)
    batch_s = interleaved(jobs, reps)

    seed_torch(0)
    reference = loop("maml_so")(0)
    candidate = batched("maml_so")(0)

    def flat(step: Any) -> torch.Tensor:
        return torch.cat([g.flatten() for g in step.grads.values()])

    diff = max(
        float((flat(c) - flat(r)).abs().max() / flat(r).abs().max())
        for r, c in zip(reference, candidate, strict=True)
    )
    return Figures(
        dataset=dataset,
        image=s.image,
        per_task_s={name: statistics.median(t) for name, t in per_task.items()},
        per_task_mb=per_task_mb,
        so_over_fo=paired_ratio(per_task["gated_so"], per_task["gated_fo"]),
        maml_so_over_fo=paired_ratio(per_task["maml_so"], per_task["maml_fo"]),
        gated_over_dense_so=paired_ratio(per_task["gated_so"], per_task["maml_so"]),
        loop_s={n: statistics.median(batch_s[f"loop:{n}"]) / tasks for n in BATCHED},
        vmap_s={n: statistics.median(batch_s[f"vmap:{n}"]) / tasks for n in BATCHED},
        speedup={n: paired_ratio(batch_s[f"loop:{n}"], batch_s[f"vmap:{n}"]) for n in BATCHED},
        loop_mb={n: peak_mb(lambda n=n: loop(n)(0)) for n in BATCHED},
        vmap_mb={n: peak_mb(lambda n=n: batched(n)(0)) for n in BATCHED},
        dense_max_rel_diff=diff,
    )


ARCH_VARIANTS = ("gated_so", "gated_fo")
#: A round of 5 sampled clients on 2 actors: each actor runs up to three client updates in turn.
ROUND_CLIENTS, ROUND_ACTORS = 5, 2


@dataclass
class ArchFigures:
    arch: str
    widths: str  # as given ("" = the architecture's default)
    label: str
    stage_widths: tuple[int, ...]  # the ResNet's stage widths (empty for Conv-N)
    update_s: dict[str, float]  # one client update (one task), median seconds
    update_mb: dict[str, float]  # peak tensor memory of one client update
    so_over_fo: float

    @property
    def round_s(self) -> float:
        """Seconds of a round of 5 clients on 2 actors, from the second-order update alone
        (no communication, no evaluation)."""
        return -(-ROUND_CLIENTS // ROUND_ACTORS) * self.update_s["gated_so"]


def measure_arch(dataset: str, arch: str, widths: str, reps: int, seed: int) -> ArchFigures:
    """One client update (one task) of MetaGater on ``arch``, second and first order."""
    s = setup(dataset, reps + 1, 1, seed, arch, widths)

    def single(name: str) -> Callable[[int], Any]:
        return lambda rep: meta_gradients(s.model, s.params, *s.episodes[rep][0], s.configs[name])

    seconds = interleaved({name: single(name) for name in ARCH_VARIANTS}, reps)
    return ArchFigures(
        arch=arch,
        widths=widths,
        label=s.label,
        stage_widths=s.model.spec.widths,
        update_s={name: statistics.median(t) for name, t in seconds.items()},
        update_mb={name: peak_mb(lambda n=name: single(n)(0)) for name in ARCH_VARIANTS},
        so_over_fo=paired_ratio(seconds["gated_so"], seconds["gated_fo"]),
    )


def print_archs(dataset: str, figures: list[ArchFigures], budget: float) -> list[str]:
    """The architectures' table; returns the RESULT keys it contributes."""
    print(f"client update (one task, {dataset}), MetaGater second (so) and first (fo) order")
    header = (
        f"{'model':<28}{'so s':>8}{'fo s':>8}{'so/fo':>7}{'so MB':>9}{'fo MB':>9}{'round s':>9}"
    )
    print(header)
    print("-" * len(header))
    for f in figures:
        print(
            f"{f.label:<28}{f.update_s['gated_so']:>8.3f}{f.update_s['gated_fo']:>8.3f}"
            f"{f.so_over_fo:>7.2f}{f.update_mb['gated_so']:>9.1f}{f.update_mb['gated_fo']:>9.1f}"
            f"{f.round_s:>9.2f}"
        )
    print(
        f"round s: {-(-ROUND_CLIENTS // ROUND_ACTORS)} second-order client updates in turn "
        f"({ROUND_CLIENTS} clients on {ROUND_ACTORS} actors), without communication"
    )
    keys = []
    seen: set[str] = set()
    for f in figures:
        if f.widths or f.arch in seen:  # the default widths of each arch only
            continue
        seen.add(f.arch)
        keys += [
            f"{f.arch}_update_s_so={f.update_s['gated_so']:.4f}",
            f"{f.arch}_update_s_fo={f.update_s['gated_fo']:.4f}",
            f"{f.arch}_so_over_fo={f.so_over_fo:.3f}",
            f"{f.arch}_peak_mb_so={f.update_mb['gated_so']:.2f}",
        ]
    resnet12 = [f for f in figures if f.arch == "resnet12"]
    if resnet12:
        fits = [f for f in resnet12 if f.update_s["gated_so"] <= budget]
        widest = max(fits, key=lambda f: sum(f.stage_widths), default=None)
        if widest is None:
            print(f"no ResNet-12 width measured keeps a client update under {budget:g} s")
        else:
            print(
                f"widest ResNet-12 with a second-order client update under {budget:g} s: "
                f"{widest.label} ({widest.update_s['gated_so']:.2f} s, round ~"
                f"{widest.round_s:.1f} s)"
            )
            keys.append("resnet12_widest_under_budget=" + "-".join(map(str, widest.stage_widths)))
    return keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="digits,fashion_mnist")
    parser.add_argument("--reps", type=int, default=10, help="timed passes")
    parser.add_argument("--tasks", type=int, default=4, help="tasks per client for vmap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sections",
        default="variants,archs",
        help="variants (Conv-4: second/first order, gated/dense, vmap) and/or archs",
    )
    parser.add_argument("--archs", default="conv,resnet12,resnet18", help="section archs")
    parser.add_argument(
        "--widths",
        default="",
        help="further ResNet-12 stage widths to measure, ';'-separated, e.g. "
        "'16,32,64,128;48,96,192,384'",
    )
    parser.add_argument(
        "--budget", type=float, default=3.0, help="seconds a client update may take (--widths)"
    )
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    torch.set_num_threads(1)
    # The gate noise's in-place clamp_ has no vmap batching rule (a per-task fallback); say so
    # once instead of on every call.
    warnings.filterwarnings("once", message=".*batching rule.*")

    arch_keys: list[str] = []
    if "archs" in sections:
        dataset = args.datasets.split(",")[0]
        runs = [(arch, "") for arch in args.archs.split(",") if arch]
        runs += [("resnet12", w.strip()) for w in args.widths.split(";") if w.strip()]
        figures = [measure_arch(dataset, a, w, args.reps, args.seed) for a, w in runs]
        print(f"machine: {describe_host()}")
        arch_keys = print_archs(dataset, figures, args.budget)
        print()
    if "variants" not in sections:
        print("RESULT " + " ".join(arch_keys))
        return

    results: list[Figures] = []
    for dataset in args.datasets.split(","):
        try:
            results.append(measure(dataset, args.reps, args.tasks, args.seed))
        except DatasetError as error:
            print(f"skipping {dataset}: {error}", file=sys.stderr)
    if not results:
        raise SystemExit("no dataset could be loaded")

    print(f"machine: {describe_host()}")
    print(
        f"model: Conv-4 width 32 + gates, 5-way 5-shot 15-query tasks; {args.reps} passes, "
        f"medians; vmap over {args.tasks} tasks of one client"
    )
    print()
    print("per task            " + "".join(f"{name:>14}" for name in VARIANTS))
    for f in results:
        print(
            f"{f.dataset:<13} ms   " + "".join(f"{f.per_task_s[n] * 1e3:>14.1f}" for n in VARIANTS)
        )
        print(f"{f.image:<13} MB   " + "".join(f"{f.per_task_mb[n]:>14.1f}" for n in VARIANTS))
    print()
    header = (
        f"{'dataset':<14}{'variant':<14}{'loop ms/task':>13}{'vmap ms/task':>13}"
        f"{'speedup':>9}{'loop MB':>9}{'vmap MB':>9}"
    )
    print(header)
    print("-" * len(header))
    for f in results:
        for n in BATCHED:
            print(
                f"{f.dataset:<14}{n:<14}{f.loop_s[n] * 1e3:>13.1f}{f.vmap_s[n] * 1e3:>13.1f}"
                f"{f.speedup[n]:>9.2f}{f.loop_mb[n]:>9.1f}{f.vmap_mb[n]:>9.1f}"
            )
    print()
    for f in results:
        print(
            f"{f.dataset}: second/first order {f.so_over_fo:.2f}x (MetaGater), "
            f"{f.maml_so_over_fo:.2f}x (dense MAML); gated/dense second order "
            f"{f.gated_over_dense_so:.2f}x; vmapped dense MAML against the loop: max relative "
            f"difference {f.dense_max_rel_diff:.1e}"
        )
    print(
        "MB: peak tensor memory of one call (loop: the whole loop; vmap: the batched pass); "
        "speedup: loop time / vmap time, median of paired passes."
    )
    main_fig = results[0]
    extras = []
    for f in results:
        prefix = "" if f is main_fig else f"{f.dataset}_"
        if f is not main_fig:
            extras += [
                f"{prefix}so_over_fo={f.so_over_fo:.3f}",
                f"{prefix}vmap_speedup={f.speedup['gated_so']:.3f}",
                f"{prefix}peak_mb_so={f.per_task_mb['gated_so']:.2f}",
            ]
        extras += [
            f"{prefix}maml_so_over_fo={f.maml_so_over_fo:.3f}",
            f"{prefix}vmap_speedup_fo={f.speedup['gated_fo']:.3f}",
            f"{prefix}vmap_speedup_maml={f.speedup['maml_so']:.3f}",
        ]
    print(
        f"RESULT so_over_fo={main_fig.so_over_fo:.3f} "
        f"vmap_speedup={main_fig.speedup['gated_so']:.3f} "
        f"peak_mb_so={main_fig.per_task_mb['gated_so']:.2f} " + " ".join(extras + arch_keys)
    )


if __name__ == "__main__":
    main()
