"""A run folder's resumable state and its guard: nothing written is lost or silently replaced.

The checkpoint is written atomically every round (a crash mid-write leaves the previous one),
holds only tensors and plain Python values, and loads with ``torch.load(weights_only=True)``:
a checkpoint that carries code is refused instead of run. The per-round history is a JSON Lines
file appended once per round, so neither costs more at round 1,000 than at round 10.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from conf.schema import RUN_ONLY_KEYS, changed_settings
from server.results import json_safe

CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_LINES = "history.jsonl"
#: Files that mean a folder holds (part of) a run's results.
RESULT_FILES = (
    CHECKPOINT_NAME,
    HISTORY_LINES,
    "history.json",
    "summary.json",
    "task_accuracy.json",
)
#: Settings a resumed run may change.
RESUMABLE_CHANGES = RUN_ONLY_KEYS | {"federation.rounds"}


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (it holds results, its checkpoint is unusable)."""


LOCK_NAME = ".lock"
_held: dict[Path, FileLock] = {}


def hold_run_folder(folder: Path) -> None:
    """Make this process the only one writing into ``folder`` until it exits: two runs in one
    folder would interleave their history and replace each other's results. Taking it again
    in the same process is free (the guard takes it before Hydra writes, the run again)."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    lock = _held.get(folder)
    if lock is None:
        lock = FileLock(folder / LOCK_NAME)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise RunFolderError(
                f"{folder} is in use by another run right now (its {LOCK_NAME} is held): "
                "wait for it to end, or choose another folder"
            ) from None
        _held[folder] = lock


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # a full disk: the last checkpoint stays in place
        tmp.unlink(missing_ok=True)
        raise RunFolderError(f"cannot write the checkpoint {path}: {error}") from error


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The saved state; a truncated, foreign or code-carrying file is an error naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise RunFolderError(
            f"{path} holds more than tensors and plain values, so it was not loaded (a "
            f"checkpoint written by this project never does): {str(error).splitlines()[0]}"
        ) from error
    except (OSError, RuntimeError, EOFError, zipfile.BadZipFile) as error:
        raise RunFolderError(f"{path} is not a readable checkpoint: {error}") from error
    needed = {"round", "strategy", "config", "wall_seconds"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise RunFolderError(f"{path} is not a checkpoint of this project")
    return state


def check_resumable(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """A run resumes only under the configuration it was started with (the settings of
    :data:`RESUMABLE_CHANGES` aside). A setting added since the checkpoint was written counts
    as what runs then did (``conf.schema.LEGACY_VALUES``), else its default."""
    changed = changed_settings(dict(saved), dict(current), RESUMABLE_CHANGES)
    if changed:
        details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changed[:5])
        raise RunFolderError(
            f"cannot resume: the configuration changed since the checkpoint ({details})"
        )


def results_in(folder: Path) -> list[str]:
    return [name for name in RESULT_FILES if (folder / name).exists()]


def check_run_folder(folder: Path, resume: bool, flat: Mapping[str, Any]) -> dict[str, Any] | None:
    """Whether a run may start in ``folder``; the checkpoint's state when it resumes.

    A folder with results is never written over unless asked (``resume=true``); a resume is
    refused when the checkpoint is missing, unreadable, not finite or from another
    configuration, or the history is damaged; a folder another run is writing into is refused.
    A refused start writes nothing. Once accepted, the folder is this process's
    (:func:`hold_run_folder`), and the checks are made again under the lock: a run that
    finished in between is not written over either.
    """
    _check_run_folder(folder, resume, flat)
    hold_run_folder(folder)
    return _check_run_folder(folder, resume, flat)


def _check_run_folder(folder: Path, resume: bool, flat: Mapping[str, Any]) -> dict[str, Any] | None:
    checkpoint = folder / CHECKPOINT_NAME
    found = results_in(folder)
    if not resume:
        if found:
            raise RunFolderError(
                f"{folder} already holds results ({', '.join(found)}): pass resume=true to "
                "continue that run, or choose another output folder (hydra.run.dir=... for "
                "simulate.py, output.dir=... under flwr run) to start a new one"
            )
        return None
    if not checkpoint.exists():
        raise RunFolderError(f"resume=true but there is no checkpoint at {checkpoint}")
    saved = load_checkpoint(checkpoint)
    check_resumable(saved["config"], flat)
    params = saved["strategy"].get("params", {}) if isinstance(saved["strategy"], dict) else {}
    broken = sorted(n for n, t in params.items() if not bool(torch.isfinite(t).all()))
    if broken:
        raise RunFolderError(f"{checkpoint} holds non-finite parameters ({', '.join(broken[:3])})")
    read_history(folder, int(saved["round"]))  # a damaged history.jsonl: an error naming it
    rounds = flat.get("federation.rounds")
    if isinstance(rounds, int) and saved["round"] > rounds:
        raise RunFolderError(
            f"{checkpoint} is at round {saved['round']}, past federation.rounds={rounds}: "
            "resume with at least that many"
        )
    return saved


def _line(record: Mapping[str, Any]) -> str:
    return json.dumps(json_safe(dict(record))) + "\n"


def append_history(folder: Path, record: Mapping[str, Any]) -> None:
    with (folder / HISTORY_LINES).open("a") as lines:
        lines.write(_line(record))


def read_history(folder: Path, up_to_round: int) -> list[dict[str, Any]]:
    """The per-round records up to ``up_to_round`` (a later line of a round updates it: the
    final evaluation's); lines past it (written after the last checkpoint) are dropped."""
    path = folder / HISTORY_LINES
    records: dict[int, dict[str, Any]] = {}
    lines = path.read_text().splitlines() if path.exists() else []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                break  # a line cut short by a crash: that round is redone
            raise RunFolderError(f"{path}:{number} is not JSON: {error}") from error
        if record.get("round", up_to_round + 1) <= up_to_round:
            records.setdefault(record["round"], {}).update(record)
    return [records[r] for r in sorted(records)]


def rewrite_history(folder: Path, history: list[dict[str, Any]]) -> None:
    """Drop lines past the checkpoint, so that the file and the resumed run agree."""
    tmp = folder / f"{HISTORY_LINES}.tmp"
    tmp.write_text("".join(_line(h) for h in history))
    os.replace(tmp, folder / HISTORY_LINES)
