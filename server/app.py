"""The Flower ServerApp. ``app`` serves ``flwr run .`` and deployments (settings from the run
config); ``simulate.py`` builds its own with the Hydra-composed settings baked in.

Where a run started by ``flwr run`` writes its results (see docs/flwr-run.md): ``output.dir``,
in which ``{run_id}`` stands for the Flower run id; a relative folder is taken relative to
``$FLWR_HOME`` of the process running the ServerApp (``~/.flwr`` when unset), because the
ServerApp runs in a process of the SuperLink whose working directory nobody chose. The default
in pyproject.toml, ``outputs/{run_id}``, gives each run its own ``$FLWR_HOME/outputs/<run id>``;
to resume a run, point ``output.dir`` at its folder and set ``resume=true``.
"""

from __future__ import annotations

import os
import sys
import threading
from logging import INFO
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log, update_console_handler
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.utils import get_flwr_home
from omegaconf import DictConfig

from conf.schema import settings_from_flat
from server.federation import RunInterrupted, run_federation
from server.progress import RoundReporter

RUN_ID_PLACEHOLDER = "{run_id}"

# Flower colours its console lines; escape codes belong on a terminal, not in pipes and log files.
update_console_handler(colored=sys.stderr.isatty() and "NO_COLOR" not in os.environ)


def resolve_output_dir(template: str, run_id: int, base: Path | None = None) -> Path:
    """The absolute results folder for ``output.dir = template`` in run ``run_id``.

    ``{run_id}`` is replaced by the run id, ``~`` is expanded, and a relative path is taken
    relative to ``base`` (default: ``$FLWR_HOME``).
    """
    if not template.strip():
        raise ValueError("config key output.dir is empty: give a folder, e.g. 'outputs/{run_id}'")
    path = Path(os.path.expanduser(template.replace(RUN_ID_PLACEHOLDER, str(run_id))))
    if not path.is_absolute():
        path = (base if base is not None else get_flwr_home()) / path
    return path.resolve()


def build_server_app(
    settings: DictConfig | None = None,
    out_dir: Path | None = None,
    reporter: RoundReporter | None = None,
    stopped: threading.Event | None = None,
) -> ServerApp:
    """A ServerApp running the federation with ``settings`` into ``out_dir``.

    Without ``settings`` they come from ``context.run_config`` (``flwr run``, deployments),
    checked against conf/schema.py: an unknown key or a bad value fails the run with an error
    naming the key. Without ``out_dir`` the folder comes from ``output.dir``
    (:func:`resolve_output_dir`). With ``stopped``, a run stopped on request sets it and
    returns instead of failing: Flower's simulation then ends at once (after a failed
    ServerApp it waits 3 s for a context that never comes), and the caller reports the stop.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = settings if settings is not None else settings_from_flat(dict(context.run_config))
        if out_dir is not None:
            folder = out_dir
        else:
            folder = resolve_output_dir(cfg.output.dir, context.run_id)
            log(INFO, "run %d: results go to %s", context.run_id, folder)
        try:
            run_federation(grid, cfg, folder, reporter)
        except RunInterrupted:
            if stopped is None:
                raise
            stopped.set()

    return app


app = build_server_app()
