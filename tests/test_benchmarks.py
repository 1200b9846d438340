"""The benchmark scripts run to their RESULT line on tiny settings, and what they check holds.

Their figures are measurements for BENCHMARKS.md, not asserted here; what is asserted is what must
be true on any machine: the sliced model classifies as the masked dense network does, the vmapped
meta-gradient equals the loop's, and the bare loop did exactly Flower's work.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, args: list[str], env: dict[str, str], timeout: int) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def result(stdout: str) -> dict[str, str]:
    """The last line's ``RESULT key=value ...`` pairs."""
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), f"last line is not a RESULT line: {last!r}"
    return dict(pair.split("=", 1) for pair in last.split()[1:])


def test_gated_inference_slices_what_the_masked_network_computes(subprocess_env):
    args = ["--steps", "3", "--nodes", "1", "--reps", "1", "--widths", ""]
    out = run_benchmark("gated_inference.py", args, subprocess_env, timeout=600)
    figures = result(out)
    assert math.isfinite(float(figures["speedup"]))
    assert 0 < float(figures["flops_ratio"]) <= 1.1
    node = re.search(r"query accuracy sliced ([\d.]+) = masked dense batch-1 ([\d.]+)", out)
    assert node is not None, out
    assert node.group(1) == node.group(2)


def test_gated_resnet_inference_runs_the_open_channels(subprocess_env):
    args = ["--widths", "8-8-16-16", "--image-size", "16", "--open", "0.5", "--reps", "1"]
    figures = result(run_benchmark("gated_resnet_inference.py", args, subprocess_env, timeout=300))
    assert math.isfinite(float(figures["speedup"]))
    # half of each block's inner channels open: the realized MACs fall well below dense
    assert 0.2 < float(figures["flops_ratio"]) < 0.8


def test_metagrad_batched_equals_the_loop(subprocess_env):
    args = ["--datasets", "digits", "--reps", "1", "--tasks", "2", "--sections", "variants"]
    out = run_benchmark("metagrad.py", args, subprocess_env, timeout=600)
    figures = result(out)
    assert math.isfinite(float(figures["so_over_fo"])) and math.isfinite(
        float(figures["peak_mb_so"])
    )
    match = re.search(r"vmapped dense MAML against the loop: max relative difference (\S+)", out)
    assert match is not None, out
    assert float(match.group(1)) < 1e-3


@pytest.mark.ray
def test_overhead_bare_loop_does_flowers_work(subprocess_env):
    args = ["--rounds", "4", "--warmup", "1", "--phases", "1actor"]
    figures = result(run_benchmark("overhead.py", args, subprocess_env, timeout=900))
    assert math.isfinite(float(figures["flower_over_bare"]))
    assert float(figures["max_param_diff"]) == 0.0


@pytest.mark.ray
def test_scale_runs_a_federation_on_flower_with_the_proposed_pump_patch(subprocess_env):
    """The patch in docs/patches applies to the installed Flower as it stands, replaces exactly
    the message pump and the one method it adds, and the patched engine runs federations to
    the end (every count's RESULT line)."""
    args = ["--pump", "patched", "--nodes", "24,12", "--reps", "1", "--rounds", "4"]
    args += ["--warmup", "1", "--targets", "2", "--clients", "3"]
    out = run_benchmark("scale.py", args, subprocess_env, timeout=600)
    installed = re.search(r"simulation-pump\.patch installed: (.*)", out)
    assert installed is not None, out
    assert sorted(installed.group(1).split(", ")) == [
        "flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue",
        "flwr.server.superlink.linkstate.in_memory_linkstate.InMemoryLinkState"
        ".get_message_ins_for_nodes",
    ]
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert [dict(p.split("=", 1) for p in line.split()[1:])["nodes"] for line in lines] == ["24"]
    figures = result(out)
    assert figures["pump"] == "patched"
    assert math.isfinite(float(figures["time_ratio"])) and float(figures["startup_ratio"]) > 0
