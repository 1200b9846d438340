"""What the end-to-end tests share: the environment of the processes they start."""

from __future__ import annotations

import os
import sys
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    """A private Flower home, no telemetry, no stray Ray cluster, this venv's tools on PATH."""
    return {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        "FLWR_HOME": str(tmp_path / "flwr_home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def assert_matches_central_differences(grads, params, objective, eps: float = 1e-6) -> None:
    """Every group gets a gradient, and 3 random entries per tensor match central differences
    of ``objective(params)`` (a float) in float64."""
    import pytest
    import torch

    generator = torch.Generator().manual_seed(0)
    for name, value in params.items():
        assert grads[name].abs().sum() > 0, f"no meta-gradient reaches {name}"
        for index in torch.randperm(value.numel(), generator=generator)[:3].tolist():
            losses = []
            for sign in (1, -1):
                probe = {k: v.clone().requires_grad_(True) for k, v in params.items()}
                with torch.no_grad():
                    probe[name].view(-1)[index] += sign * eps
                losses.append(objective(probe))
            numeric = (losses[0] - losses[1]) / (2 * eps)
            assert grads[name].reshape(-1)[index].item() == pytest.approx(
                numeric, rel=1e-4, abs=1e-7
            ), name
