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

import json
import logging
import os
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


def backend_config(cfg: DictConfig) -> dict:
    """Flower's Ray backend settings: a Ray of the run's own, or an existing cluster.

    Without ``ray.address`` the run starts a private Ray of ``ray.num_cpus`` CPUs: address
    "local" keeps a plain ray.init() from joining a cluster that `ray start` left on this machine
    (or RAY_ADDRESS names), which would fail on the CPU count. Attaching passes only the address:
    Ray refuses CPU counts for a running cluster, whose nodes declared their own resources.
    """
    init_args: dict = {"address": "local", "num_cpus": cfg.ray.num_cpus, "include_dashboard": False}
    if cfg.ray.address:
        init_args = {"address": cfg.ray.address}
    return {
        "client_resources": {"num_cpus": cfg.ray.client_cpus, "num_gpus": 0.0},
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
    """Fail in one clear line, before Ray starts, when the dataset cannot be read at all."""
    from gating.data import load_dataset

    load_dataset(cfg.dataset.name, cfg.dataset.path, cfg.dataset.image_size)


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
    validate(cfg)
    preflight(cfg)
    simulate(cfg, out_dir)
    summary = json.loads((out_dir / "summary.json").read_text())
    value = objective(cfg, summary)
    log.info("objective %s = %.4f", cfg.sweep.objective, value)
    return value


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """One run; in a multirun, a failed job is recorded in its folder instead of ending the sweep.

    The failed job returns None: Optuna counts it as a failed trial and samples on.
    """
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return run(cfg, out_dir)
    clear_failure(out_dir)  # a job rerun in the folder of an earlier failure
    try:
        return run(cfg, out_dir)
    except Exception as error:  # one failed job must not end the sweep (Ctrl-C still does)
        log.exception("job %s failed", hydra_cfg.job.num)
        write_failure(out_dir, error)
        return None


if __name__ == "__main__":
    main()
