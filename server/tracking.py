"""Experiment tracking through the well-kept libraries: TensorBoard event files or MLflow.

``tracking.backend=tensorboard`` (the default) writes event files into the run folder's
``tensorboard/``, so ``tensorboard --logdir outputs`` (or a sweep folder) shows every run side by
side; ``mlflow`` logs into a local MLflow store (``tracking.uri``, default a SQLite file in
``mlruns/`` beside the run folder, so a sweep's jobs share one store, artifacts next to it:
offline, ``mlflow ui --backend-store-uri sqlite:///<that folder>/mlflow.db`` browses it), one
MLflow run per run folder; a resumed run continues its MLflow run. What is logged: every
round's training metrics, the target-node metrics on evaluation rounds, the resolved
configuration as parameters, the final summary, and the plots (and history/summary files) as
artifacts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from conf.choices import TrackingBackend

SKIPPED = {"round"}
#: Per-round figures of the run itself, not of the target nodes.
RUN_KEYS = {
    "seconds",
    "evaluation_seconds",
    "bytes_per_client",
    "replies",
    "clipped",
    "update_norm",
    "reg_weight",
    "epsilon",
}


def _scalars(record: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if k not in SKIPPED and isinstance(v, int | float) and not isinstance(v, bool)
    }


def _tag(key: str) -> str:
    """``train_loss`` -> ``train/loss``; target-node figures under ``target/``."""
    if key.startswith("train_"):
        return f"train/{key.removeprefix('train_')}"
    if key in RUN_KEYS:
        return f"run/{key}"
    return f"target/{key}"


class Tracker:
    """Does nothing: ``tracking.backend=none``."""

    def round(self, record: Mapping[str, Any]) -> None:
        pass

    def finish(self, summary: Mapping[str, Any], files: list[Path]) -> None:
        pass

    def abort(self) -> None:
        """The run stopped without a result (failed, interrupted): close what is open."""


class TensorBoardTracker(Tracker):
    def __init__(self, folder: Path, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.config = dict(config)
        self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"))

    def round(self, record: Mapping[str, Any]) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(_tag(key), value, record["round"])
        if "accuracy" in record:  # evaluation rounds: a file write, not one every round
            self.writer.flush()

    def finish(self, summary: Mapping[str, Any], files: list[Path]) -> None:
        import numpy as np
        from PIL import Image

        hparams = {
            k: v if isinstance(v, int | float | str | bool) else str(v)
            for k, v in self.config.items()
        }
        metrics = {f"final/{k}": v for k, v in _scalars(summary).items()}
        self.writer.add_hparams(hparams, metrics, run_name=".")
        for path in files:
            if path.suffix == ".png":
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self.writer.add_image(f"plots/{path.stem}", pixels, dataformats="HWC")
        self.writer.close()

    def abort(self) -> None:
        self.writer.close()


class MlflowTracker(Tracker):
    RUN_ID_FILE = "mlflow_run_id.txt"

    def __init__(self, folder: Path, config: Mapping[str, Any], uri: str | None, experiment: str):
        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.mlflow = mlflow
        if not uri:  # beside the run folder: a sweep's jobs, or a day's runs, share one store
            store = folder.resolve().parent / "mlruns"
            store.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{store / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        if mlflow.get_experiment_by_name(experiment) is None:
            location = None
            if uri.startswith("sqlite:///"):
                location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
            mlflow.create_experiment(experiment, artifact_location=location)
        mlflow.set_experiment(experiment)
        id_file = folder / self.RUN_ID_FILE
        resumed = id_file.read_text().strip() if id_file.exists() else None
        self.run = mlflow.start_run(run_id=resumed, run_name=None if resumed else folder.name)
        id_file.write_text(self.run.info.run_id)
        if resumed is None:
            mlflow.log_params({k: str(v)[:500] for k, v in config.items()})
            mlflow.set_tag("run_folder", str(folder.resolve()))

    def round(self, record: Mapping[str, Any]) -> None:
        metrics = {_tag(k).replace("/", "."): v for k, v in _scalars(record).items()}
        self.mlflow.log_metrics(metrics, step=int(record["round"]))

    def finish(self, summary: Mapping[str, Any], files: list[Path]) -> None:
        self.mlflow.log_metrics({f"final.{k}": v for k, v in _scalars(summary).items()})
        for path in files:
            if path.exists():
                self.mlflow.log_artifact(str(path))
        self.mlflow.end_run()

    def abort(self) -> None:
        """Ended as KILLED: a resume continues it (the run folder keeps its id)."""
        self.mlflow.end_run(status="KILLED")


def make_tracker(
    backend: TrackingBackend | str,
    folder: Path,
    config: Mapping[str, Any],
    uri: str | None = None,
    experiment: str = "MetaGater",
) -> Tracker:
    """The tracker of ``tracking.backend`` for the run in ``folder`` (flat ``config``)."""
    backend = TrackingBackend(backend)
    if backend is TrackingBackend.tensorboard:
        return TensorBoardTracker(folder, config)
    if backend is TrackingBackend.mlflow:
        return MlflowTracker(
            folder, config, uri or os.environ.get("MLFLOW_TRACKING_URI"), experiment
        )
    return Tracker()


def _mlflow_schemes() -> set[str] | None:
    """The URI schemes MLflow has a tracking store for (its store registry; None if this MLflow
    keeps it elsewhere: then the store itself says so when the run opens it)."""
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        return set(_tracking_store_registry._registry)
    except (ImportError, AttributeError):
        return None


def check_tracking_store(backend: TrackingBackend | str, uri: str | None) -> None:
    """Refuse an MLflow tracking server that does not answer, before anything starts: otherwise
    the run would fail after Ray and the discovery round (or wait out MLflow's retries).
    Only HTTP(S) servers are probed: local stores (a path, ``sqlite:``, ``file:``) are created
    by the run itself, and database or Databricks stores fail with their driver's message."""
    source = "config key tracking.uri" if uri else "MLFLOW_TRACKING_URI"
    fix = "leave tracking.uri unset" if uri else "unset MLFLOW_TRACKING_URI"
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if TrackingBackend(backend) is not TrackingBackend.mlflow or not uri:
        return
    scheme = urlparse(uri).scheme.split("+")[0]  # postgresql+psycopg2://... is postgresql
    if (known := _mlflow_schemes()) is not None and scheme not in known:
        raise ValueError(
            f"{source}={uri}: MLflow has no tracking store for the scheme {scheme!r} (it knows "
            f"{', '.join(sorted(s for s in known if s))}); {fix} for a local store"
        )
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.tracking import MlflowClient

    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {key: os.environ.get(key) for key in quick}
    os.environ.update(quick)
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as error:  # whatever the server or the network says, the run cannot log
        raise ValueError(
            f"{source}={uri}: the MLflow tracking server does not answer "
            f"({type(error).__name__}: {str(error)[:200]}); start it, or {fix} "
            "for a local store beside the run folder"
        ) from error
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
