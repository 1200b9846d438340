"""What every benchmark script shares: the machine it ran on, and the run configuration that
``python simulate.py <overrides>`` would compose."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]


def describe_host() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import flwr

    return (
        f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch thread(s), Python "
        f"{platform.python_version()}, torch {torch.__version__}, flwr {flwr.__version__}"
    )


def compose_config(overrides: list[str]) -> DictConfig:
    """The configuration ``python simulate.py <overrides>`` would run."""
    from hydra import compose, initialize_config_dir

    import simulate  # noqa: F401  (registers the structured config Hydra composes onto)
    from conf.schema import validate

    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=overrides)
    return validate(cfg)
