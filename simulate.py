"""Run a simulated MetaGater federation: Flower ServerApp + ClientApps in Ray actors.

    python simulate.py                                    # metagater on digits, small federation
    python simulate.py strategy=fedmeta dataset=fashion_mnist federation.rounds=300 seed=1
    python simulate.py resume=true hydra.run.dir=outputs/run1
    python simulate.py -m strategy=metagater,fedmeta gating.target_ratio=0.3,0.5,0.7 seed=0,1,2
    python simulate.py -m +search=steps                   # Optuna search of the step sizes

Results (config.yaml, history.json, summary.json, checkpoint.pt, PNG plots) land in the Hydra
run folder. A single run's error propagates: the exit status is non-zero. In a multirun a failed
job writes FAILED.txt into its folder and the other jobs still run; the failed jobs are listed at
the end and the exit status is non-zero (``analysis.callbacks.SweepFolder``). ``main`` returns the
``sweep.objective`` of the run, which is what a sweeper such as Optuna optimizes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn
from unittest import mock

# Flower reads these at import time: no telemetry, no update check, state kept in the project.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_HOME", str(Path(__file__).resolve().parent / ".flwr_home"))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray's C++ core dumps a stack on SIGTERM and aborts the process (exit status 134) after the
# run's own handler has stopped it cleanly.
os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
if not sys.stderr.isatty() or "NO_COLOR" in os.environ:  # escape codes only on a terminal
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    os.environ.setdefault("NO_COLOR", "1")  # the convention colorlog (Optuna's log) follows

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from analysis.callbacks import folder_name, sweep_name
from analysis.runs import clear_failure, write_failure
from conf.schema import SimulateConfig, validate

ConfigStore.instance().store(name="base_config", node=SimulateConfig)
for resolver in (sweep_name, folder_name):  # the sweep's and its jobs' folder names
    OmegaConf.register_new_resolver(resolver.__name__, resolver, replace=True)

log = logging.getLogger("simulate")


def gpu_resources(cfg: DictConfig) -> tuple[float, int]:
    """(GPU share per ClientApp actor, GPUs Ray may use), checked before Ray starts.

    By default a CUDA run shares one GPU among all the actors this machine runs (Ray packs
    them by their CPU count) and lets Ray see every GPU; a CPU run asks for none, and Ray hides
    the GPUs from its actors (so ``device=auto`` is the CPU there, as asked).
    """
    import torch

    from gating.federated.settings import resolve_device

    actors = max(1, int(cfg.ray.num_cpus // cfg.ray.client_cpus))
    if cfg.ray.address:  # a cluster's nodes declared their own GPUs: nothing to check here
        client_gpus = cfg.ray.client_gpus or 0.0
        return float(client_gpus), int(cfg.ray.num_gpus or 0)
    device = resolve_device(cfg.device)  # refuses cuda where torch sees none, naming `device`
    visible = torch.cuda.device_count()
    if device.type == "cuda" and device.index is not None:
        raise ValueError(
            f"config key device={cfg.device}: in a simulation Ray gives each ClientApp actor its "
            "GPU, which it sees as cuda:0; use device=cuda (and CUDA_VISIBLE_DEVICES=N python "
            "simulate.py ... to run on GPU N)"
        )
    client_gpus = cfg.ray.client_gpus
    if client_gpus is None:
        client_gpus = 1.0 / actors if device.type == "cuda" else 0.0
    num_gpus = cfg.ray.num_gpus if cfg.ray.num_gpus is not None else visible
    if client_gpus > 0 and visible == 0:
        raise ValueError(
            f"config key ray.client_gpus={client_gpus}: torch sees no GPU here; set it to 0 "
            "(or leave it unset) to run the clients on the CPU"
        )
    if client_gpus > 0 and num_gpus == 0:
        raise ValueError(
            f"config key ray.num_gpus=0 with ray.client_gpus={client_gpus}: no actor could "
            "start; give Ray the GPUs (leave ray.num_gpus unset)"
        )
    if client_gpus == 0 and device.type == "cuda":
        raise ValueError(
            "config key ray.client_gpus=0 with device=cuda: Ray hides the GPUs from actors that "
            "reserve none; give them a share (leave ray.client_gpus unset) or use device=cpu"
        )
    return float(client_gpus), int(num_gpus)


def backend_config(cfg: DictConfig) -> dict:
    """Flower's Ray backend settings: a Ray of the run's own, or an existing cluster.

    Without ``ray.address`` the run starts a private Ray of ``ray.num_cpus`` CPUs (and the
    GPUs of :func:`gpu_resources`): address "local" keeps a plain ray.init() from joining a
    cluster that `ray start` left on this machine (or RAY_ADDRESS names), which would fail on
    the CPU count. Attaching passes only the address: Ray refuses resource counts for a
    running cluster, whose nodes declared their own resources.
    """
    client_gpus, num_gpus = gpu_resources(cfg)
    init_args: dict = {
        "address": "local",
        "num_cpus": cfg.ray.num_cpus,
        "num_gpus": num_gpus,
        "include_dashboard": False,
    }
    if cfg.ray.address:
        init_args = {"address": cfg.ray.address}
    return {
        "client_resources": {"num_cpus": cfg.ray.client_cpus, "num_gpus": client_gpus},
        "init_args": init_args,
    }


def simulate(cfg: DictConfig, out_dir: Path) -> None:
    """Run one simulated federation with ``cfg`` into ``out_dir``."""
    quiet_start_up()
    import ray
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import build_server_app
    from server.federation import STOP_REQUESTED, RunInterrupted
    from server.progress import ProgressReporter

    stopped = threading.Event()
    # Flower appends this driver's sys.path to PYTHONPATH at every Ray start: restore it, or it
    # grows with every job of a multirun.
    pythonpath = os.environ.get("PYTHONPATH")
    try:
        run_simulation(
            server_app=build_server_app(cfg, out_dir, ProgressReporter(), stopped),
            client_app=client_app,
            num_supernodes=cfg.federation.train_nodes + cfg.federation.target_nodes,
            backend_config=backend_config(cfg),
        )
    except BaseException:
        # Flower's runtime may end (Ray failed to start, a second Ctrl-C) while the ServerApp's
        # thread, which the interpreter waits for at exit, still waits for nodes: stop it too.
        STOP_REQUESTED.set()
        raise
    finally:
        # Flower's Ray backend shuts Ray down when it ends, but not when it fails before it was
        # built: the next job of a multirun would then reuse this Ray, with this job's ray.*
        # settings. Against a cluster (ray.address) this only disconnects; the cluster runs on.
        ray.shutdown()
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath
    if stopped.is_set():
        raise RunInterrupted("stopped on request")


class _DropKnownDeprecation(logging.Filter):
    """``run_simulation`` is deprecated in Flower 1.39 and says so on every run; the README
    explains once why this project uses it (Hydra owns config, errors and multirun)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def quiet_start_up() -> None:
    """The first screen is the run's own: no third-party INFO lines, no known warning. Every
    round's line goes to the run's log file (the progress bar shows the round on screen)."""
    flower = logging.getLogger("flwr")
    flower.propagate = False  # Flower has its own console handler; Hydra's would print it twice
    if not any(isinstance(f, _DropKnownDeprecation) for f in flower.filters):
        flower.addFilter(_DropKnownDeprecation())
    for noisy in ("alembic", "mlflow"):  # Flower's link state sets up alembic, logging at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Ray announces a change of default we do not depend on (GPU-less actors see no GPU).
    warnings.filterwarnings(
        "ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", category=FutureWarning
    )
    rounds = logging.getLogger("metagater.rounds")
    rounds.propagate = False
    rounds.setLevel(logging.INFO)
    rounds.handlers = [
        h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)
    ]


def preflight(cfg: DictConfig, out_dir: Path) -> None:
    """Fail in one clear line, before Ray starts, when the run cannot work: a device that is
    not here, an MLflow server that does not answer, a missing or malformed dataset, too few
    classes for ``task.ways``, too few samples per class, images the model cannot take, a
    checkpoint to resume from that holds another network. Every node checks both roles'
    classes, so building one training and one target node here finds what every node would."""
    from gating.federated.nodes import partition_task
    from gating.federated.settings import model_spec, run_parameters
    from server.checkpoint import CHECKPOINT_NAME, load_checkpoint
    from server.tracking import check_tracking_store

    gpu_resources(cfg)
    check_tracking_store(cfg.tracking.backend, cfg.tracking.uri)
    fed = cfg.federation
    for partition in (0, fed.train_nodes + fed.target_nodes - 1):
        task = partition_task(cfg, partition)
    spec = model_spec(cfg, task)
    if cfg.resume and (out_dir / CHECKPOINT_NAME).exists():  # a checkpoint of another network
        saved = load_checkpoint(out_dir / CHECKPOINT_NAME)["strategy"]["params"]
        expected = run_parameters(cfg, spec)
        wrong = sorted(n for n in expected if n not in saved or saved[n].shape != expected[n].shape)
        if wrong or set(saved) - set(expected):
            raise ValueError(
                f"{out_dir / CHECKPOINT_NAME} is not a checkpoint of this run's network "
                f"({spec.describe()}): {', '.join(wrong[:3]) or 'unexpected tensors'}"
            )


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Ctrl-C or SIGTERM ask the run to stop: it ends within a poll interval, the last
    completed round's checkpoint intact. A second Ctrl-C ends the process at once."""
    from server.federation import STOP_REQUESTED

    def request_stop(signum: int, frame: object) -> None:
        log.warning("%s: stopping after the round in flight", signal.Signals(signum).name)
        STOPPING.signal = signum
        STOP_REQUESTED.set()
        signal.signal(signal.SIGINT, lambda signum, frame: exit_at_once("second Ctrl-C"))

    STOP_REQUESTED.clear()
    STOPPING.signal = signal.SIGINT
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may handle signals
        return
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    # ray.init replaces the driver's SIGTERM handler with sys.exit, which tears the run down
    # mid-round (stack dumps, exit status 134, no resume hint): keep ours.
    keep_ours = mock.patch("ray._private.utils.set_sigterm_handler", lambda handler: None)
    try:
        with keep_ours:
            yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class Stopping:
    """What the line that ends a stopped process says, and its exit status."""

    signal: int = signal.SIGINT  # the signal that asked to stop: exit status 128 + its number
    run_folder: Path | None = None  # a single run's folder, for the command that continues it


STOPPING = Stopping()


def objective(cfg: DictConfig, summary: dict) -> float:
    """The number a sweeper maximizes, chosen by ``sweep.objective``.

    ``accuracy``: target accuracy after adaptation. ``budgeted_accuracy``: the same minus
    ``sweep.penalty`` per unit of flops_ratio above the target ratio ρ, so a search cannot buy
    accuracy by leaving every gate open.
    """
    accuracy = float(summary["accuracy"])
    if cfg.sweep.objective == "accuracy":
        return accuracy
    excess = max(0.0, float(summary["flops_ratio"]) - cfg.gating.target_ratio)
    return accuracy - cfg.sweep.penalty * excess


def run(cfg: DictConfig, out_dir: Path) -> float:
    """Check the settings and the data, run the federation, and score it for a sweeper."""
    from gating.federated.aggregation import RoundFailed
    from server.checkpoint import RunFolderError
    from server.federation import RunInterrupted

    try:
        validate(cfg)
        preflight(cfg, out_dir)
    except (ValueError, RunFolderError) as error:  # a setting, device, dataset or checkpoint
        raise Refused(str(error)) from error
    try:
        with stop_on_signals():
            simulate(cfg, out_dir)
    except Exception as error:
        if _interrupted(error):
            from server.checkpoint import CHECKPOINT_NAME

            where = (
                f"the last completed round is checkpointed in {out_dir}"
                if (out_dir / CHECKPOINT_NAME).exists()
                else f"no round had completed in {out_dir}"
            )
            raise RunInterrupted(f"stopped on request; {where}") from None
        if (failed := _cause(error, RoundFailed)) is not None:
            from server.checkpoint import CHECKPOINT_NAME

            kept = (out_dir / CHECKPOINT_NAME).exists()
            raise RunFailed(
                f"{failed}; "
                + (
                    f"the last completed round is checkpointed in {out_dir}"
                    if kept
                    else f"no round had completed in {out_dir}"
                )
            ) from error
        raise
    summary = json.loads((out_dir / "summary.json").read_text())
    value = objective(cfg, summary)
    log.info("objective %s = %.4f", cfg.sweep.objective, value)
    return value


def sweep_job_state(cfg: DictConfig, out_dir: Path) -> dict | None:
    """What the same sweep command run again finds in a job's folder: the summary of a
    complete job (not run again), or None to run it, resuming from its checkpoint if it has
    one (``resume`` is switched on). A folder whose results are of another configuration is an
    error: nothing is written over."""
    from omegaconf import OmegaConf, open_dict

    from conf.schema import saved_flat, to_flat
    from server.checkpoint import CHECKPOINT_NAME, check_resumable, results_in

    if not results_in(out_dir):
        return None
    flat = to_flat(cfg)
    saved = out_dir / "config.yaml"
    if saved.exists():
        check_resumable(saved_flat(OmegaConf.load(saved)), flat)
    summary = out_dir / "summary.json"
    if summary.exists() and saved.exists():
        return json.loads(summary.read_text())
    if (out_dir / CHECKPOINT_NAME).exists():
        with open_dict(cfg):
            cfg.resume = True
        log.info("resuming the job in %s from its checkpoint", out_dir)
    return None


class Refused(ValueError):
    """A setting, device or dataset this run cannot use, found before anything started: the
    message names the key and the fix, so a single run prints it without a traceback."""


class RunFailed(RuntimeError):
    """A round could not update the model (too few usable replies: crashed nodes, a Ray node
    lost): the message says why and what is kept, so a single run prints it without a trace."""


def _cause(error: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """``error`` or the first of its causes that is a ``kind``: Flower re-raises the
    ServerApp's exception, or wraps it in its own."""
    while error is not None:
        if isinstance(error, kind):
            return error
        error = error.__cause__ or error.__context__
    return None


def _interrupted(error: BaseException | None) -> bool:
    """Whether ``error`` is (or was caused by) a requested stop."""
    from server.federation import RunInterrupted

    return _cause(error, RunInterrupted) is not None


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """One run; in a multirun, a failed job is recorded in its folder instead of ending the sweep.

    The failed job returns None: Optuna counts it as a failed trial and samples on.
    """
    from server.checkpoint import RunFolderError, hold_run_folder
    from server.federation import STOP_REQUESTED, RunInterrupted

    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    STOPPING.run_folder = out_dir  # for the message of a second Ctrl-C
    if hydra_cfg.mode != RunMode.MULTIRUN:
        try:
            return run(cfg, out_dir)
        except Refused as error:  # the user's to fix: one line, no trace
            print(f"Error: {error}", file=sys.stderr)
            sys.exit(2)
        except RunInterrupted as error:
            stop(f"{error}: continue with {continue_command()}")
        except RunFailed as error:  # nothing to debug in a trace: say what failed and what is kept
            print(f"Error: {error}: continue with {continue_command()}", file=sys.stderr)
            sys.exit(1)
    try:  # another sweep writing into this job's folder right now: end this sweep, touch nothing
        hold_run_folder(out_dir)
    except RunFolderError as error:
        print(f"Error: {error}", file=sys.stderr)
        sys.exit(2)
    clear_failure(out_dir)  # a job rerun in the folder of an earlier failure
    try:
        done = sweep_job_state(cfg, out_dir)
        if done is not None:
            log.info("job %s: complete in %s, not run again", hydra_cfg.job.num, out_dir)
            return objective(cfg, done)
        value = run(cfg, out_dir)
    except RunInterrupted as error:
        # SystemExit passes through Hydra's launcher, which would start the next job on any
        # Exception: one Ctrl-C ends the whole sweep.
        stop(
            f"{error} (job {hydra_cfg.job.num}); the sweep stopped: continue it with the same "
            f"command, which skips complete jobs and resumes this one: {continue_command()}"
        )
    except Exception as error:  # one failed job must not end the sweep
        log.exception("job %s failed", hydra_cfg.job.num)
        write_failure(out_dir, error)
        return None
    if STOP_REQUESTED.is_set():  # Ctrl-C in the job's last round: the job completed, still stop
        stop(
            f"stopped on request after job {hydra_cfg.job.num} completed; the sweep stopped: "
            f"continue it with the same command, which skips complete jobs: {continue_command()}"
        )
    return value


def continue_command() -> str:
    """The command that continues this process's work, quoted for a POSIX shell: a sweep's own
    command line (it skips complete jobs and resumes the others), or a single run's plus
    ``resume=true hydra.run.dir=<its folder>``."""
    argv = [a for a in sys.argv[1:] if not a.startswith(("resume=", "hydra.run.dir="))]
    resume: list[str] = []
    if not {"-m", "--multirun"} & set(argv):
        folder = STOPPING.run_folder
        resume = ["resume=true"] + ([f"hydra.run.dir={folder}"] if folder else [])
    return shlex.join(["python", Path(sys.argv[0]).name, *argv, *resume])


def stop(message: str) -> NoReturn:
    """End the process after a requested stop: one line, exit status 128 + the signal's number
    (130 after Ctrl-C, 143 after SIGTERM), as a shell reports a process the signal ended."""
    print(f"Stopped: {message}", file=sys.stderr, flush=True)
    raise SystemExit(128 + int(STOPPING.signal))


def exit_at_once(why: str) -> NoReturn:
    """End the process now, in one line. Unwinding would wait for Flower's worker threads,
    which can block forever on a Ray that is shutting down; nothing is lost by not waiting:
    checkpoints are replaced atomically, and Ray's processes end with their driver."""
    print(
        f"Stopped at once ({why}); the last completed round's checkpoint is intact: "
        f"continue with {continue_command()}",
        file=sys.stderr,
        flush=True,
    )
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(130)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C outside a run's own stop (start-up, between jobs)
        exit_at_once("Ctrl-C")
