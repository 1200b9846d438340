"""The Flower ServerApp. ``app`` serves ``flwr run .`` and deployments (settings from the run
config); ``simulate.py`` builds its own with the Hydra-composed settings baked in."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from conf.schema import settings_from_flat
from server.federation import run_federation


def build_server_app(settings: DictConfig | None = None, out_dir: Path | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = settings if settings is not None else settings_from_flat(dict(context.run_config))
        run_federation(grid, cfg, out_dir if out_dir is not None else Path(cfg.output.dir))

    return app


app = build_server_app()
