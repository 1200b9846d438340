"""The attack registry of benchmarks/attacks.py: each attack against its definition, on a real
node's round, and the attackers' replies rewritten inside a real Ray simulation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from gating.federated.nodes import partition_task
from gating.federated.protocol import NUM_EXAMPLES
from gating.federated.settings import run_parameters, spec_for
from gating.federated.updates import ClientRound, client_update
from tests.support import subprocess_env, summary_of, tiny_fo_federation

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import attacks  # noqa: E402


@pytest.fixture(scope="module")
def job() -> ClientRound:
    cfg = tiny_fo_federation()
    cfg.model.width = 8
    task = partition_task(cfg, 0)
    params = run_parameters(cfg, spec_for(cfg, 1, 8))
    return ClientRound(cfg, task, params, server_round=3, reg_weight=0.5)


@pytest.fixture(scope="module")
def honest(job) -> attacks.Reply:
    update = client_update(job)
    metrics = {NUM_EXAMPLES: float(update.examples), "deployed-flops-ratio": 0.6}
    return attacks.Reply({n: t.numpy() for n, t in update.update.items()}, metrics)


def test_alie_hides_the_liars_among_the_sampled_nodes():
    """Baruch et al. (2019): n = 10 sampled, f = 2 liars: s = 10 // 2 + 1 - 2 = 4 honest nodes to
    win over, z = Phi^-1(6 / 10)."""
    assert attacks.alie_z(10, 2) == pytest.approx(norm.ppf(0.6))
    assert attacks.alie_z(10, 1) == pytest.approx(norm.ppf(0.5))
    assert attacks.alie_z(10, 3) > attacks.alie_z(10, 2)


def test_each_attack_is_what_its_name_says(job, honest):
    o = attacks.Options(attackers=2, scale=3.0, sigma=0.5, epsilon=0.2, estimate=4, ratio=0.0)
    names = list(honest.update)
    flipped = attacks.sign_flip(job, honest, o)
    for n in names:
        np.testing.assert_array_equal(flipped.update[n], -3.0 * honest.update[n])
    assert all(not attacks.free_rider(job, honest, o).update[n].any() for n in names)
    assert all(np.isnan(attacks.non_finite(job, honest, o).update[n]).all() for n in names)
    assert attacks.claim(job, honest, o).metrics[NUM_EXAMPLES] == 1e9
    assert attacks.mac_ratio(job, honest, o).metrics["deployed-flops-ratio"] == 0.0
    noise = np.concatenate([u.ravel() for u in attacks.gaussian(job, honest, o).update.values()])
    assert noise.std() == pytest.approx(0.5, rel=0.1)
    # alie and ipm from the attacker's own honest updates on fresh episodes
    samples = attacks.honest_updates(job, 4)
    assert not np.allclose(samples[0][names[0]], samples[1][names[0]])
    z = attacks.alie_z(10, 2)
    lie = attacks.alie(job, honest, o)
    inner = attacks.ipm(job, honest, o)
    for n in names:
        stacked = np.stack([s[n] for s in samples])
        np.testing.assert_allclose(lie.update[n], stacked.mean(0) - z * stacked.std(0), rtol=1e-6)
        np.testing.assert_allclose(inner.update[n], -0.2 * stacked.mean(0), rtol=1e-6)


def test_label_flip_moves_the_query_labels_and_keeps_the_support(job, honest):
    support, query = job.episodes()()
    flipped = attacks.FlippedQueries(**{f: getattr(job, f) for f in job.__dataclass_fields__})
    f_support, f_query = flipped.episodes()()
    np.testing.assert_array_equal(f_support.y.numpy(), support.y.numpy())
    np.testing.assert_array_equal(f_query.x.numpy(), query.x.numpy())
    np.testing.assert_array_equal(f_query.y.numpy(), (query.y.numpy() + 1) % job.task.ways)
    lie = attacks.label_flip(job, honest, attacks.Options())
    assert any(not np.allclose(lie.update[n], honest.update[n]) for n in honest.update)


@pytest.mark.ray
def test_the_attackers_replies_reach_the_server_rewritten(tmp_path):
    """One node of four flips its update's sign at 1e6 times its norm, every round: the
    server's adaptive clip catches exactly that reply in every round."""
    run = tmp_path / "run"
    overrides = [
        "federation=tiny",
        "federation.train_nodes=4",
        "federation.target_nodes=2",
        "federation.clients_per_round=4",
        "federation.rounds=3",
        "model.width=8",
        "task.queries=5",
        "output.plots=false",
        f"hydra.run.dir={run}",
    ]
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/attacks.py",
            "--attack",
            "sign_flip",
            "--scale",
            "1e6",
            *overrides,
        ],
        cwd=ROOT,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary_of(run)["rounds"] == 3
    history = json.loads((run / "history.json").read_text())
    assert [r["clipped"] for r in history if "clipped" in r] == [1, 1, 1]
    assert json.loads((run / "attack.json").read_text())["attack"] == "sign_flip"
