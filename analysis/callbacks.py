"""Hydra callbacks and resolvers of ``simulate.py``: where runs and sweeps write, and how they end.

- :class:`RunFolderGuard`: a single run never writes over a folder that holds results.
- :class:`SweepFolder`: a multirun is one folder, named once from the command, that every job
  and trial writes under; at the end the failed jobs are listed and the exit status is 1.
- :func:`sweep_name`, :func:`folder_name`: the resolvers that name those folders with characters
  that are safe in a shell, on every file system and in Flower's app manifest (no commas).
"""

from __future__ import annotations

import hashlib
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from analysis.runs import failed_jobs
from conf.schema import to_flat
from server.checkpoint import RunFolderError, check_run_folder

# Flower's app manifest is "path,sha256,bits" per file: a comma in a path breaks `flwr run`.
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")


def folder_name(text: str) -> str:
    """``text`` as one safe folder name: '/' and other unsafe characters become '-', commas '+'."""
    return _UNSAFE.sub("-", str(text).replace(",", "+"))


def sweep_name(overrides: list[str]) -> str:
    """The default sweep folder's name: the command line's overrides, sorted, so that running
    the same sweep command again finds the same folder (and continues it)."""
    name = folder_name("_".join(sorted(str(o) for o in overrides))) or "default"
    if len(name) > 120:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[:100]}_{digest}"
    return name


def hydra_quoted(value: str) -> str:
    """``value`` as a quoted string of Hydra's override grammar (backslashes before a quote
    doubled, the quote escaped)."""
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return f"'{escaped}'"


class RunFolderGuard(Callback):
    """Before a single run writes anything (Hydra's own launch record included): refuse a
    folder that holds results unless ``resume=true``, a resume that cannot work, and a folder
    another run is writing into; then hold the folder for this run. A refused start therefore
    changes nothing in the folder."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.run.dir))
        try:
            check_run_folder(folder, bool(config.resume), to_flat(config))
        except RunFolderError as error:
            # Hydra's callback runner swallows exceptions but not SystemExit; one line and
            # exit status 2, as simulate.py ends every other refused run
            print(f"Error: {error}", file=sys.stderr)
            raise SystemExit(2) from error


class SweepFolder(Callback):
    """One multirun, one folder: every job, trial, failure marker and report under it.

    Hydra composes each job's config again from the job's own overrides, so a sweep folder
    named from ``hydra.overrides.task`` would be named anew, differently, in every job. The
    folder is therefore resolved once here, from the command's overrides, and handed to every
    job (and Optuna trial) as a ``hydra.sweep.dir`` override of its own.

    At the end the failed jobs are listed and the exit status is 1: Hydra's sweepers return
    normally when the task function returned, which ``simulate.py`` does for a failed job
    (after writing its FAILED.txt) so that the other jobs still run. The markers are found on
    disk, so jobs that a launcher ran in other processes count too.
    """

    def __init__(self) -> None:
        self.started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time() - 1.0  # file times may be coarser than the clock
        folder = str(config.hydra.sweep.dir)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.sweep.dir = folder
            pinned = [o for o in config.hydra.overrides.hydra if not _sets_sweep_dir(o)]
            config.hydra.overrides.hydra = [*pinned, f"hydra.sweep.dir={hydra_quoted(folder)}"]
        print(f"sweep folder: {folder}", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        print(
            f"sweep folder: {sweep_dir}\n"
            f"report: python -m analysis.report {shlex.quote(str(sweep_dir))}",
            flush=True,
        )
        if not sweep_dir.exists():
            return
        failed = failed_jobs(sweep_dir, since=self.started)
        if not failed:
            return
        lines = [f"{len(failed)} job(s) of the sweep in {sweep_dir} failed:"]
        lines += [f"  {folder.relative_to(sweep_dir)}: {reason}" for folder, reason in failed]
        # Hydra's callback runner swallows exceptions but not SystemExit: this prints the list
        # on stderr and exits with status 1.
        raise SystemExit("\n".join(lines))


def _sets_sweep_dir(override: str) -> bool:
    return override.lstrip("+~").split("=", 1)[0] == "hydra.sweep.dir"
