"""Find and read finished (or failed) run folders: the input of every report.

Also a job's half of failure handling in a multirun: :func:`write_failure` records in the job's
folder why it failed; ``analysis.callbacks.SweepFolder`` lists them at the end of the sweep.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from conf.choices import StrategyName
from conf.schema import RUN_ONLY_KEYS, changed_settings, legacy_flat, settings_from_flat, to_flat
from gating.federated.strategies import Strategy, strategy_named
from server.checkpoint import CHECKPOINT_NAME, RunFolderError, load_checkpoint
from server.results import TASK_ACCURACY_FILE

FAILURE_FILE = "FAILED.txt"  # written by simulate.py when a job of a sweep fails
# Keys that never make two runs different configurations.
NOT_A_SETTING = RUN_ONLY_KEYS | {"seed"}


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # flat: {"federation.rounds": 300, ...}
    summary: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    failure: str | None = None
    task_accuracy: dict[str, float] = field(default_factory=dict)  # target partition -> accuracy

    @property
    def protocol(self) -> tuple[str, int, int]:
        """Runs are only comparable on the same data and task shape."""
        return (self.config["dataset.name"], self.config["task.ways"], self.config["task.shots"])


def strategy_in(config: dict[str, Any]) -> Strategy | None:
    """The record of a run's strategy; None for a name this revision does not know."""
    name = config.get("strategy.name")
    return strategy_named(name) if name in set(StrategyName) else None


def inert_keys(config: dict[str, Any]) -> set[str]:
    """Settings the run's strategy never reads.

    Runs that differ only in these are the same experiment: ``-m strategy=metagater,fedmeta
    gating.target_ratio=0.3,0.5`` runs fedmeta twice, identically.
    """
    strategy = strategy_in(config)
    inert = {k for k in config if strategy is not None and not strategy.reads(k)}
    if config.get("model.arch", "conv") == "conv":  # Conv-N reads width and depth
        inert.add("model.widths")
    else:  # the ResNets read their stage widths
        inert |= {"model.width", "model.depth"}
    if config.get("robust.aggregation", "mean") != "centered_clipping":
        inert.add("robust.cc_radius")
    assumes_liars = {"krum", "multi_krum", "bulyan"}
    if config.get("robust.aggregation", "mean") not in assumes_liars and not config.get(
        "robust.nnm"
    ):
        inert.add("robust.byzantine")
    return inert & set(config)


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
    # How a sweep scored the run (simulate.py's sweep.*) is not a setting of the run.
    flat = legacy_flat({k: v for k, v in flat.items() if not k.startswith("sweep.")})
    try:
        return to_flat(settings_from_flat(flat))
    except (KeyError, ValueError):
        return flat


def load_run(path: Path) -> Run:
    """Our config.yaml once the run started; Hydra's copy if it failed before that."""
    config = path / "config.yaml"
    if not config.exists():
        config = path / ".hydra" / "config.yaml"
    try:
        run = Run(path=path, config=_flat_config(config))
    except Exception as error:  # a damaged config: the run is listed, not the report lost
        return Run(path=path, config={}, failure=f"unreadable {config.name}: {error}")
    try:
        run.summary = _read_json(path / "summary.json")
        run.history = _read_json(path / "history.json") or []
        run.task_accuracy = _read_json(path / TASK_ACCURACY_FILE) or {}
    except ValueError as error:
        run.summary, run.failure = None, str(error)
        return run
    if (path / FAILURE_FILE).exists():
        run.failure = (path / FAILURE_FILE).read_text().strip()
    elif run.summary is None:
        run.failure = "no summary.json (interrupted or still running)"
    elif edited := _edited_settings(path, run.config):
        run.failure = edited
    return run


def _edited_settings(path: Path, flat: dict[str, Any]) -> str | None:
    """Why the run must not be filed under its config.yaml: the file was changed after the
    run wrote it (the checkpoint keeps the settings the run really had)."""
    checkpoint = path / CHECKPOINT_NAME
    if not checkpoint.exists():
        return None
    try:
        ran_with = load_checkpoint(checkpoint)["config"]
    except RunFolderError as error:
        return str(error)
    changed = changed_settings(dict(ran_with), flat, RUN_ONLY_KEYS | {"federation.rounds"})
    if not changed:
        return None
    details = ", ".join(
        f"{k}: ran with {old!r}, config.yaml says {new!r}" for k, old, new in changed
    )
    return f"config.yaml differs from the settings in its checkpoint ({details})"


def _read_json(path: Path) -> Any:
    """The file's content, None when it is absent; ValueError naming a damaged file."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path.name} is damaged ({error}), so this run is left out") from error


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


def write_failure(out_dir: Path, error: BaseException) -> Path:
    """Record in the job's folder, in one paragraph, why the job failed.

    The chain of causes is included because Flower wraps the ServerApp's error in its own.
    """
    reasons = []
    seen: BaseException | None = error
    while seen is not None and len(reasons) < 4:
        cause = seen.__cause__ or seen.__context__
        if cause is None or str(cause) != str(seen):  # a re-raise with the same words adds none
            reasons.append(f"{type(seen).__name__}: {seen}".strip())
        seen = cause
    text = " <- caused by ".join(" ".join(r.split()) for r in reasons)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FAILURE_FILE
    path.write_text(f"{text} (traceback in this folder's simulate.log)\n")
    return path


def clear_failure(out_dir: Path) -> None:
    """A job rerun in a folder that failed before must not keep the old marker."""
    (out_dir / FAILURE_FILE).unlink(missing_ok=True)


def failed_jobs(sweep_dir: Path, since: float = 0.0) -> list[tuple[Path, str]]:
    """(job folder, reason) for every failure marker under ``sweep_dir`` written after ``since``."""
    return [
        (marker.parent, marker.read_text().splitlines()[0])
        for marker in sorted(sweep_dir.rglob(FAILURE_FILE))
        if marker.stat().st_mtime >= since
    ]
