"""λ round by round (warm-up, then dual ascent on the deployed MAC ratio) and the ratio it
reads: what the deterministic gates of a deployed node would cost."""

from __future__ import annotations

import pytest
import torch

from conf.schema import default_config
from gating.federated.aggregation import weighted_mean
from gating.federated.budget import CHECKPOINT_KEY, RegularizerWeight
from gating.federated.round import BareFederation
from gating.meta import MetaConfig, meta_gradients
from gating.model import (
    GatedConvNet,
    GateMode,
    ModelSpec,
    deployed_flops_ratio,
    flops_ratio,
)
from tests.support import tiny_fo_federation


def config(lambda_lr: float, warmup: int = 4, target: float = 0.5, initial: float = 1.0):
    cfg = default_config()
    cfg.gating.lambda_lr, cfg.gating.warmup_rounds = lambda_lr, warmup
    cfg.gating.target_ratio, cfg.gating["lambda"] = target, initial
    return cfg


def test_warm_up_then_fixed_without_dual_ascent():
    weight = RegularizerWeight(config(lambda_lr=0.0))
    assert [weight(r) for r in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    for r in range(1, 50):
        weight.observe(r, 1.0)  # far over budget: a fixed λ does not care
    assert weight(50) == 1.0


def test_dual_ascent_raises_lambda_over_budget_and_lowers_it_under():
    weight = RegularizerWeight(config(lambda_lr=2.0))
    for r in range(1, 4):  # warm-up: no step, whatever the ratio
        weight.observe(r, 0.9)
        assert weight(r + 1) == pytest.approx(min(1.0, (r + 1) / 4))
    weight.observe(4, 0.9)  # 0.4 over the budget
    assert weight(5) == pytest.approx(1.0 + 2.0 * 0.4)
    weight.observe(5, 0.3)  # 0.2 under it
    assert weight(6) == pytest.approx(1.8 - 0.4)
    weight.observe(6, 0.0)
    assert weight(7) == pytest.approx(0.4)
    weight.observe(7, 0.0)  # λ stops at 0: under budget, R is 0 and λ no longer matters
    assert weight(8) == 0.0


def test_no_gates_no_weight():
    cfg = config(lambda_lr=1.0, warmup=0)
    cfg.strategy.name = "fedmeta"
    weight = RegularizerWeight(cfg)
    weight.observe(3, 1.0)
    assert weight(4) == 0.0


def test_lambda_travels_in_the_checkpoint():
    cfg = config(lambda_lr=1.0, warmup=0)
    weight = RegularizerWeight(cfg)
    weight.observe(1, 0.8)
    restored = RegularizerWeight.from_checkpoint(cfg, {CHECKPOINT_KEY: weight.state_dict()})
    assert restored(2) == weight(2) == pytest.approx(1.3)
    # a checkpoint from before dual ascent: λ was the configured one
    assert RegularizerWeight.from_checkpoint(cfg, {"round": 3})(4) == 1.0


def test_the_federation_steps_lambda_on_what_its_clients_measured():
    """An unreachable budget: λ rises every round by exactly lr x (the round's
    example-weighted deployed ratio - ρ), and the next round's clients train with it."""
    cfg = tiny_fo_federation()
    cfg.model.width = 8
    cfg.gating.warmup_rounds, cfg.gating.lambda_lr, cfg.gating.target_ratio = 0, 3.0, 0.05
    federation = BareFederation(cfg)
    expected = float(cfg.gating["lambda"])
    for server_round in range(1, 4):
        assert federation.regularizer_weight(server_round) == pytest.approx(expected)
        result = federation.round(server_round)
        ratio = weighted_mean(
            [u.examples for u in result.updates], [u.deployed_flops_ratio for u in result.updates]
        )
        assert 0.05 < ratio < 1.2  # gate MACs included: above 1 while every gate is open
        expected += 3.0 * (ratio - 0.05)
    assert federation.regularizer_weight(4) == pytest.approx(expected)
    assert expected > float(cfg.gating["lambda"]) + 3 * 3.0 * 0.3


def test_the_deployed_ratio_is_what_deterministic_gates_cost(digits_episodes):
    """Training runs relaxed (sampled) gates, a deployed node deterministic ones; the ratio the
    budget reads is the latter's. With one gated layer the gates read the raw image, so the
    deterministic pass opens exactly the channels of the training pass's positive logits."""
    torch.manual_seed(3)
    spec = ModelSpec(in_channels=1, image_size=8, num_classes=3, width=8, depth=1, gate_bias=0.0)
    model = GatedConvNet(spec).double()
    support, query = digits_episodes[0]
    soft = model(query.x, mode=GateMode.SOFT)
    deterministic = model(query.x, mode=GateMode.EVAL)
    assert 0.0 < flops_ratio(spec, deterministic.trace) < 1.0  # a case where gates close
    assert deployed_flops_ratio(spec, soft.trace) == pytest.approx(
        flops_ratio(spec, deterministic.trace), rel=1e-12
    )
    assert flops_ratio(spec, soft.trace) != pytest.approx(flops_ratio(spec, deterministic.trace))
    # meta-training reports it for the adapted gates on the query set
    params = dict(model.named_parameters())
    step = meta_gradients(model, params, support, query, MetaConfig())
    assert 0.0 < step.deployed_flops_ratio <= 1.0
    dense = meta_gradients(model, params, support, query, MetaConfig(gating=False))
    assert dense.deployed_flops_ratio == dense.flops_ratio == 1.0
