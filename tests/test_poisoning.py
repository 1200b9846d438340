"""A lying client inside a real Ray simulation: the defences bound the damage a node that lies
every round it is sampled can do; without them it steers the federation (asserted on the same
seed and target tasks).

The lie: a claim of 1e9 examples and the update's sign flipped at a million times its norm.
Bounded claims count the claim as the task's size; norm clipping bounds the flipped update to
the round's median norm (`robust.clip_factor=1`, the best of the rules measured against this
attack in BENCHMARKS.md, "Robustness"). No rule measured there recovers the whole clean run: the
defended federation keeps most of what the attack would take, and the test asserts that share.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# digits, 10 training nodes of which 5 answer each round; partition 0 lies whenever sampled.
RUN = [
    "federation.train_nodes=10",
    "federation.target_nodes=50",
    "federation.clients_per_round=5",
    "federation.rounds=40",
    "federation.eval_every=40",
    "model.width=16",
    "task.queries=10",
    "output.plots=false",
    # λ fixed and the gates' previous server step (1e-3): the test compares server defences,
    # and a run whose gates close while the runs differ amplifies any difference between them.
    "gating.lambda_lr=0",
    "meta.gate_lr=1e-3",
]
DEFENDED = ["robust.clip_factor=1"]
LIE = ["--attack", "sign_flip,claim", "--scale", "1e6", "--claim", "1e9", "--attackers", "1"]
UNDEFENDED = ["robust.weighting=claimed", "robust.clip=off"]


def run(tmp_path: Path, env: dict[str, str], name: str, *overrides: str, poison: bool) -> dict:
    folder = tmp_path / name
    command = [sys.executable, "simulate.py"]
    if poison:  # partition 0 (of the training nodes) lies
        command = [sys.executable, "benchmarks/attacks.py", *LIE]
    result = subprocess.run(
        [*command, *RUN, *overrides, f"hydra.run.dir={folder}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {
        "summary": json.loads((folder / "summary.json").read_text()),
        "log": result.stdout + result.stderr,
    }


@pytest.mark.ray
def test_one_poisoning_client_with_and_without_defences(tmp_path, subprocess_env):
    clean = run(tmp_path, subprocess_env, "clean", poison=False)["summary"]["accuracy"]
    defended = run(tmp_path, subprocess_env, "defended", *DEFENDED, poison=True)
    undefended = run(tmp_path, subprocess_env, "undefended", *UNDEFENDED, poison=True)
    kept, lost = defended["summary"]["accuracy"], undefended["summary"]["accuracy"]
    print(f"clean {clean:.4f} defended {kept:.4f} undefended {lost:.4f}")

    # The lie is seen, bounded and logged: its claim counts as the task's size.
    assert "claims 1e+09 examples, its task holds 50: counted as 50" in defended["log"]
    assert clean > 0.5  # a model worth defending (chance: 0.2)
    # Trusting the claim and the norm: one node of ten steers every round it is sampled in.
    assert lost < clean - 0.2
    # Defended, the federation keeps most of what the attack takes (measured over 3 seeds at
    # 120 rounds: 75-85%; BENCHMARKS.md, "Robustness").
    assert kept - lost >= 0.5 * (clean - lost)
