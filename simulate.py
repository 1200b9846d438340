"""Run a simulated MetaGater federation: Flower ServerApp + ClientApps in Ray actors.

    python simulate.py                                    # metagater on digits, small federation
    python simulate.py strategy=fedmeta dataset=fashion_mnist federation.rounds=300 seed=1
    python simulate.py resume=true hydra.run.dir=outputs/run1

Results (config.yaml, history.json, summary.json, checkpoint.pt, PNG plots) land in the Hydra
run folder. The exit status is non-zero when the run failed.
"""

from __future__ import annotations

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
from omegaconf import DictConfig

from conf.schema import RunConfig, validate

ConfigStore.instance().store(name="base_config", node=RunConfig)


def simulate(cfg: DictConfig, out_dir: Path) -> None:
    """Run one simulated federation with ``cfg`` into ``out_dir``."""
    from flwr.simulation import run_simulation

    # Flower has its own console handler; Hydra's root handler would print every line twice.
    logging.getLogger("flwr").propagate = False

    from client.app import app as client_app
    from server.app import build_server_app

    backend = {
        "client_resources": {"num_cpus": cfg.ray.client_cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": cfg.ray.num_cpus, "include_dashboard": False},
    }
    if cfg.ray.address:
        backend["init_args"] = {"address": cfg.ray.address}
    run_simulation(
        server_app=build_server_app(cfg, out_dir),
        client_app=client_app,
        num_supernodes=cfg.federation.train_nodes + cfg.federation.target_nodes,
        backend_config=backend,
    )


def preflight(cfg: DictConfig) -> None:
    """Fail in one clear line, before Ray starts, when the dataset cannot be read at all."""
    from client.data import load_dataset

    load_dataset(cfg.dataset.name, cfg.dataset.path, cfg.dataset.image_size)


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    validate(cfg)
    preflight(cfg)
    simulate(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
