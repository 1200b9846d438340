"""A strategy's record is what the machinery asks: its server step, its update, its settings."""

from __future__ import annotations

from dataclasses import replace

import torch

from gating.federated import round as federated_round
from gating.federated.round import BareFederation, shared_server_step
from gating.federated.strategies import strategy_named
from tests.support import tiny_fo_federation


class HalvedStep:
    """A server-side variant: the shared step, with every learning rate halved."""

    def __init__(self, cfg, params):
        self.inner = shared_server_step(cfg, params)
        for optimizer in self.inner.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] /= 2
        self.applied = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def apply(self, *args, **kwargs):
        self.applied += 1
        return self.inner.apply(*args, **kwargs)


def test_a_strategy_with_its_own_server_step_gets_it_without_touching_the_round(monkeypatch):
    """The bare loop (and the Flower strategy: both build it with ``server_step_for``) run the
    record's ``server_step`` when it brings one; the parameters move half as far."""
    cfg = tiny_fo_federation()
    cfg.model.width = 8
    shared = BareFederation(cfg)
    start = {n: t.clone() for n, t in shared.params.items()}
    shared.round(1)
    record = replace(strategy_named(cfg.strategy.name), server_step=HalvedStep)
    monkeypatch.setattr(federated_round, "strategy_of", lambda _: record)
    halved = BareFederation(cfg)
    assert isinstance(halved.step, HalvedStep)
    halved.round(1)
    assert halved.step.applied == 1
    moved = {n: (shared.params[n] - start[n]).norm() for n in start}
    moved_half = {n: (halved.params[n] - start[n]).norm() for n in start}
    # Adam's first step moves each coordinate by its learning rate (times the sign of the
    # update): half the rate, half the distance
    ratios = torch.tensor([float(moved_half[n] / moved[n]) for n in start if moved[n] > 0])
    assert len(ratios) > 0
    torch.testing.assert_close(ratios, torch.full_like(ratios, 0.5), rtol=1e-3, atol=0)
