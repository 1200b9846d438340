"""One line describing the machine a benchmark ran on (shared by every script here)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


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
