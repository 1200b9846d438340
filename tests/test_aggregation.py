"""The server's aggregation trusts no single update: norm bounds, robust rules, DP noise, and a
step that cannot leave a broken model."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS
from scipy import stats

from conf.choices import Aggregation, Clipping
from gating.federated.aggregation import (
    AggregationRule,
    aggregate,
    budget_ratio,
    update_norm,
)
from gating.federated.privacy import epsilon
from gating.federated.server_step import RoundFailed, ServerStep

PARAMS = {"backbone.w": torch.zeros(3, 2), "gate.b": torch.zeros(4)}


def honest(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.randn(t.shape, generator=generator) for n, t in PARAMS.items()}


def test_adaptive_clipping_bounds_a_huge_update_to_a_few_honest_norms():
    updates = [honest(i) for i in range(4)] + [{n: 1e6 * t for n, t in honest(9).items()}]
    rule = AggregationRule(clip=Clipping.adaptive, clip_factor=3.0)
    direction, report = aggregate(updates, [1.0] * 5, rule)
    median = float(np.median([update_norm(u) for u in updates]))
    assert report.clipped == [4] and report.bound == pytest.approx(3 * median)
    # The attacker now counts like an update of norm 3 x median, in the plain mean.
    scaled = {n: t * (report.bound / update_norm(updates[4])) for n, t in updates[4].items()}
    for name in PARAMS:
        expected = torch.stack([u[name] for u in updates[:4]] + [scaled[name]]).mean(0)
        torch.testing.assert_close(direction[name], expected)
    assert update_norm(direction) < 2 * median


def test_adaptive_clipping_bounds_one_liar_of_two():
    # The median of two norms is their mean, which the liar drags up: the bound is the lower
    # median, the honest norm.
    updates = [honest(0), {n: 1e6 * t for n, t in honest(9).items()}]
    rule = AggregationRule(clip=Clipping.adaptive, clip_factor=3.0)
    direction, report = aggregate(updates, [1.0, 1.0], rule)
    assert report.clipped == [1] and report.bound == pytest.approx(3 * update_norm(updates[0]))
    assert update_norm(direction) <= 2 * update_norm(updates[0])


def test_without_clipping_the_huge_update_dominates():
    updates = [honest(i) for i in range(4)] + [{n: 1e6 * t for n, t in honest(9).items()}]
    direction, report = aggregate(updates, [1.0] * 5, AggregationRule(clip=Clipping.off))
    assert report.bound is None and not report.clipped
    assert update_norm(direction) > 1e5


@pytest.mark.parametrize("rule", [Aggregation.median, Aggregation.trimmed_mean])
def test_coordinatewise_rules_match_numpy_and_scipy_and_ignore_one_outlier(rule):
    updates = [honest(i) for i in range(5)]
    updates[2] = {n: t - 1e3 for n, t in updates[2].items()}  # one far-off client
    settings = AggregationRule(clip=Clipping.off, aggregation=rule, trim_fraction=0.2)
    direction, _ = aggregate(updates, [1.0] * 5, settings)
    for name in PARAMS:
        stacked = torch.stack([u[name] for u in updates]).numpy()
        if rule is Aggregation.median:
            expected = np.median(stacked, axis=0)
        else:
            expected = stats.trim_mean(stacked, 0.2, axis=0)
        np.testing.assert_allclose(direction[name].numpy(), expected, rtol=1e-6)
        assert direction[name].abs().max() < 10


def flower_results(updates, weights):
    """Updates in the form of Flower's reference aggregators: (NDArrays, num_examples)."""
    return [([u[n].numpy() for n in PARAMS], w) for u, w in zip(updates, weights, strict=True)]


def as_arrays(direction):
    return [direction[n].numpy() for n in PARAMS]


@pytest.mark.parametrize("byzantine", [1, 2])
def test_krum_and_multi_krum_match_flowers_reference(byzantine):
    from flwr.server.strategy.aggregate import aggregate_krum

    updates = [honest(i) for i in range(9)]
    updates[4] = {n: t + 50.0 for n, t in updates[4].items()}  # a liar far from the rest
    weights = [float(w) for w in range(1, 10)]
    results = flower_results(updates, [int(w) for w in weights])
    for aggregation, keep in ((Aggregation.krum, 0), (Aggregation.multi_krum, 9 - byzantine)):
        rule = AggregationRule(clip=Clipping.off, aggregation=aggregation, byzantine=byzantine)
        direction, _ = aggregate(updates, weights, rule)
        expected = aggregate_krum(results, num_malicious=byzantine, to_keep=keep)
        for got, want in zip(as_arrays(direction), expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert all(t.abs().max() < 10 for t in direction.values())  # the liar is left out


def test_bulyan_matches_flowers_reference_and_needs_4f_plus_3_replies():
    from flwr.server.strategy.aggregate import aggregate_bulyan, aggregate_krum

    updates = [honest(i) for i in range(8)]
    updates[0] = {n: -1e3 * t for n, t in updates[0].items()}
    rule = AggregationRule(clip=Clipping.off, aggregation=Aggregation.bulyan, byzantine=1)
    direction, _ = aggregate(updates, [1.0] * 8, rule)
    expected = aggregate_bulyan(flower_results(updates, [1] * 8), 1, aggregate_krum, to_keep=0)
    for got, want in zip(as_arrays(direction), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(RoundFailed, match="needs at least 7 replies, this round has 6"):
        aggregate(updates[:6], [1.0] * 6, rule)


def test_nearest_neighbour_mixing_averages_each_update_with_its_nearest():
    updates = [honest(i) for i in range(6)]
    updates[3] = {n: t + 100.0 for n, t in updates[3].items()}
    rule = AggregationRule(clip=Clipping.off, aggregation=Aggregation.median, nnm=True)
    direction, _ = aggregate(updates, [1.0] * 6, rule)
    # reference, written out: squared distances, each row's 5 nearest (itself first), means
    flat = np.stack([np.concatenate([u[n].numpy().ravel() for n in PARAMS]) for u in updates])
    distances = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1)
    mixed = np.stack([flat[np.argsort(row, kind="stable")[:5]].mean(0) for row in distances])
    np.testing.assert_allclose(
        np.concatenate([direction[n].numpy().ravel() for n in PARAMS]),
        np.median(mixed, axis=0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_centered_clipping_moves_the_center_by_clipped_differences():
    """Karimireddy et al. (2021), written out: v + sum_i w_i (x_i - v) min(1, tau / |x_i - v|),
    tau the lower median of the distances; an outlier moves v by at most its weight x tau."""
    center = honest(9)
    updates = [honest(i) for i in range(5)]
    updates[2] = {n: t + 1e4 for n, t in updates[2].items()}
    weights = [1.0, 2.0, 1.0, 1.0, 1.0]
    rule = AggregationRule(clip=Clipping.off, aggregation=Aggregation.centered_clipping)
    direction, _ = aggregate(updates, weights, rule, center=center)
    flat = lambda u: np.concatenate([u[n].numpy().ravel() for n in PARAMS])  # noqa: E731
    v = flat(center)
    differences = [flat(u) - v for u in updates]
    distances = [np.linalg.norm(d) for d in differences]
    tau = sorted(distances)[(len(distances) - 1) // 2]
    share = np.array(weights) / sum(weights)
    expected = v + sum(
        w * d * min(1.0, tau / r) for w, d, r in zip(share, differences, distances, strict=True)
    )
    np.testing.assert_allclose(flat(direction), expected, rtol=1e-5, atol=1e-6)
    assert np.linalg.norm(flat(direction) - v) <= tau * (1 + 1e-6)
    # a fixed radius, and with every difference inside it, the weighted mean itself
    wide = AggregationRule(clip=Clipping.off, aggregation="centered_clipping", cc_radius=1e9)
    honest_only = [honest(i) for i in range(4)]
    mean = sum(w * flat(u) for w, u in zip([0.25] * 4, honest_only, strict=True))
    np.testing.assert_allclose(
        flat(aggregate(honest_only, [1.0] * 4, wide, center=center)[0]), mean, rtol=1e-5, atol=1e-6
    )


def test_centered_clipping_keeps_its_center_across_rounds_and_checkpoints():
    rule = AggregationRule(clip=Clipping.off, aggregation=Aggregation.centered_clipping)
    step = ServerStep(PARAMS, ("backbone", "gate"), "sgd", {"backbone": 0.1, "gate": 0.1}, rule)
    assert step.center is None
    step.apply([honest(0), honest(1), honest(2)], [1.0] * 3, 1)
    first = {n: t.clone() for n, t in step.center.items()}
    expected, _ = aggregate([honest(3), honest(4), honest(5)], [1.0] * 3, rule, center=first)
    saved = step.state_dict()
    resumed = ServerStep(PARAMS, ("backbone", "gate"), "sgd", {"backbone": 0.1, "gate": 0.1}, rule)
    resumed.load_state_dict(saved)
    for s in (step, resumed):
        s.apply([honest(3), honest(4), honest(5)], [1.0] * 3, 2)
        for name in PARAMS:
            torch.testing.assert_close(s.center[name], expected[name])


def test_private_aggregation_is_the_noisy_mean_of_clipped_updates():
    updates = [{n: 10 * t for n, t in honest(i).items()} for i in range(4)]
    rule = AggregationRule(noise_multiplier=1.5, dp_clip_norm=2.0)
    a, report = aggregate(updates, [5.0, 1.0, 1.0, 1.0], rule, torch.Generator().manual_seed(7))
    b, _ = aggregate(updates, [5.0, 1.0, 1.0, 1.0], rule, torch.Generator().manual_seed(7))
    assert report.bound == 2.0 and report.clipped == [0, 1, 2, 3]
    generator = torch.Generator().manual_seed(7)
    for name in PARAMS:  # every client weighs the same; noise std = multiplier x clip norm
        clipped = [u[name] * 2.0 / update_norm(u) for u in updates]
        noise = torch.randn(PARAMS[name].shape, generator=generator, dtype=torch.float64)
        expected = (torch.stack(clipped).sum(0) + (3.0 * noise).float()) / 4
        torch.testing.assert_close(a[name], expected)
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)  # seeded: reproducible


def test_under_dp_the_budget_ratio_is_a_gaussian_mechanism_on_clipped_ratios():
    ratios, weights = [0.4, 0.6, 9.0], [5.0, 1.0, 1.0]  # a liar's 9.0 counts as 2
    plain = AggregationRule()
    assert budget_ratio(weights, ratios, plain, None) == pytest.approx((2.0 + 0.6 + 9.0) / 7)
    private = AggregationRule(noise_multiplier=1.5)
    draws = [
        budget_ratio(weights, ratios, private, torch.Generator().manual_seed(seed))
        for seed in range(4000)
    ]
    # the sum of clipped ratios (uniform weights) plus N(0, (1.5 x 2)^2), over the count
    assert np.mean(draws) == pytest.approx(3.0 / 3, abs=0.05)
    assert np.std(draws) == pytest.approx(1.5 * 2.0 / 3, rel=0.05)
    again = budget_ratio(weights, ratios, private, torch.Generator().manual_seed(3))
    assert again == draws[3]  # seeded per round: a resumed run draws the same


def test_a_private_step_reports_the_noisy_ratio_and_its_update_from_one_stream():
    rule = AggregationRule(noise_multiplier=1.0, dp_clip_norm=1.0)
    step = ServerStep(PARAMS, ("backbone", "gate"), "sgd", {"backbone": 1.0, "gate": 1.0}, rule)
    report = step.apply([honest(0), honest(1)], [1.0, 1.0], 3, ratios=[0.5, 0.7])
    generator = torch.Generator().manual_seed(3)  # seed 0: 0 * 1_000_003 + round 3
    for name in PARAMS:  # the updates' noise comes first, then the ratio's
        torch.randn(PARAMS[name].shape, generator=generator, dtype=torch.float64)
    noise = float(torch.randn((), generator=generator, dtype=torch.float64))
    assert report.ratio == pytest.approx((1.2 + 2.0 * noise) / 2)


def test_epsilon_of_two_mechanisms_per_round_is_that_of_twice_the_rounds():
    # the updates' and the deployed ratios' Gaussian mechanisms, same multiplier, every round
    assert epsilon(1.2, 50, 1e-5, mechanisms_per_round=2) == epsilon(1.2, 100, 1e-5)
    assert epsilon(1.2, 50, 1e-5, mechanisms_per_round=2) > epsilon(1.2, 50, 1e-5)


def test_epsilon_matches_the_rdp_of_the_gaussian_mechanism_by_hand():
    """T Gaussian mechanisms of noise multiplier z: RDP T·α/(2z²) at order α, turned into
    (ε, δ) by ε = min_α [rdp + log(1 - 1/α) - log(δα)/(α - 1)] (Balle et al. 2020)."""
    for z, rounds, delta in [(1.0, 1, 1e-5), (1.1, 10, 1e-5), (2.0, 300, 1e-6), (0.8, 3, 1e-3)]:
        by_hand = min(
            rounds * a / (2 * z * z) + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
            for a in DEFAULT_RDP_ORDERS
            if a > 1.01
        )
        assert epsilon(z, rounds, delta) == pytest.approx(max(by_hand, 0.0), rel=1e-9)
    assert epsilon(1.0, 20, 1e-5) > epsilon(1.0, 10, 1e-5) > epsilon(2.0, 10, 1e-5)
    assert epsilon(0.0, 5, 1e-5) == math.inf and epsilon(1.0, 0, 1e-5) == 0.0


def test_a_step_that_would_break_the_model_is_undone():
    step = ServerStep(
        PARAMS,
        ("backbone", "gate"),
        "sgd",
        {"backbone": 10.0, "gate": 10.0},
        AggregationRule(clip=Clipping.off),
    )
    before = step.state_dict()
    huge = {n: torch.full(t.shape, 3e38) for n, t in PARAMS.items()}  # finite, but x10 is not
    with pytest.raises(RoundFailed, match="non-finite"):
        step.apply([huge, huge], [1.0, 1.0], server_round=4)
    for name, value in before["params"].items():
        assert torch.equal(step.params[name], value)
    step.apply([honest(0), honest(1)], [1.0, 1.0], server_round=5)  # and it carries on
    assert all(torch.isfinite(t).all() for t in step.params.values())


def test_adam_state_is_restored_too():
    step = ServerStep(
        PARAMS,
        ("backbone", "gate"),
        "adam",
        {"backbone": 1.0, "gate": 1.0},
        AggregationRule(clip=Clipping.off),
    )
    step.apply([honest(0)], [1.0], 1)
    # an independent copy: the snapshot under test must not share storage with the live state
    saved = {g: copy.deepcopy(o.state_dict()) for g, o in step.optimizers.items()}
    snapshot = step.state_dict()
    with pytest.raises(RoundFailed):
        step.apply([{n: torch.full(t.shape, 3e38) for n, t in PARAMS.items()}], [1.0], 2)
    assert_same_optimizer_state(saved, {g: o.state_dict() for g, o in step.optimizers.items()})
    # a snapshot taken before a successful step keeps what it saw
    step.apply([honest(1)], [1.0], 3)
    assert_same_optimizer_state(saved, snapshot["optimizers"])


def assert_same_optimizer_state(expected: dict, actual: dict) -> None:
    for group, state in expected.items():
        assert state["state"], "Adam has state after a step"
        for key, value in state["state"].items():
            for name, tensor in value.items():
                assert torch.equal(
                    torch.as_tensor(tensor), torch.as_tensor(actual[group]["state"][key][name])
                ), (group, key, name)


def test_restoring_a_state_of_the_wrong_shape_is_refused():
    step = ServerStep(PARAMS, ("backbone",), "adam", {"backbone": 0.1, "gate": 0.1})
    state = step.state_dict()
    state["params"]["backbone.w"] = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"backbone.w is \(2, 3\)"):
        step.load_state_dict(state)
    state["params"].pop("backbone.w")
    with pytest.raises(ValueError, match="missing"):
        step.load_state_dict(state)
