"""The support-statistics norm (metabn): a node's prediction for an image is its own.

What a deployed node gets must not depend on the other images it happens to classify with
(TaskNorm's point against transductive batch norm), and closing a channel must never change
another channel's output (the sliced engine relies on it).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conf.choices import NormKind
from gating.data import load_dataset
from gating.meta import Batch, MetaConfig, adapt, deployed_stats, forward, query_forward
from gating.model import GatedConvNet, GateMode, ModelSpec, NormStats, realized_macs
from gating.model.norm import StatNorm

SPEC = ModelSpec(in_channels=1, image_size=8, num_classes=5, width=16, depth=4, gate_bias=0.3)
CFG = MetaConfig(backbone_lr=0.3, gate_lr=0.3, norm=NormKind.metabn)


@pytest.fixture(scope="module")
def node() -> tuple[GatedConvNet, dict[str, torch.Tensor], Batch, Batch]:
    """A model trained (20 two-stage steps) on a 5-way 5-shot digits support set, and 15
    queries per class."""
    data = load_dataset("digits")
    images, labels = torch.from_numpy(data.images.copy()), torch.from_numpy(data.labels.copy())
    support, query = [], []
    for local, cls in enumerate((0, 3, 5, 7, 9)):
        idx = torch.nonzero(labels == cls).flatten()
        support.append((images[idx[:5]], torch.full((5,), local)))
        query.append((images[idx[5:20]], torch.full((15,), local)))

    def stack(parts):
        return Batch(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))

    torch.manual_seed(0)
    model = GatedConvNet(SPEC)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    trained = MetaConfig(backbone_lr=0.5, gate_lr=0.5, inner_steps=20, norm=NormKind.metabn)
    adapted = {n: p.detach() for n, p in adapt(model, params, stack(support), trained).items()}
    return model, adapted, stack(support), stack(query)


def test_a_prediction_does_not_depend_on_the_rest_of_the_batch(node):
    model, params, support, query = node
    stats = deployed_stats(model, params, support.x, CFG)
    with torch.no_grad():
        full = forward(model, params, query.x, GateMode.EVAL, CFG, stats).logits
        order = torch.randperm(len(query.x), generator=torch.Generator().manual_seed(1))
        permuted = forward(model, params, query.x[order], GateMode.EVAL, CFG, stats).logits
        subset = forward(model, params, query.x[10:17], GateMode.EVAL, CFG, stats).logits
        alone = [
            forward(model, params, query.x[i : i + 1], GateMode.EVAL, CFG, stats).logits
            for i in range(len(query.x))
        ]
        # Training's form: the support set first in the same pass, its statistics for all.
        joint = query_forward(model, params, query.x, GateMode.EVAL, CFG, support.x).logits
    torch.testing.assert_close(permuted, full[order], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(subset, full[10:17], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(alone), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(joint, full, rtol=1e-5, atol=1e-5)
    assert (full.argmax(1) == query.y).float().mean() > 0.5  # a real, adapted model


def test_transductive_batch_norm_does_depend_on_the_batch(node):
    """The contrast that motivates metabn: batch statistics change with the batch, and one
    image alone on the 1x1 maps of the last digits layer gives every image the same output."""
    model, params, _, query = node
    with torch.no_grad():
        full = forward(model, params, query.x, GateMode.EVAL, CFG).logits
        subset = forward(model, params, query.x[:7], GateMode.EVAL, CFG).logits
        alone = torch.cat(
            [
                forward(model, params, query.x[i : i + 1], GateMode.EVAL, CFG).logits
                for i in range(len(query.x))
            ]
        )
    assert not torch.allclose(subset, full[:7], atol=1e-3)
    torch.testing.assert_close(alone, alone[:1].expand_as(alone))  # one output for every image


@pytest.mark.parametrize("kind", ["frozen", "support-rows", "per-input", "batch"])
def test_a_channel_left_out_changes_no_other_channel(node, kind):
    """The sliced engine never computes a closed channel: the norm of the open channels alone
    must equal theirs in the full layer, whatever the statistics."""
    model, _, support, query = node
    x = torch.cat([support.x, query.x[:9]])
    with torch.no_grad():
        y = model.backbone.blocks[0].conv(x)  # a layer's conv output, all channels
    kept = [c for c in range(SPEC.width) if c not in (2, 5, 11)]
    frozen = [(y[:25].mean((0, 2, 3)), y[:25].var((0, 2, 3), unbiased=False))]
    stats, sub_stats = {
        "frozen": (
            NormStats(frozen=frozen),
            NormStats(frozen=[(m[kept], v[kept]) for m, v in frozen]),
        ),
        "support-rows": (NormStats(rows=25), NormStats(rows=25)),
        "per-input": (NormStats(per_input=True), NormStats(per_input=True)),
        "batch": (NormStats(), NormStats()),
    }[kind]
    norm = StatNorm(SPEC.width)
    sub = StatNorm(len(kept))
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
        sub.weight.copy_(norm.weight[kept]), sub.bias.copy_(norm.bias[kept])
        full = norm(y, stats)[0][:, kept]
        alone = sub(y[:, kept], sub_stats)[0]
    torch.testing.assert_close(alone, full, rtol=0, atol=0)


def test_the_frozen_norm_adds_no_macs_to_the_count(node):
    """With all gates open, MACs of a frozen-statistics pass = FlopCounterMode / 2: the norm is
    an elementwise affine map (foldable into the conv), which neither side counts."""
    model, params, support, query = node
    stats = NormStats(frozen=deployed_stats(model, params, support.x, CFG).frozen)
    masks = [torch.ones(SPEC.width) for _ in range(SPEC.depth)]
    x = query.x[:1]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = torch.func.functional_call(
            model, params, (x,), {"mode": GateMode.EVAL, "stats": stats, "masks": masks}
        )
    gates = sum(
        counter.get_flop_counts()["Global"].values()
    )  # includes the gate MLPs' linear layers, as realized_macs does
    assert float(realized_macs(SPEC, out.trace)[0]) == gates / 2
