"""Write and read the resumable state of a run, atomically (a crash mid-write loses nothing)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    # weights_only=False: the state holds Python RNG tuples and plain dicts written by us.
    return torch.load(path, map_location="cpu", weights_only=False)


def check_resumable(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A run resumes only under the configuration it was started with (``resume`` aside)."""
    ignore = {"resume", "federation.rounds", "federation.timeout", "output.dir", "output.plots"}
    changed = sorted(
        key
        for key in set(saved) | set(current)
        if key not in ignore and saved.get(key) != current.get(key)
    )
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:5])
        raise ValueError(
            f"cannot resume: the configuration changed since the checkpoint ({details})"
        )
