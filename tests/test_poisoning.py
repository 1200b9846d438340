"""A lying client inside a real Ray simulation: with the defences the run is what it would
have been; without them the damage shows (both asserted on the same seed and target tasks).

The lie: a claim of 1e9 examples and the update's sign flipped at a million times its norm.
Bounded claims and norm clipping (the defaults) stop the claim and the size; the flipped
direction needs a robust rule (the coordinate-wise median), which the defended and the clean run
both use.
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
    "federation.target_nodes=10",
    "federation.clients_per_round=5",
    "federation.rounds=40",
    "federation.eval_every=40",
    "model.width=16",
    "task.queries=10",
    "output.plots=false",
    # λ fixed and the gates' previous server step (1e-3): the test compares aggregation rules,
    # and a run that ends while its gates are closing amplifies any difference between two runs.
    # Measured between the clean and the defended run: 3.8 points with λ by dual ascent (both
    # in its wind-up at round 40), 2.4 with the default gate step 1e-2 (0.530 against 0.506),
    # 1.6 with both fixed. At the default α = γ = 0.1 this 40-round run learns faster (clean
    # 0.674) and the defended one trailed it by 10.2 points (0.572), not yet separated into the
    # median's bias (one flipped update of five) and two runs diverging on a steep curve; the
    # test keeps the step its limit was measured with, 0.4.
    "gating.lambda_lr=0",
    "meta.gate_lr=1e-3",
    "adapt.backbone_lr=0.4",
    "adapt.gate_lr=0.4",
]
ROBUST = ["robust.aggregation=median"]
UNDEFENDED = ["robust.weighting=claimed", "robust.clip=off"]


def run(tmp_path: Path, env: dict[str, str], name: str, *overrides: str, poison: bool) -> dict:
    folder = tmp_path / name
    module = "tests.poison" if poison else "simulate"
    command = [sys.executable, "-m", module] if poison else [sys.executable, "simulate.py"]
    result = subprocess.run(
        [*command, *RUN, *overrides, f"hydra.run.dir={folder}"],
        cwd=ROOT,
        env={**env, "POISON_EXAMPLES": "1e9", "POISON_SCALE": "-1e6"},
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
    clean = run(tmp_path, subprocess_env, "clean", *ROBUST, poison=False)["summary"]
    defended = run(tmp_path, subprocess_env, "defended", *ROBUST, poison=True)
    undefended = run(tmp_path, subprocess_env, "undefended", *UNDEFENDED, poison=True)

    # The lie is seen, bounded and logged: its claim counts as the task's size.
    assert "claims 1e+09 examples, its task holds 50: counted as 50" in defended["log"]
    assert clean["accuracy"] > 0.5  # a model worth defending (chance: 0.2)
    assert abs(defended["summary"]["accuracy"] - clean["accuracy"]) <= 0.02
    # Trusting the claim and the norm: one node of ten steers every round it is sampled in.
    assert undefended["summary"]["accuracy"] < clean["accuracy"] - 0.2
