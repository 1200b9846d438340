"""Run a simulated MetaGater federation: Flower ServerApp + ClientApps in Ray actors.

    python simulate.py                                    # metagater on digits, small federation
    python simulate.py strategy=fedmeta dataset=fashion_mnist federation.rounds=300 seed=1
    python simulate.py resume=true hydra.run.dir=outputs/run1
    python simulate.py -m strategy=metagater,fedmeta gating.target_ratio=0.3,0.5,0.7 seed=0,1,2
    python simulate.py -m +search=steps                   # Optuna search of the step sizes

Results (config.yaml, history.json, summary.json, checkpoint.pt, PNG plots) land in the Hydra
run folder. A single run's error propagates: the exit status is non-zero. In a multirun a failed
job writes FAILED.txt into its folder and the other jobs still run; the failed jobs are listed at
the end and the exit status is non-zero (``analysis.runs.SweepFailures``). ``main`` returns the
``sweep.objective`` of the run, which is what a sweeper such as Optuna optimizes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

# Flower reads these at import time: no telemetry, no update check, state kept in the project.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_HOME", str(Path(__file__).resolve().parent / ".flwr_home"))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from analysis.runs import clear_failure, write_failure
from conf.schema import SimulateConfig, validate

ConfigStore.instance().store(name="base_config", node=SimulateConfig)
log = logging.getLogger("simulate")


def gpu_resources(cfg: DictConfig) -> tuple[float, int]:
    """(GPU share per ClientApp actor, GPUs Ray may use), checked before Ray starts.

    By default a CUDA run shares one GPU among all the actors this machine runs (Ray packs
    them by their CPU count) and lets Ray see every GPU; a CPU run asks for none.
    """
    import torch

    from gating.federated.settings import resolve_device

    device = resolve_device(cfg.device)  # refuses cuda where torch sees none, naming `device`
    visible = torch.cuda.device_count()
    if device.type == "cuda" and device.index is not None and device.index >= visible:
        raise ValueError(
            f"config key device={cfg.device}: only {visible} CUDA device(s) are visible here"
        )
    actors = max(1, int(cfg.ray.num_cpus // cfg.ray.client_cpus))
    client_gpus = cfg.ray.client_gpus
    if client_gpus is None:
        client_gpus = 1.0 / actors if device.type == "cuda" else 0.0
    num_gpus = cfg.ray.num_gpus if cfg.ray.num_gpus is not None else visible
    if client_gpus > 0 and visible == 0 and not cfg.ray.address:
        raise ValueError(
            f"config key ray.client_gpus={client_gpus}: torch sees no GPU here; set it to 0 "
            "(or leave it unset) to run the clients on the CPU"
        )
    if client_gpus > 0 and num_gpus == 0 and not cfg.ray.address:
        raise ValueError(
            f"config key ray.num_gpus=0 with ray.client_gpus={client_gpus}: no actor could "
            "start; give Ray the GPUs (leave ray.num_gpus unset)"
        )
    return float(client_gpus), int(num_gpus)


def backend_config(cfg: DictConfig) -> dict:
    """Flower's Ray backend settings: a Ray of the run's own, or an existing cluster.

    Without ``ray.address`` the run starts a private Ray of ``ray.num_cpus`` CPUs (and the
    GPUs of :func:`gpu_resources`): address "local" keeps a plain ray.init() from joining a
    cluster that `ray start` left on this machine (or RAY_ADDRESS names), which would fail on
    the CPU count. Attaching passes only the address: Ray refuses resource counts for a
    running cluster, whose nodes declared their own resources.
    """
    client_gpus, num_gpus = gpu_resources(cfg)
    init_args: dict = {
        "address": "local",
        "num_cpus": cfg.ray.num_cpus,
        "num_gpus": num_gpus,
        "include_dashboard": False,
    }
    if cfg.ray.address:
        init_args = {"address": cfg.ray.address}
    return {
        "client_resources": {"num_cpus": cfg.ray.client_cpus, "num_gpus": client_gpus},
        "init_args": init_args,
    }


def simulate(cfg: DictConfig, out_dir: Path) -> None:
    """Run one simulated federation with ``cfg`` into ``out_dir``."""
    import ray
    from flwr.simulation import run_simulation

    # Flower has its own console handler; Hydra's root handler would print every line twice.
    logging.getLogger("flwr").propagate = False
    # Flower's link state imports alembic, which logs every plugin it sets up at INFO.
    logging.getLogger("alembic").setLevel(logging.WARNING)

    from client.app import app as client_app
    from server.app import build_server_app

    # Flower appends this driver's sys.path to PYTHONPATH at every Ray start: restore it, or it
    # grows with every job of a multirun.
    pythonpath = os.environ.get("PYTHONPATH")
    try:
        run_simulation(
            server_app=build_server_app(cfg, out_dir),
            client_app=client_app,
            num_supernodes=cfg.federation.train_nodes + cfg.federation.target_nodes,
            backend_config=backend_config(cfg),
        )
    finally:
        # Flower's Ray backend shuts Ray down when it ends, but not when it fails before it was
        # built: the next job of a multirun would then reuse this Ray, with this job's ray.*
        # settings. Against a cluster (ray.address) this only disconnects; the cluster runs on.
        ray.shutdown()
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath


def preflight(cfg: DictConfig) -> None:
    """Fail in one clear line, before Ray starts, when the run cannot work: a device that is
    not here, a missing or malformed dataset, too few classes for ``task.ways``, too few
    samples per class, images the model cannot take. Every node checks both roles' classes,
    so building one training and one target node here finds what every node would."""
    from gating.federated.nodes import node_task
    from gating.federated.settings import model_spec

    gpu_resources(cfg)
    fed = cfg.federation
    partitions = fed.train_nodes + fed.target_nodes
    for partition in (0, partitions - 1):
        task = node_task(cfg, {"partition-id": partition, "num-partitions": partitions})
    model_spec(cfg, task)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Ctrl-C or SIGTERM ask the run to stop: it ends within a poll interval, the last
    completed round's checkpoint intact. A second Ctrl-C interrupts at once."""
    from server.federation import STOP_REQUESTED

    def request_stop(signum: int, frame: object) -> None:
        log.warning("%s: stopping after the round in flight", signal.Signals(signum).name)
        STOP_REQUESTED.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    STOP_REQUESTED.clear()
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may handle signals
        return
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def objective(cfg: DictConfig, summary: dict) -> float:
    """The number a sweeper maximizes, chosen by ``sweep.objective``.

    ``accuracy``: target accuracy after adaptation. ``budgeted_accuracy``: the same minus
    ``sweep.penalty`` per unit of flops_ratio above the target ratio ρ, so a search cannot buy
    accuracy by leaving every gate open.
    """
    accuracy = float(summary["accuracy"])
    if cfg.sweep.objective == "accuracy":
        return accuracy
    excess = max(0.0, float(summary["flops_ratio"]) - cfg.gating.target_ratio)
    return accuracy - cfg.sweep.penalty * excess


def run(cfg: DictConfig, out_dir: Path) -> float:
    """Check the settings and the data, run the federation, and score it for a sweeper."""
    from server.federation import RunInterrupted

    validate(cfg)
    preflight(cfg)
    try:
        with stop_on_signals():
            simulate(cfg, out_dir)
    except Exception as error:
        if _interrupted(error):
            raise RunInterrupted(
                f"stopped on request; the last completed round is checkpointed in {out_dir}: "
                f"continue with the same command plus resume=true hydra.run.dir={out_dir}"
            ) from None
        raise
    summary = json.loads((out_dir / "summary.json").read_text())
    value = objective(cfg, summary)
    log.info("objective %s = %.4f", cfg.sweep.objective, value)
    return value


def _interrupted(error: BaseException | None) -> bool:
    """Whether ``error`` is (or was caused by) a requested stop: Flower re-raises the
    ServerApp's exception, or wraps it in its own."""
    from server.federation import RunInterrupted

    while error is not None:
        if isinstance(error, RunInterrupted):
            return True
        error = error.__cause__ or error.__context__
    return False


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """One run; in a multirun, a failed job is recorded in its folder instead of ending the sweep.

    The failed job returns None: Optuna counts it as a failed trial and samples on.
    """
    from server.federation import RunInterrupted

    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return run(cfg, out_dir)
    clear_failure(out_dir)  # a job rerun in the folder of an earlier failure
    try:
        return run(cfg, out_dir)
    except RunInterrupted:
        raise  # Ctrl-C ends the sweep; rerunning the same command continues it
    except Exception as error:  # one failed job must not end the sweep
        log.exception("job %s failed", hydra_cfg.job.num)
        write_failure(out_dir, error)
        return None


if __name__ == "__main__":
    main()
