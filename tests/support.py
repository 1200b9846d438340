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
