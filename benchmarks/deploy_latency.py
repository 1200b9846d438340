"""Deployment latency: where a deployed round's seconds go, and what Flower 1.39's own options cut.

    python benchmarks/deploy_latency.py                       # 6 rounds, 1 rep, every mode
    python benchmarks/deploy_latency.py --rounds 6 --reps 2 --modes default,poll

Sets up, in a temporary folder, the deployment docs/deploy.md walks through, on 127.0.0.1 with
free ports and with the documented scripts: ``make_certs.sh`` (TLS), ``make_node_key.sh`` and
``register_node.sh`` (node authentication), ``demo_sites.py`` (one training and one target site),
``add_connection.sh``, a SuperLink started as step 3 starts it, then, per measured run, two fresh
SuperNodes (step 5) in the mode under test and ``scripts/deploy/run.sh`` (step 6) with a tiny
federation: one training site, one target site, ``--rounds`` rounds of one training message
each, evaluation only at the end. The SuperLink (and its registered keys) is shared by all runs;
modes are interleaved, the order rotating with each rep. The app and the scripts come from a
snapshot of the working tree taken at the start (tracked and untracked files, checked to
import), so every run deploys the same code whatever is edited meanwhile.

Modes (the SuperNode side; the SuperLink is the same for all):
  default       the documented command: ``--isolation subprocess`` (the SuperNode starts a
                ``flower-superexec``, which starts a ``flwr-clientapp`` process per message)
  process       ``--isolation process`` and a separately started
                ``flower-superexec --runtime-api-address 127.0.0.1:PORT --insecure`` per
                SuperNode (Flower 1.39 has no long-running ``flwr-clientapp``: it needs a
                per-task ``--token`` and exits after one message; the script shows this first)
  poll          default plus ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL=POLL`` (``--poll``, 0.1 s) in
                the SuperNode's environment (its SuperExec inherits it; Flower's default: 1 s)
  process-poll  process, with that variable set for the separate ``flower-superexec``

Per round (``history.json``'s ``seconds``, read from the SuperLink's
``$FLWR_HOME/outputs/<run id>/``), the training site's log lines (and its separate SuperExec's,
where ClientApps log in the process modes), timestamped here as they arrive, split the round:
  node idle    "Sent successfully" of the previous round -> "Receiving" of this one: the
               SuperNode's Fleet poll. Right after a reply it pulls once more, finds nothing
               (the ServerApp has not aggregated yet) and sleeps a hard-coded 3 s
               (flwr/supernode/start_client_internal.py)
  outside node round - ("Receiving" -> "Sent successfully"): that wait as the round sees it
               (the ServerApp's own work before it overlaps it), plus the ServerApp's reply
               polling (0.1 s, server/federation.py) and aggregation
  dispatch     "Receiving" -> "Start `flwr-clientapp` process": the SuperExec's task poll
               (FLWR_SUPEREXEC_TASK_POLL_INTERVAL, default 1 s), a new Python interpreter,
               Flower's imports
  clientapp    that -> "Sending": the app's imports (torch, scipy), the update itself (tens of
               ms for this tiny model), the reply's transfer to the SuperNode, and the
               SuperNode's hard-coded 0.5 s wait for it
  reply        "Sending" -> "Sent successfully": the reply's upload to the SuperLink
``clientapp procs / msgs`` counts the ``flwr-clientapp`` processes seen (sampled every 0.2 s)
against the messages both sites answered; ``node CPU %`` is the CPU time the two SuperNodes and
their SuperExecs (not the ClientApps) used during the run, per second of it (what faster polling
costs); ``import_s`` is a fresh interpreter importing ``flwr-clientapp`` and ``client.app``
(what every ClientApp process pays before it starts working), measured once per rep;
``wall_s`` is ``run.sh`` from start to exit, ``startup_s`` that minus the rounds and the final
evaluation (``flwr run`` and ``flwr ls`` themselves, the ServerApp's start by the SuperLink's
SuperExec, node discovery, results). Figures are medians over all rounds of all runs of a mode.
Everything this script starts is stopped by PID with all it spawned, also on error or Ctrl-C.
The last line is ``RESULT round_s_default=... round_s_best=... best_mode=... speedup=...``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import IO

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONNECTION = "latency"
MODES = ("default", "process", "poll", "process-poll")
POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
T0 = time.monotonic()


# ------------------------------------------------------------------ processes


@dataclass
class Started:
    name: str
    popen: subprocess.Popen
    root: psutil.Process | None
    lines: list[tuple[float, str]] = field(default_factory=list)
    reader: threading.Thread | None = None

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_for(self, pattern: str, timeout: float) -> float:
        """Monotonic time of the first line matching ``pattern``; fails if the process exits
        or ``timeout`` passes first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for t, line in list(self.lines):
                if regex.search(line):
                    return t
            if self.popen.poll() is not None:
                time.sleep(0.3)  # let the reader drain
                raise RuntimeError(f"{self.name} exited:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no {pattern!r} in {timeout:.0f} s")
            time.sleep(0.1)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Processes:
    """Processes started by name, each with a timestamped log (its own file and in memory), and
    every process they spawn (tracked by a sampler thread, so also those whose parent died);
    ``stop`` ends one tree by PID, ``stop_all`` every tree, the last started first."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: dict[str, Started] = {}
        self.spawned: dict[str, dict[tuple[int, float], psutil.Process]] = {}
        self.apps: dict[str, dict[tuple[int, float], int]] = {}  # clientapp -> its parent PID
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.sampler = threading.Thread(target=self._sample, daemon=True)
        self.sampler.start()

    def start(self, name: str, args: list[str], env: dict[str, str], cwd: Path) -> Started:
        popen = subprocess.Popen(
            [str(a) for a in args],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            root = psutil.Process(popen.pid)
        except psutil.Error:
            root = None
        proc = Started(name, popen, root)
        log = (self.log_dir / f"{name}.log").open("w")
        proc.reader = threading.Thread(target=self._read, args=(proc, log), daemon=True)
        with self.lock:
            self.started[name] = proc
            self.spawned[name], self.apps[name] = {}, {}
        proc.reader.start()
        return proc

    @staticmethod
    def _read(proc: Started, log: IO[str]) -> None:
        assert proc.popen.stdout is not None
        with log:
            for raw in iter(proc.popen.stdout.readline, b""):
                t = time.monotonic()
                line = ANSI.sub("", raw.decode(errors="replace")).rstrip("\n")
                proc.lines.append((t, line))
                log.write(f"{t - T0:9.3f} {line}\n")
                log.flush()

    def track(self) -> None:
        with self.lock:
            items = [(n, s.root) for n, s in self.started.items()]
        for name, root in items:
            spawned, apps = self.spawned[name], self.apps[name]
            known = [p for p in (root, *spawned.values()) if p is not None and _alive(p)]
            for parent in known:
                try:
                    children = parent.children(recursive=True)
                except psutil.Error:
                    continue
                for child in children:
                    with contextlib.suppress(psutil.Error):
                        spawned.setdefault((child.pid, child.create_time()), child)
            for key, p in list(spawned.items()):
                if key not in apps and _alive(p):
                    with contextlib.suppress(psutil.Error):  # checked again until exec'd
                        if any("flwr-clientapp" in part for part in p.cmdline()[:2]):
                            apps[key] = p.ppid()

    def _sample(self) -> None:
        while not self.stopping.wait(0.2):
            with contextlib.suppress(Exception):
                self.track()

    def clientapps(self, name: str) -> int:
        """How many ``flwr-clientapp`` processes ``name`` has spawned (seen alive), not counting
        a clientapp's own children caught between fork and exec (they show its command)."""
        apps = self.apps.get(name, {})
        pids = {pid for pid, _ in apps}
        return sum(parent not in pids for parent in apps.values())

    def cpu_seconds(self, name: str) -> float:
        """CPU time of ``name`` and its live descendants other than ClientApp processes."""
        apps = self.apps.get(name, {})
        total = 0.0
        for key, p in [(None, self.started[name].root), *self.spawned[name].items()]:
            if p is None or key in apps or not _alive(p):
                continue
            with contextlib.suppress(psutil.Error):
                times = p.cpu_times()
                total += times.user + times.system
        return total

    def alive(self, name: str) -> list[psutil.Process]:
        return [p for p in self.spawned[name].values() if _alive(p)]

    def stop(self, name: str) -> None:
        """SIGTERM the process, then everything it spawned; SIGKILL what is left."""
        proc = self.started[name]
        self.track()
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=10)
        self.track()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in self.alive(name):
                with contextlib.suppress(psutil.Error):
                    p.send_signal(sig)
            deadline = time.monotonic() + 10
            while self.alive(name) and time.monotonic() < deadline:
                time.sleep(0.2)
        if proc.reader is not None:
            proc.reader.join(timeout=5)
        if survivors := [p.pid for p in self.alive(name)]:
            raise RuntimeError(f"{name}: processes {survivors} survived")

    def stop_all(self) -> None:
        errors = []
        for name in reversed(list(self.started)):
            try:
                self.stop(name)
            except Exception as error:  # try every tree, then report
                errors.append(str(error))
        self.stopping.set()
        if errors:
            raise RuntimeError("; ".join(errors))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ the deployment


def snapshot(dest: Path, attempts: int = 5) -> Path:
    """A copy of the working tree (tracked and untracked, not ignored files) that imports: every
    run deploys this same code even while the tree is being edited. Returns its root."""
    for attempt in range(attempts):
        if dest.exists():
            shutil.rmtree(dest)
        names = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=ROOT, capture_output=True, check=True,
        ).stdout.decode().split("\0")  # fmt: skip
        for name in filter(None, names):
            if (ROOT / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dest / name)
        check = subprocess.run(
            [sys.executable, "-c", "import server.app, client.app"],
            cwd=dest, env={**os.environ, "PYTHONPATH": str(dest)}, capture_output=True, text=True,
        )  # fmt: skip
        if check.returncode == 0:
            return dest
        print(f"snapshot {attempt + 1}: the app does not import yet: {check.stderr[-300:]}")
        time.sleep(30)
    raise RuntimeError("the working tree's app does not import; try again later")


class Deployment:
    """Certificates, keys, site data, a SuperLink with TLS and node authentication, the CLI
    connection and the registered keys: docs/deploy.md steps 2-4, in ``home``."""

    def __init__(self, home: Path, app: Path, procs: Processes, verbose: bool):
        self.home, self.app, self.procs, self.verbose = home, app, procs, verbose
        self.scripts = app / "scripts" / "deploy"
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", POLL_ENV)},
            "FLWR_HOME": str(home / "cli"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.link_home = home / "superlink"

    def command(self, *args: object, timeout: float = 120) -> str:
        result = subprocess.run(
            [str(a) for a in args],
            cwd=self.app,
            env={**self.env, "PYTHONPATH": str(self.app)},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{args} failed:\n{result.stdout}\n{result.stderr}")
        if self.verbose:
            print(result.stdout.rstrip())
        return result.stdout

    def set_up(self) -> None:
        h = self.home
        self.command(self.scripts / "make_certs.sh", "127.0.0.1", h / "certs")
        for site in ("site-a", "site-b"):
            self.command(self.scripts / "make_node_key.sh", site, h / "keys")
        self.command(sys.executable, self.scripts / "demo_sites.py", h / "data")
        self.link_home.mkdir()
        self.fleet, control = free_port(), free_port()
        certs = h / "certs"
        link = self.procs.start(
            "superlink",
            [
                BIN / "flower-superlink",
                "--fleet-api-type", "grpc-rere",
                "--fleet-api-address", f"127.0.0.1:{self.fleet}",
                "--host", "127.0.0.1",
                "--port", control,
                "--ssl-ca-certfile", certs / "ca.crt",
                "--ssl-certfile", certs / "server.pem",
                "--ssl-keyfile", certs / "server.key",
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
            ],
            {**self.env, "FLWR_HOME": str(self.link_home)},
            self.link_home,
        )  # fmt: skip
        link.wait_for("Uvicorn running", timeout=180)
        self.command(self.scripts / "add_connection.sh", CONNECTION, f"127.0.0.1:{control}",
                     certs / "ca.crt")  # fmt: skip
        self.command(self.scripts / "register_node.sh", CONNECTION, h / "keys" / "site-a.pub",
                     h / "keys" / "site-b.pub")  # fmt: skip

    def supernode(self, tag: str, site: str, data: str, role: str, mode: str, poll: float) -> None:
        """docs/deploy.md step 5 for one site, in ``mode`` (and its SuperExec if separate)."""
        home = self.home / tag / site
        home.mkdir(parents=True)
        port = free_port()
        process = mode.startswith("process")
        env = {**self.env, "FLWR_HOME": str(home)}
        if mode.endswith("poll"):
            env[POLL_ENV] = str(poll)
        args = [
            BIN / "flower-supernode",
            "--superlink", f"127.0.0.1:{self.fleet}",
            "--root-certificates", self.home / "certs" / "ca.crt",
            "--auth-supernode-private-key", self.home / "keys" / site,
            "--port", port,
            "--node-config", f'data-path="{self.home / "data" / data}" role="{role}"',
        ]  # fmt: skip
        if process:
            args += ["--isolation", "process"]
        node = self.procs.start(f"{tag}-{site}", args, env, home)
        node.wait_for(r"SuperNode ID", timeout=180)
        if process:
            exec_args = [
                BIN / "flower-superexec",
                "--runtime-api-address", f"127.0.0.1:{port}",
                "--insecure",
            ]  # fmt: skip
            self.procs.start(f"{tag}-{site}-superexec", exec_args, env, home)


# ------------------------------------------------------------------ one measured run


@dataclass
class RunResult:
    mode: str
    rep: int
    rounds: list[dict[str, float]]
    wall_s: float
    startup_s: float
    clientapp_procs: int
    messages: int
    poll_env_seen: str
    node_cpu: float  # CPU seconds of the SuperNodes and SuperExecs per second of the run


def node_events(lines: list[tuple[float, str]]) -> list[dict[str, float | str]]:
    """The messages a SuperNode handled, in order, with the times of their log lines."""
    events: list[dict[str, float | str]] = []
    current: dict[str, float | str] | None = None
    for t, line in sorted(lines):
        if m := re.search(r"Receiving: (\w+) message", line):
            current = {"type": m.group(1), "recv": t}
            events.append(current)
        elif current is None:
            continue
        elif "Start `flwr-clientapp` process" in line and "start" not in current:
            current["start"] = t
        elif re.search(r"Sending: \w+ message", line) and "send" not in current:
            current["send"] = t
        elif "Sent successfully" in line and "sent" not in current:
            current["sent"] = t
    return events


def split_rounds(history: list[dict], events: list[dict[str, float | str]]) -> list[dict]:
    """Each round's seconds and, from the training site's log, where they went."""
    rows = []
    trains = [i for i, e in enumerate(events) if e["type"] == "train"]
    for h, i in zip(history, trains, strict=False):
        e, row = events[i], {"round": h["round"], "round_s": float(h["seconds"])}
        if {"recv", "start", "send", "sent"} <= e.keys():
            node = float(e["sent"]) - float(e["recv"])
            row |= {
                "outside_s": row["round_s"] - node,
                "dispatch_s": float(e["start"]) - float(e["recv"]),
                "clientapp_s": float(e["send"]) - float(e["start"]),
                "reply_s": float(e["sent"]) - float(e["send"]),
            }
            if h["round"] > 1 and "sent" in events[i - 1]:
                row["idle_s"] = float(e["recv"]) - float(events[i - 1]["sent"])
        rows.append(row)
    return rows


def measure(dep: Deployment, mode: str, rep: int, rounds: int, poll: float) -> RunResult:
    tag = f"{mode}-{rep}"
    procs = dep.procs
    process = mode.startswith("process")
    dep.supernode(tag, "site-a", "train-1.npz", "train", mode, poll)
    dep.supernode(tag, "site-b", "target-1.npz", "target", mode, poll)
    sites = [f"{tag}-{site}" for site in ("site-a", "site-b")]
    node_procs = sites + ([f"{s}-superexec" for s in sites] if process else [])
    executors = [f"{s}-superexec" for s in sites] if process else sites

    def node_cpu() -> float:
        procs.track()
        return sum(procs.cpu_seconds(name) for name in node_procs)

    overrides = (
        "federation.train_nodes=1 federation.target_nodes=1 federation.clients_per_round=1 "
        f"federation.rounds={rounds} federation.eval_every={rounds} federation.timeout=120"
    )
    cpu_before, started = node_cpu(), time.monotonic()
    run = procs.start(
        f"{tag}-run",
        [dep.scripts / "run.sh", CONNECTION, "--run-config", overrides],
        dep.env,
        dep.home / tag,
    )
    while run.popen.poll() is None:
        if time.monotonic() - started > 900:
            raise RuntimeError(f"{tag}: run.sh still running after 900 s")
        time.sleep(0.2)
    wall = time.monotonic() - started
    cpu = (node_cpu() - cpu_before) / wall
    time.sleep(0.3)
    output = run.text()
    if run.popen.returncode != 0:
        raise RuntimeError(f"{tag}: run.sh exited {run.popen.returncode}:\n{output[-4000:]}")
    run_id = re.search(r"Successfully started run (\d+)", output).group(1)  # type: ignore[union-attr]
    history = json.loads((dep.link_home / "outputs" / run_id / "history.json").read_text())

    # The poll setting as the training site's SuperExec saw it (the SuperNode's child, or the
    # separately started one).
    seen = "-"
    for p in [procs.started[executors[0]].root, *procs.spawned[executors[0]].values()]:
        with contextlib.suppress(psutil.Error, AttributeError):
            if "flower-superexec" in " ".join(p.cmdline()[:2]):
                seen = p.environ().get(POLL_ENV, "unset")
                break
    count = sum(procs.clientapps(name) for name in executors)
    # The training site's log, with its separate SuperExec's (ClientApps log there) if any.
    lines_a = procs.started[sites[0]].lines + (procs.started[executors[0]].lines if process else [])
    events_a = node_events(lines_a)
    messages = len(events_a) + len(node_events(procs.started[sites[1]].lines))
    for name in [*reversed(node_procs), f"{tag}-run"]:
        procs.stop(name)

    per_round = split_rounds(history, events_a)
    final_eval = float(history[-1].get("evaluation_seconds", 0.0))
    startup = wall - sum(r["round_s"] for r in per_round) - final_eval
    return RunResult(mode, rep, per_round, wall, startup, count, messages, seen, cpu)


def cold_import_seconds(env: dict[str, str], app: Path) -> float:
    """A fresh interpreter importing what every ClientApp process imports."""
    code = "import flwr.supernode.cli.flwr_clientapp, client.app"
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-c", code], cwd=app, env={**env, "PYTHONPATH": str(app)}, check=True
    )
    return time.monotonic() - started


def clientapp_without_token(env: dict[str, str]) -> str:
    """What ``flwr-clientapp`` says when started as a long-running process (no task token)."""
    result = subprocess.run(
        [BIN / "flwr-clientapp", "--runtime-api-address", "127.0.0.1:9", "--insecure"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
    return f"exit {result.returncode}: {last}"


# ------------------------------------------------------------------ report


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def host() -> str:
    cpu = platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"flwr {version('flwr')}, torch {version('torch')}"
    )


def report(results: list[RunResult], modes: list[str], imports: list[float]) -> str:
    cols = ["round_s", "idle_s", "outside_s", "dispatch_s", "clientapp_s", "reply_s"]
    print(
        "\n| mode | runs | round s | min-max | node idle s | outside node s | dispatch s "
        "| clientapp s | reply s | clientapp procs / msgs | node CPU % | wall s | startup s |"
    )
    print("| --- |" + " ---: |" * 12)
    medians: dict[str, float] = {}
    for mode in modes:
        runs = [r for r in results if r.mode == mode]
        if not runs:
            continue
        rows = [row for r in runs for row in r.rounds]
        m = {c: median([row[c] for row in rows if c in row]) for c in cols}
        rounds = [row["round_s"] for row in rows]
        medians[mode] = m["round_s"]
        procs = f"{sum(r.clientapp_procs for r in runs)} / {sum(r.messages for r in runs)}"
        print(
            f"| {mode} | {len(runs)} | {m['round_s']:.2f} | {min(rounds):.1f}-{max(rounds):.1f} "
            f"| {m['idle_s']:.2f} | {m['outside_s']:.2f} | {m['dispatch_s']:.2f} "
            f"| {m['clientapp_s']:.2f} | {m['reply_s']:.2f} | {procs} "
            f"| {100 * median([r.node_cpu for r in runs]):.0f} "
            f"| {median([r.wall_s for r in runs]):.1f} "
            f"| {median([r.startup_s for r in runs]):.1f} |"
        )
    print(
        "\nimport_s (fresh interpreter importing flwr-clientapp and client.app, what every "
        f"ClientApp process pays): {', '.join(f'{s:.2f}' for s in imports)}"
    )
    default = medians.get("default", float("nan"))
    best = min(medians, key=medians.__getitem__)
    return (
        f"RESULT round_s_default={default:.2f} round_s_best={medians[best]:.2f} "
        f"best_mode={best} speedup={default / medians[best]:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--modes", default=",".join(MODES), help=f"from {','.join(MODES)}")
    parser.add_argument("--poll", type=float, default=0.1, help=f"{POLL_ENV} for *poll modes")
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if bad := set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(bad)}")
    home = args.keep or Path(tempfile.mkdtemp(prefix="deploy-latency-"))
    home.mkdir(parents=True, exist_ok=args.keep is None)
    (home / "logs").mkdir()
    print(f"host: {host()}; load average {os.getloadavg()[0]:.1f} at start")
    print(f"folder: {home} (logs in logs/, timestamps in seconds from the script's start)")

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    procs = Processes(home / "logs")
    results: list[RunResult] = []
    imports: list[float] = []
    finished = False
    try:
        dep = Deployment(home, snapshot(home / "app"), procs, args.verbose)
        print(f"flwr-clientapp without a task token: {clientapp_without_token(dep.env)}")
        dep.set_up()
        for rep in range(args.reps):
            imports.append(cold_import_seconds(dep.env, dep.app))
            order = modes[rep % len(modes) :] + modes[: rep % len(modes)]
            for mode in order:
                result = measure(dep, mode, rep, args.rounds, args.poll)
                results.append(result)
                rounds = ", ".join(f"{r['round_s']:.1f}" for r in result.rounds)
                print(
                    f"{mode} rep {rep}: rounds {rounds} s; wall {result.wall_s:.1f} s; "
                    f"clientapp processes {result.clientapp_procs} for {result.messages} "
                    f"messages; {POLL_ENV} in its SuperExec: {result.poll_env_seen}; "
                    f"load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
        finished = True
    finally:
        procs.stop_all()
        if args.keep is None and finished:
            shutil.rmtree(home, ignore_errors=True)
        elif args.keep is None:
            print(f"kept {home} for its logs", file=sys.stderr)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    print(report(results, modes, imports))


if __name__ == "__main__":
    main()
