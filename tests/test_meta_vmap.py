"""The vmapped meta-gradients compute what the per-task loop computes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from gating.meta import adapt, meta_gradients, meta_gradients_batched, task_loss
from tests.support import STRAIGHT_THROUGH_META, assert_matches_central_differences

# Gates start less open than the default (+3, every gate open): with the noise below some gates
# close, so masks and the straight-through path matter.
GATE_BIAS = 0.5


def fixed_noise(like: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Stands in for ``torch.rand_like`` in the gates: uniform-looking values in (0, 1) that
    depend only on the shape, so the loop and every vmapped task see the same noise."""
    index = torch.arange(like.numel(), dtype=like.dtype, device=like.device).reshape(like.shape)
    return (index * 0.6180339887 + 0.1) % 1.0 * 0.98 + 0.01


# hard gates and the expected-cost regularizer: the straight-through paths under test
BASE = STRAIGHT_THROUGH_META
CASES = {
    "second_order": BASE,
    "first_order": replace(BASE, first_order=True),
    "gate_first": replace(BASE, order="gate_first"),
    "gate_first_fo": replace(BASE, order="gate_first", first_order=True),
    "soft_gates": replace(BASE, train_gates="soft"),
    "two_inner_steps": replace(BASE, inner_steps=2),
    "reg_inner_only": replace(BASE, reg_where="inner"),
    "reg_outer_only": replace(BASE, reg_where="outer", first_order=True),
    "dense_maml": replace(BASE, gating=False),
    "dense_fomaml": replace(BASE, gating=False, first_order=True),
}


def test_adapt_takes_the_specified_partial_steps_when_differentiated(digits_episodes, tiny_model):
    """The adapted values must not depend on whether autograd tracks the initial parameters
    (as a second-order reference does): each stage steps by its partial gradient (phi' = phi -
    gamma * grad_phi L(theta', phi; S) at fixed theta'), never through the earlier stage."""
    model, params = tiny_model(gate_bias=GATE_BIAS)
    support = digits_episodes[0][0]
    leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    torch.manual_seed(0)
    tracked = adapt(model, leaves, support, BASE)
    torch.manual_seed(0)
    plain = adapt(model, params, support, BASE)
    assert any(t.grad_fn is not None for t in tracked.values())
    for name, value in plain.items():
        torch.testing.assert_close(tracked[name].detach(), value, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", list(CASES))
def test_vmapped_meta_gradients_equal_the_loop_with_the_same_noise(
    digits_episodes, tiny_model, case, monkeypatch
):
    cfg = CASES[case]
    model, params = tiny_model(gate_bias=GATE_BIAS)
    monkeypatch.setattr(torch, "rand_like", fixed_noise)
    loop = [meta_gradients(model, params, s, q, cfg) for s, q in digits_episodes]
    batched = meta_gradients_batched(model, params, digits_episodes, cfg)
    assert len(batched) == len(loop)
    if cfg.gating:
        assert any(step.flops_ratio < 0.99 for step in loop), "every gate open: a weak test"
    for one, other in zip(loop, batched, strict=True):
        assert set(other.grads) == set(one.grads)
        for name, grad in one.grads.items():
            torch.testing.assert_close(other.grads[name], grad, rtol=1e-9, atol=1e-12)
        assert other.query_loss == pytest.approx(one.query_loss, rel=1e-12)
        assert other.query_accuracy == one.query_accuracy
        assert other.flops_ratio == pytest.approx(one.flops_ratio, rel=1e-12)
    distinct = [torch.cat([g.flatten() for g in s.grads.values()]) for s in batched]
    assert not torch.allclose(distinct[0], distinct[1])  # the tasks are not one task repeated


@pytest.mark.parametrize("order", ["backbone_first", "gate_first"])
def test_vmapped_second_order_matches_finite_differences(
    digits_episodes, tiny_model, order, monkeypatch
):
    """d L(Adapt(theta, phi; S); Q) / d(theta, phi) against central differences of that very
    objective (soft gates and fixed noise make it smooth and deterministic)."""
    cfg = replace(BASE, order=order, train_gates="soft")
    model, params = tiny_model(gate_bias=GATE_BIAS)
    monkeypatch.setattr(torch, "rand_like", fixed_noise)
    support, query = digits_episodes[2]
    step = meta_gradients_batched(model, params, [(support, query)], cfg)[0]

    def objective(values: dict[str, torch.Tensor]) -> float:
        adapted = adapt(model, values, support, cfg)
        return task_loss(model, adapted, query, cfg, True, support)[0].detach().item()

    assert_matches_central_differences(step.grads, params, objective)


def test_vmapped_gate_noise_is_independent_per_task_and_seeded(digits_episodes, tiny_model):
    model, params = tiny_model(gate_bias=GATE_BIAS)
    same = [digits_episodes[0]] * 3  # one task three times: only the noise tells them apart
    torch.manual_seed(3)
    first = meta_gradients_batched(model, params, same, BASE)
    torch.manual_seed(3)
    again = meta_gradients_batched(model, params, same, BASE)
    flat = [torch.cat([g.flatten() for g in s.grads.values()]) for s in first]
    assert not torch.allclose(flat[0], flat[1]) and not torch.allclose(flat[1], flat[2])
    for one, other in zip(first, again, strict=True):
        for name, grad in one.grads.items():
            torch.testing.assert_close(other.grads[name], grad, rtol=0, atol=0)
