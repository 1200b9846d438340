"""Conditional gates and what they are measured against: batch-shaping, the conditionality
figures, the learned static mask and the narrowed dense network."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy.special import betainc

from conf.choices import GateKind
from conf.schema import default_config
from gating.federated.settings import spec_for
from gating.meta import meta_gradients, task_loss
from gating.model import (
    GatedConvNet,
    GateMode,
    LayerTrace,
    ModelSpec,
    build_model,
    dense_macs,
    gate_macs,
    narrowed,
    realized_macs,
)
from gating.model.conditionality import (
    input_dependent_share,
    node_dependent_share,
    open_frequencies,
)
from gating.model.shaping import PRIOR, batch_shaping_loss, beta_cdf
from tests.support import STRAIGHT_THROUGH_META, assert_matches_central_differences

# ------------------------------------------------------------------ batch-shaping


@pytest.mark.parametrize("a, b", [PRIOR, (0.5, 0.5), (0.3, 0.8)])
def test_beta_cdf_matches_scipy_across_the_unit_interval(a, b):
    x = torch.linspace(1e-5, 1 - 1e-5, 4001, dtype=torch.float64)
    expected = torch.from_numpy(betainc(a, b, x.numpy()))
    torch.testing.assert_close(beta_cdf(x, a, b), expected, rtol=0, atol=1e-8)


def test_beta_cdf_is_differentiable_twice_for_second_order_meta_gradients():
    x = torch.rand(40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(beta_cdf, (x,))
    assert torch.autograd.gradgradcheck(beta_cdf, (x,))


def _trace(probs: torch.Tensor) -> list[LayerTrace]:
    return [LayerTrace(mask=(probs > 0.5).to(probs.dtype), prob=probs)]


def test_batch_shaping_is_near_zero_on_the_prior_and_large_on_a_static_gate():
    generator = torch.Generator().manual_seed(0)
    prior = torch.distributions.Beta(*PRIOR)
    torch.manual_seed(0)
    shaped = prior.sample((2000, 4)).double()
    always_open = torch.full((2000, 4), 0.99, dtype=torch.float64)
    always_shut = torch.full((2000, 4), 0.01, dtype=torch.float64)
    assert float(batch_shaping_loss(_trace(shaped))) < 1e-3
    # a constant gate: its CDF is one step, a third away from any prior in squared distance
    assert float(batch_shaping_loss(_trace(always_open))) > 0.15
    assert float(batch_shaping_loss(_trace(always_shut))) > 0.15
    # its gradient spreads a constant batch apart: some values pushed down, some up
    probs = (
        0.9 + 0.01 * torch.rand(64, 1, generator=generator, dtype=torch.float64)
    ).requires_grad_()
    batch_shaping_loss(_trace(probs)).backward()
    assert (probs.grad > 0).any() and (probs.grad < 0).any()


def test_meta_gradient_with_batch_shaping_matches_finite_differences(digits_episodes, tiny_model):
    support, query = digits_episodes[1]
    cfg = replace(STRAIGHT_THROUGH_META, train_gates="soft", shaping=0.7)
    model, params = tiny_model(gate_bias=0.5)  # gates near 1/2: the term has work to do
    torch.manual_seed(3)
    step = meta_gradients(model, params, support, query, cfg)
    without = meta_gradients(model, params, support, query, replace(cfg, shaping=0.0))
    assert not torch.allclose(step.grads["gate.0.fc2.bias"], without.grads["gate.0.fc2.bias"])

    def objective(probe):
        from gating.meta import adapt

        torch.manual_seed(3)
        adapted = adapt(model, probe, support, cfg)
        loss, _ = task_loss(model, adapted, query, cfg, True, support=support, shape=True)
        return loss.item()

    assert_matches_central_differences(step.grads, params, objective)


# ------------------------------------------------------------------ conditionality figures


def test_shares_tell_a_static_mask_from_conditional_gates():
    static = [[1.0, 0.0, 1.0, 0.0]] * 3  # the same channels for every input of every node
    assert input_dependent_share(static) == 0.0 and node_dependent_share(static) == 0.0
    per_node = [
        [1.0, 0.0, 1.0, 0.0],
        [1.0, 1.0, 0.0, 0.0],
    ]  # static within a node, adapted per node
    assert input_dependent_share(per_node) == 0.0 and node_dependent_share(per_node) == 0.5
    conditional = [[0.5, 0.0, 1.0, 0.2], [0.25, 0.0, 1.0, 0.2]]
    assert input_dependent_share(conditional) == 0.5 and node_dependent_share(conditional) == 0.25
    with pytest.raises(ValueError, match="one frequency list per node"):
        input_dependent_share([])


def test_open_frequencies_count_each_channels_open_inputs(digits):
    torch.manual_seed(0)
    model = GatedConvNet(ModelSpec(in_channels=1, image_size=8, width=4, depth=2))
    images = torch.from_numpy(digits.images[:10].copy())
    masks = [torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.zeros(10, 4)]
    masks[1][:3, 2] = 1  # channel 2 of layer 2 open for the first 3 of 10 inputs
    out = model(images, mode=GateMode.EVAL, masks=masks)
    expected = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.3, 0.0]
    torch.testing.assert_close(open_frequencies(out.trace), torch.tensor(expected).double())


# ------------------------------------------------------------------ the two static baselines


def test_a_static_gate_decides_the_same_for_every_input_and_costs_nothing(digits):
    spec = ModelSpec(in_channels=1, image_size=8, width=8, depth=3, gates=GateKind.static)
    torch.manual_seed(0)
    model = build_model(spec)
    with torch.no_grad():
        for gate in model.gate:  # random logits around 0: some channels shut
            gate.fc2.bias.normal_(0, 1)
    images = torch.from_numpy(digits.images[:50].copy())
    out = model(images, mode=GateMode.EVAL)
    frequencies = open_frequencies(out.trace).numpy()
    assert set(np.unique(frequencies)) == {0.0, 1.0}  # open for all inputs or for none
    assert gate_macs(spec) == 0
    assert float(realized_macs(spec, out.trace).max()) < dense_macs(spec)
    # same parameter names and group as the gate MLPs: meta-learned and adapted as they are
    names = {n for n, _ in model.named_parameters() if n.startswith("gate.")}
    assert names == {
        f"gate.{i}.fc{j}.{p}" for i in range(3) for j in (1, 2) for p in ("weight", "bias")
    }
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert "gates" not in replace(spec, gates=GateKind.conditional).to_dict()  # old files' dict


@pytest.mark.parametrize(
    "share, image_size, width", [(0.5, 28, 22), (0.3, 28, 16), (0.5, 8, 22), (1.0, 28, 32)]
)
def test_the_narrowed_network_is_the_widest_within_the_mac_share(share, image_size, width):
    spec = ModelSpec(image_size=image_size)
    narrow = narrowed(spec, share)
    assert narrow.width == width
    assert dense_macs(narrow) <= share * dense_macs(spec)
    assert dense_macs(replace(narrow, width=width + 1)) > share * dense_macs(spec) or share == 1


def test_a_narrowed_resnet_scales_every_stage_alike():
    spec = ModelSpec(image_size=32, in_channels=3, arch="resnet12", widths=(16, 32, 64, 128))
    narrow = narrowed(spec, 0.5)
    assert dense_macs(narrow) <= 0.5 * dense_macs(spec)
    first = narrow.widths[0]
    assert narrow.widths == tuple(round(w * first / 16) for w in spec.widths)


def test_the_strategy_name_sets_the_gates_and_the_width():
    def spec(strategy: str, rho: float = 0.5) -> ModelSpec:
        cfg = default_config()
        OmegaConf.update(cfg, "strategy.name", strategy)
        OmegaConf.update(cfg, "gating.target_ratio", rho)
        return spec_for(cfg, 1, 28)

    assert spec("metagater").gates is GateKind.conditional and spec("metagater").width == 32
    assert spec("static_mask").gates is GateKind.static
    assert spec("fedmeta").width == 32
    assert spec("fedmeta_narrow").width == 22 and spec("fedmeta_narrow", 0.3).width == 16


@pytest.mark.parametrize("arch", ["conv", "resnet12"])
def test_a_static_mask_exports_to_the_sliced_engine_unchanged(digits, arch):
    from gating.deploy import sliced_model
    from gating.meta import MetaConfig, deployed_stats, forward

    resnet = {"arch": "resnet12", "widths": (4, 8, 8, 8)} if arch != "conv" else {"width": 8}
    spec = ModelSpec(in_channels=1, image_size=8, gates=GateKind.static, **resnet)
    torch.manual_seed(0)
    model = build_model(spec)
    with torch.no_grad():
        for gate in model.gate:
            gate.fc2.bias.normal_(0, 1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    images = torch.from_numpy(digits.images[:12].copy())
    cfg = MetaConfig()
    stats = deployed_stats(model, params, images[:6], cfg)
    sliced = sliced_model(spec, params, backend="torch", statistics=stats.frozen)
    for x in images[6:].split(1):
        logits, opened = sliced.forward_with_open(x)
        out = forward(model, params, x, GateMode.EVAL, cfg, stats)
        torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-5)
        expected = [np.flatnonzero(layer.mask[0].numpy()) for layer in out.trace]
        assert all(np.array_equal(a, b) for a, b in zip(opened, expected, strict=True))
