"""GPU against CPU: seconds per client update and per round, and actors sharing one GPU.

    python benchmarks/gpu.py                          # Fashion-MNIST 28x28 Conv-4, ~5 min on a GPU
    python benchmarks/gpu.py --actors 1,2,4,8 --rounds 12 dataset=digits

Part 1, client update: what a sampled MetaGater client computes in a round
(``gating.federated.updates.client_update``, second order), timed interleaved on the CPU
(``device=cpu``, one thread, as a Ray actor) and on CUDA, per ``task.tasks_per_client`` in
``--tasks`` and for the loop and the batched (``task.batched``, vmapped) form; medians over
``--reps``. Part 2, rounds: real Flower simulations (Ray actors), ``--rounds`` rounds of the
configuration ``python simulate.py <overrides>`` composes, with 8 clients per round, on the
CPU (2 actors, one core each) and on one GPU shared by 1, 2, 4 and 8 actors
(``ray.client_gpus`` = 1/actors); median seconds per steady round from ``history.json``.
Without CUDA, part 1 reports the CPU alone and part 2 is skipped, saying so.

The last line is ``RESULT gpu_over_cpu=<CPU s / CUDA s per client update, 1 task>
actors_scaling=<round s with 1 actor / with the most actors> ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_HOME", str(ROOT / ".flwr_home"))

import torch  # noqa: E402
from host import compose_config, describe_host  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

import simulate  # noqa: E402
from gating.federated.nodes import partition_task  # noqa: E402
from gating.federated.settings import initial_parameters, model_spec  # noqa: E402
from gating.federated.updates import ClientRound, client_update  # noqa: E402


def update_seconds(cfg: DictConfig, devices: list[str], reps: int) -> dict[str, float]:
    """Median seconds of one client update per device, interleaved rep by rep."""
    task = partition_task(cfg, 0)
    params = initial_parameters(model_spec(cfg, task), cfg.seed)
    times: dict[str, list[float]] = {d: [] for d in devices}
    for rep in range(reps + 1):  # the first rep warms up (CUDA context, kernels, caches)
        for device in devices:
            with open_dict(cfg):
                cfg.device = device
            start = time.perf_counter()
            client_update(ClientRound(cfg, task, params, server_round=rep + 1, reg_weight=0.5))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if rep:
                times[device].append(time.perf_counter() - start)
    return {d: statistics.median(t) for d, t in times.items()}


def round_seconds(cfg: DictConfig, warmup: int) -> float:
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        simulate.simulate(cfg, Path(tmp))
        history = json.loads((Path(tmp) / "history.json").read_text())
    steady = [h["seconds"] for h in history if warmup < h["round"] < cfg.federation.rounds]
    return statistics.median(steady)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="simulate.py overrides")
    parser.add_argument("--tasks", default="1,4", help="task.tasks_per_client values")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--actors", default="1,2,4,8")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a CPU client as a Ray actor runs it
    cuda = torch.cuda.is_available()
    devices = ["cpu", "cuda"] if cuda else ["cpu"]
    base = ["dataset=fashion_mnist", *args.overrides]
    print(f"machine: {describe_host()}")
    print(f"CUDA: {torch.cuda.get_device_name(0) if cuda else 'none visible to torch'}")
    print()
    print(
        f"{'tasks':>5} {'form':>7} "
        + " ".join(f"{d + ' s':>10}" for d in devices)
        + ("  cpu/cuda" if cuda else "")
    )
    ratios: dict[str, float] = {}
    for tasks in [int(t) for t in args.tasks.split(",")]:
        for batched in (False, True):
            cfg = compose_config(
                [*base, f"task.tasks_per_client={tasks}", f"task.batched={str(batched).lower()}"]
            )
            seconds = update_seconds(cfg, devices, args.reps)
            form = "vmap" if batched else "loop"
            ratio = seconds["cpu"] / seconds["cuda"] if cuda else math.nan
            ratios[f"{form}{tasks}"] = ratio
            line = f"{tasks:>5} {form:>7} " + " ".join(f"{seconds[d]:>10.4f}" for d in devices)
            print(line + (f"  {ratio:>8.2f}" if cuda else ""), flush=True)
    print()
    round_figures: dict[str, float] = {}
    rounds = [
        f"federation.rounds={args.rounds}",
        f"federation.eval_every={args.rounds}",
        "federation.clients_per_round=8",
        "federation.train_nodes=20",
        "output.plots=false",
    ]
    cpu_cfg = compose_config([*base, *rounds, "device=cpu"])
    round_figures["cpu, 2 actors"] = round_seconds(cpu_cfg, args.warmup)
    if cuda:
        for actors in [int(a) for a in args.actors.split(",")]:
            cfg = compose_config(
                [
                    *base,
                    *rounds,
                    "device=cuda",
                    f"ray.num_cpus={actors}",
                    "ray.client_cpus=1",
                    f"ray.client_gpus={1 / actors}",
                ]
            )
            round_figures[f"cuda, {actors} actor(s)"] = round_seconds(cfg, args.warmup)
    else:
        print("no CUDA device: the actors-sharing-a-GPU rounds are skipped")
    print(f"{'configuration':<20} {'s / round':>10}")
    for name, value in round_figures.items():
        print(f"{name:<20} {value:>10.3f}")
    gpu_rounds = [v for k, v in round_figures.items() if k.startswith("cuda")]
    scaling = gpu_rounds[0] / gpu_rounds[-1] if len(gpu_rounds) > 1 else math.nan
    extras = " ".join(f"gpu_over_cpu_{k}={v:.3f}" for k, v in ratios.items())
    print(
        f"RESULT gpu_over_cpu={ratios.get('loop1', math.nan):.3f} actors_scaling={scaling:.3f} "
        f"cpu_round_s={round_figures['cpu, 2 actors']:.3f} {extras}"
    )


if __name__ == "__main__":
    main()
