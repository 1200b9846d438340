"""The gated network: equivalence to the backbone, channel closing, MAC counts, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from gating.mac_table import format_table
from gating.model import (
    GatedConvNet,
    GateMode,
    ModelSpec,
    dense_macs,
    expected_mac_ratio,
    flops_ratio,
    gate_macs,
    gate_regularizer,
    parameter_groups,
    realized_macs,
)


@pytest.fixture(scope="module")
def digits_batch(digits) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(digits.images[:32].copy())
    labels = torch.from_numpy(digits.labels[:32].copy()) % 5
    return images, labels


def all_open(spec: ModelSpec) -> list[torch.Tensor]:
    return [torch.ones(spec.width) for _ in range(spec.depth)]


def test_all_open_gates_equal_plain_backbone(digits_batch):
    images, _ = digits_batch
    torch.manual_seed(0)
    model = GatedConvNet(ModelSpec(in_channels=1, image_size=8, width=16))
    dense = model(images, mode=GateMode.OFF).logits
    forced = model(images, mode=GateMode.HARD, masks=all_open(model.spec)).logits
    torch.testing.assert_close(forced, dense, rtol=0, atol=0)
    # A fresh model's gates start open (bias +3), so deterministic gating is the backbone too.
    fresh = model(images, mode=GateMode.EVAL)
    assert all(bool(layer.mask.eq(1).all()) for layer in fresh.trace)
    torch.testing.assert_close(fresh.logits, dense, rtol=0, atol=0)


def test_closed_channels_are_zero_and_cost_exactly_less(digits_batch):
    images, _ = digits_batch
    spec = ModelSpec(in_channels=1, image_size=8, width=8, depth=3)
    torch.manual_seed(1)
    model = GatedConvNet(spec)
    masks = all_open(spec)
    masks[0][[1, 5]] = 0  # close two channels of layer 1
    masks[2][[0, 3, 7]] = 0  # and three of the last layer
    out = model(images, mode=GateMode.EVAL, masks=masks)

    # Closed channels carry zeros: what the next layer (or the head) does with them is irrelevant.
    with torch.no_grad():
        model.backbone.blocks[1].conv.weight[:, [1, 5]] += 10.0
        side = spec.layer_sizes()[-1]
        head = model.backbone.head.weight.view(spec.num_classes, spec.width, side * side)
        head[:, [0, 3, 7]] += 10.0
    torch.testing.assert_close(model(images, mode=GateMode.EVAL, masks=masks).logits, out.logits)
    # ...while an open channel does matter.
    with torch.no_grad():
        model.backbone.blocks[1].conv.weight[:, 2] += 10.0
    assert not torch.allclose(model(images, mode=GateMode.EVAL, masks=masks).logits, out.logits)

    sizes = spec.layer_sizes()
    full = dense_macs(spec) + gate_macs(spec)
    saved = (
        9 * sizes[0] ** 2 * 1 * 2  # conv1 output channels closed
        + 9 * sizes[1] ** 2 * 2 * 8  # ...are conv2 input channels
        + 9 * sizes[2] ** 2 * 8 * 3  # conv3 output channels closed
        + 3 * sizes[3] ** 2 * spec.num_classes  # ...are head input features
    )
    realized = realized_macs(spec, out.trace)
    assert realized.shape == (len(images),)
    assert torch.all(realized == full - saved)
    assert flops_ratio(spec, out.trace) == pytest.approx((full - saved) / dense_macs(spec))


@pytest.mark.parametrize(
    ("width", "depth", "size", "channels"),
    [(8, 2, 8, 1), (16, 4, 8, 1), (32, 4, 28, 1), (24, 3, 28, 3), (16, 4, 84, 3), (12, 5, 33, 1)],
)
def test_all_open_mac_count_matches_flop_counter(width, depth, size, channels):
    spec = ModelSpec(in_channels=channels, image_size=size, width=width, depth=depth)
    model = GatedConvNet(spec)
    images = torch.rand(3, channels, size, size)
    with FlopCounterMode(display=False) as counter:
        out = model(images, mode=GateMode.EVAL, masks=all_open(spec))
    assert counter.get_total_flops() / 2 / len(images) == float(realized_macs(spec, out.trace)[0])
    with FlopCounterMode(display=False) as counter:
        model(images, mode=GateMode.OFF)
    assert counter.get_total_flops() / 2 / len(images) == dense_macs(spec)


def test_expected_ratio_follows_gate_probabilities():
    spec = ModelSpec(in_channels=1, image_size=8, width=8, depth=2)
    model = GatedConvNet(spec)
    images = torch.rand(4, 1, 8, 8)
    trace = model(images, mode=GateMode.HARD).trace
    # By hand: E[open channels] per layer from the probabilities, costs as in the dense count.
    e1, e2 = (layer.prob.sum(dim=1) for layer in trace)
    s = spec.layer_sizes()
    by_hand = (
        9 * s[0] ** 2 * 1 * e1 + 9 * s[1] ** 2 * e1 * e2 + e2 * s[2] ** 2 * spec.num_classes
    ).mean() + gate_macs(spec)
    ratio = expected_mac_ratio(spec, trace)
    assert ratio.detach().item() == pytest.approx(by_hand.item() / dense_macs(spec), rel=1e-6)
    # It is differentiable with respect to the gates (the regularizer trains them).
    ratio.backward()
    assert all(gate.fc2.bias.grad.abs().sum() > 0 for gate in model.gate)

    with torch.no_grad():
        for gate in model.gate:
            gate.fc2.bias.fill_(30.0)  # surely open: the dense cost plus the gates'
    trace = model(images, mode=GateMode.HARD).trace
    assert expected_mac_ratio(spec, trace).detach().item() == pytest.approx(
        1 + gate_macs(spec) / dense_macs(spec)
    )
    with torch.no_grad():
        for gate in model.gate:
            gate.fc2.bias.fill_(-30.0)  # surely closed: only the gates' own cost is left
    trace = model(images, mode=GateMode.HARD).trace
    assert expected_mac_ratio(spec, trace).detach().item() == pytest.approx(
        gate_macs(spec) / dense_macs(spec)
    )
    assert gate_regularizer(spec, trace, target_ratio=0.5).detach().item() == 0.0


def test_the_deployed_cost_is_what_deterministic_gates_realize_and_trains_the_gates():
    torch.manual_seed(3)
    spec = ModelSpec(in_channels=1, image_size=8, width=8, depth=2, gate_bias=0.0)
    model = GatedConvNet(spec)
    images = torch.rand(6, 1, 8, 8)
    # On a deterministic pass it is exactly the realized ratio; the expectation is not.
    deterministic = model(images, mode=GateMode.EVAL).trace
    realized = realized_macs(spec, deterministic).mean().item() / dense_macs(spec)
    ratio = expected_mac_ratio(spec, deterministic, deployed=True)
    assert ratio.item() == pytest.approx(realized, rel=1e-6)
    assert expected_mac_ratio(spec, deterministic).item() != pytest.approx(realized, rel=1e-3)
    # In training (relaxed gates upstream) it still reaches every gate.
    trace = model(images, mode=GateMode.SOFT).trace
    gate_regularizer(spec, trace, target_ratio=0.1, deployed=True).backward()
    assert all(gate.fc2.bias.grad.abs().sum() > 0 for gate in model.gate)


def test_straight_through_gradient_reaches_every_gate_parameter(digits_batch):
    images, labels = digits_batch
    torch.manual_seed(2)
    model = GatedConvNet(ModelSpec(in_channels=1, image_size=8, width=16))
    out = model(images, mode=GateMode.HARD)
    assert all(set(layer.mask.unique().tolist()) <= {0.0, 1.0} for layer in out.trace)
    F.cross_entropy(out.logits, labels).backward()
    for name, param in parameter_groups(model)["gate"].items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_second_order_gradient_through_inner_step_matches_finite_differences(digits_batch):
    images, labels = digits_batch
    support, query = (images[:10].double(), labels[:10]), (images[10:20].double(), labels[10:20])
    torch.manual_seed(3)
    model = GatedConvNet(ModelSpec(in_channels=1, image_size=8, num_classes=5, width=4, depth=2))
    model.double()
    groups = parameter_groups(model)
    backbone = {k: v.detach() for k, v in groups["backbone"].items()}
    gate = {k: v.detach().clone().requires_grad_(True) for k, v in groups["gate"].items()}
    inner_lr = 0.5

    def query_loss_after_inner_step(gate_params: dict[str, torch.Tensor]) -> torch.Tensor:
        torch.manual_seed(11)  # the same logistic noise in every evaluation
        theta = {k: v.clone().requires_grad_(True) for k, v in backbone.items()}
        out = functional_call(model, {**theta, **gate_params}, (support[0],), {"mode": "soft"})
        grads = torch.autograd.grad(
            F.cross_entropy(out.logits, support[1]), list(theta.values()), create_graph=True
        )
        adapted = {k: v - inner_lr * g for (k, v), g in zip(theta.items(), grads, strict=True)}
        out = functional_call(model, {**adapted, **gate_params}, (query[0],), {"mode": "soft"})
        return F.cross_entropy(out.logits, query[1])

    analytic = torch.autograd.grad(query_loss_after_inner_step(gate), list(gate.values()))
    eps = 1e-6
    for (name, param), grad in zip(gate.items(), analytic, strict=True):
        assert grad.abs().sum() > 0, name
        for index in range(min(param.numel(), 6)):
            flat = param.detach().view(-1)
            shifted = []
            for sign in (1, -1):
                probe = {k: v.detach().clone() for k, v in gate.items()}
                probe[name].view(-1)[index] = flat[index] + sign * eps
                shifted.append(query_loss_after_inner_step(probe).detach().item())
            numeric = (shifted[0] - shifted[1]) / (2 * eps)
            assert grad.view(-1)[index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8), name


def test_mac_table_lists_every_layer_and_the_realized_total(digits_batch):
    images, _ = digits_batch
    spec = ModelSpec(in_channels=1, image_size=8)
    table = format_table(spec, GatedConvNet(spec)(images, mode=GateMode.EVAL).trace)
    for name in ("conv1", "conv2", "conv3", "conv4", "head", "gates", "total"):
        assert name in table
    assert f"{dense_macs(spec):,}" in table
