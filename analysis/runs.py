"""Find and read finished (or failed) run folders: the input of every report."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from conf.schema import settings_from_flat, to_flat

FAILURE_FILE = "FAILED.txt"  # written by simulate.py when a job of a sweep fails
# Keys that never make two runs different configurations.
NOT_A_SETTING = {"seed", "resume", "output.dir", "output.plots", "federation.timeout"}


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # flat: {"federation.rounds": 300, ...}
    summary: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    failure: str | None = None

    @property
    def protocol(self) -> tuple[str, int, int]:
        """Runs are only comparable on the same data and task shape."""
        return (self.config["dataset.name"], self.config["task.ways"], self.config["task.shots"])


def _flat_config(path: Path) -> dict[str, Any]:
    """The run's config as flat keys; a run folder from an older schema still loads."""
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = "" if node is None else node

    walk(raw, "")
    try:
        return to_flat(settings_from_flat(flat))
    except (KeyError, ValueError):
        return flat


def load_run(path: Path) -> Run:
    """Our config.yaml once the run started; Hydra's copy if it failed before that."""
    config = path / "config.yaml"
    if not config.exists():
        config = path / ".hydra" / "config.yaml"
    run = Run(path=path, config=_flat_config(config))
    if (path / "summary.json").exists():
        run.summary = json.loads((path / "summary.json").read_text())
    if (path / "history.json").exists():
        run.history = json.loads((path / "history.json").read_text())
    if (path / FAILURE_FILE).exists():
        run.failure = (path / FAILURE_FILE).read_text().strip()
    elif run.summary is None:
        run.failure = "no summary.json (interrupted or still running)"
    return run


def find_runs(*roots: Path) -> list[Run]:
    """Every run folder under the roots: one with a summary, a failure marker or our config."""
    markers = {"summary.json", FAILURE_FILE, "config.yaml"}
    folders: set[Path] = set()
    for root in roots:
        if not root.exists():
            raise FileNotFoundError(f"no such folder: {root}")
        folders |= {
            p.parent for p in root.rglob("*") if p.name in markers and p.parent.name != ".hydra"
        }
    return [
        load_run(folder)
        for folder in sorted(folders)
        if (folder / "config.yaml").exists() or (folder / ".hydra" / "config.yaml").exists()
    ]
