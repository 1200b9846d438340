"""The gated ResNets (ResNet-12, ResNet-18): MAC counts, channel independence, meta-gradients,
sliced execution, the model file, a federation and the exporter.

Tiny stage widths (4-6-8-8) keep every test fast; gradients are checked in float64.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from analysis.export import export_run, format_report
from conf.choices import ModelArch
from conf.schema import default_config, validate
from gating.deploy import (
    SlicedGatedNet,
    SlicedGatedResNet,
    load_model,
    save_model,
    sliced_model,
)
from gating.federated.budget import RegularizerWeight
from gating.federated.nodes import partition_task
from gating.federated.round import BareFederation
from gating.federated.settings import model_for, spec_for
from gating.meta import MetaConfig, adapt, deployed_stats, meta_gradients, task_loss
from gating.model import (
    GatedConvNet,
    GatedResNet,
    GateMode,
    ModelSpec,
    NormStats,
    build_model,
    dense_macs,
    expected_mac_ratio,
    flops_ratio,
    gate_macs,
    gate_shapes,
    layer_costs,
    norm_channels,
    parse_widths,
    realized_macs,
)
from gating.model.resnet import ConvNorm, conv_norm_names
from tests.support import (
    STRAIGHT_THROUGH_META,
    assert_matches_central_differences,
    tiny_fo_federation,
    write_run_folder,
)

ARCHS = ["resnet12", "resnet18"]
WIDTHS = (4, 6, 8, 8)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: these tiny networks run many small ops, which extra threads only
    slow down (badly so on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(arch: str, size: int = 8, channels: int = 1, classes: int = 3, **kw) -> ModelSpec:
    return ModelSpec(
        in_channels=channels,
        image_size=size,
        num_classes=classes,
        arch=arch,
        widths=WIDTHS,
        gate_hidden=3,
        **kw,
    )


def all_open(spec: ModelSpec) -> list[torch.Tensor]:
    return [torch.ones(shape.out_channels) for shape in gate_shapes(spec)]


def random_gated(spec: ModelSpec, seed: int) -> GatedResNet:
    """Gates that open roughly half the channels, input-dependently; varied norm affines."""
    torch.manual_seed(seed)
    model = build_model(spec)
    with torch.no_grad():
        for gate in model.gate:
            gate.fc2.bias.normal_(0.0, 1.0)
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.5, 1.0)  # some negative scales
            elif name.endswith("norm.bias"):
                param.normal_(0.0, 0.5)
    return model.eval()


# --------------------------------------------------------------------------- spec and config


def test_spec_normalizes_arch_and_widths():
    spec = ModelSpec(arch="resnet12", widths="4, 6,8-8")
    assert spec.arch is ModelArch.resnet12 and spec.widths == WIDTHS
    assert spec == ModelSpec(arch=ModelArch.resnet12, widths=[4, 6, 8, 8])
    assert hash(spec) == hash(ModelSpec(arch="resnet12", widths=WIDTHS))
    assert ModelSpec(arch="resnet12").widths == (32, 64, 128, 256)
    assert ModelSpec(arch="resnet18").widths == (16, 32, 64, 128)
    assert ModelSpec().widths == () and not ModelSpec().is_resnet
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert "arch" not in ModelSpec().to_dict()  # Conv-N files keep their old spec dict
    assert ModelSpec.from_dict(ModelSpec(width=8).to_dict()) == ModelSpec(width=8)
    assert parse_widths("") == () and parse_widths("32,64") == (32, 64)
    for bad in ("4,6,8", "4,0,8,8", "4,-6,8,8", "a,b,c,d"):
        with pytest.raises(ValueError, match="widths"):
            ModelSpec(arch="resnet18", widths=bad)
    with pytest.raises(ValueError, match="Conv-N"):
        ModelSpec(widths=WIDTHS)
    with pytest.raises(ValueError, match="arch"):
        ModelSpec(arch="vgg")
    with pytest.raises(ValueError, match="build_model"):
        GatedConvNet(spec)
    assert isinstance(build_model(spec), GatedResNet)
    assert spec.gated_layers == 4 and ModelSpec(arch="resnet18").gated_layers == 8


@pytest.mark.parametrize("arch", ARCHS)
def test_config_group_builds_the_resnet(arch):
    """conf/model/<arch>.yaml merged onto the schema, then ``spec_for`` as every node calls it."""
    cfg = default_config()
    cfg.model = OmegaConf.merge(cfg.model, OmegaConf.load(f"conf/model/{arch}.yaml"))
    validate(cfg)
    spec = spec_for(cfg, 1, 28)
    assert spec.arch == arch and spec.widths == ModelSpec(arch=arch).widths
    cfg.model.widths = "8-8-16-16"
    assert spec_for(cfg, 3, 32).widths == (8, 8, 16, 16)
    assert isinstance(model_for(spec_for(cfg, 3, 32)), GatedResNet)
    cfg.model.widths = "8,8,16"
    with pytest.raises(ValueError, match=r"model\.widths"):
        spec_for(cfg, 1, 28)
    conv = default_config()  # Conv-N: width and depth as before, no widths
    assert spec_for(conv, 1, 28) == ModelSpec(in_channels=1, image_size=28, num_classes=5)


# --------------------------------------------------------------------------- MACs


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [8, 28, 32])
@pytest.mark.parametrize("arch", ARCHS)
def test_all_open_mac_count_matches_flop_counter(arch, size, channels):
    spec = tiny(arch, size, channels, classes=5)
    model = build_model(spec)
    images = torch.rand(2, channels, size, size)
    with FlopCounterMode(display=False) as counter:
        out = model(images, mode=GateMode.EVAL, masks=all_open(spec))
    assert counter.get_total_flops() / 2 / len(images) == float(realized_macs(spec, out.trace)[0])
    with FlopCounterMode(display=False) as counter:
        dense = model(images, mode=GateMode.OFF)
    assert counter.get_total_flops() / 2 / len(images) == dense_macs(spec)
    # every norm has its own statistics, in the order of the layout and the module names
    assert [mean.shape[1] for mean, _ in dense.statistics] == norm_channels(spec)
    order: list[str] = []
    modules = dict(model.named_modules())
    hooks = [
        module.register_forward_pre_hook(lambda m, args, name=name: order.append(name))
        for name, module in modules.items()
        if isinstance(module, ConvNorm)
    ]
    model(images, mode=GateMode.EVAL)
    for hook in hooks:
        hook.remove()
    assert order == conv_norm_names(spec)


def test_closing_channels_saves_exactly_the_hand_computed_macs():
    # ResNet-12 on 8x8: stage sides 8, 4, 2, 1; block b's gate has 2 * width columns
    # (the first conv's channels, then the second's).
    spec = tiny("resnet12", 8, 1)
    model = build_model(spec)
    masks = all_open(spec)
    masks[0][[1, 3]] = 0  # block 0 (width 4): conv1 channels 1 and 3
    masks[0][4 + 0] = 0  # ...and conv2 channel 0
    masks[3][8:] = 0  # block 3 (width 8): every conv2 channel
    out = model(torch.rand(5, 1, 8, 8), mode=GateMode.EVAL, masks=masks)
    saved = (
        9 * 8 * 8 * 1 * 2  # block 0 conv1: 2 of 4 outputs closed (1 input channel)
        + 9 * 8 * 8 * (4 * 4 - 2 * 3)  # conv2: 2 of 4 inputs open, 3 of 4 outputs
        + 9 * 8 * 8 * 1 * 4  # conv3: 1 input closed, 4 outputs
        + 9 * 1 * 1 * 8 * 8  # block 3 conv2 (side 1): no output open
        + 9 * 1 * 1 * 8 * 8  # block 3 conv3: no input open
    )
    full = dense_macs(spec) + gate_macs(spec)
    assert torch.all(realized_macs(spec, out.trace) == full - saved)
    assert flops_ratio(spec, out.trace) == pytest.approx((full - saved) / dense_macs(spec))

    # ResNet-18 on 8x8: stage sides 8, 4, 2, 1; block 2 is stage 2's first (stride 2) block
    spec = tiny("resnet18", 8, 3)
    model = build_model(spec)
    masks = all_open(spec)
    masks[2][[0, 5]] = 0  # conv1 channels 0, 5 of 6; it reads 4 channels at 4x4 outputs
    masks[7][:] = 0  # the last block's first conv: all 8 closed (1x1 outputs)
    out = model(torch.rand(4, 3, 8, 8), mode=GateMode.EVAL, masks=masks)
    saved = (
        9 * 4 * 4 * 4 * 2  # block 2 conv1
        + 9 * 4 * 4 * 2 * 6  # block 2 conv2: 2 inputs fewer, 6 outputs
        + 9 * 1 * 1 * 8 * 8  # block 7 conv1
        + 9 * 1 * 1 * 8 * 8  # block 7 conv2
    )
    full = dense_macs(spec) + gate_macs(spec)
    assert torch.all(realized_macs(spec, out.trace) == full - saved)


@pytest.mark.parametrize("arch", ARCHS)
def test_expected_ratio_spans_gate_cost_to_dense(arch):
    spec = tiny(arch)
    model = build_model(spec)
    images = torch.rand(4, 1, 8, 8)
    ratio = expected_mac_ratio(spec, model(images, mode=GateMode.HARD).trace)
    ratio.backward()
    assert all(gate.fc2.bias.grad.abs().sum() > 0 for gate in model.gate)
    dense, gates = dense_macs(spec), gate_macs(spec)
    with torch.no_grad():
        for gate in model.gate:
            gate.fc2.bias.fill_(30.0)
    trace = model(images, mode=GateMode.HARD).trace
    assert expected_mac_ratio(spec, trace).item() == pytest.approx(1 + gates / dense)
    with torch.no_grad():
        for gate in model.gate:
            gate.fc2.bias.fill_(-30.0)
    trace = model(images, mode=GateMode.HARD).trace
    # every inner conv closed: the residual path (last convs, shortcuts, stem, head) remains
    residual = sum(
        c.dense_macs for c in layer_costs(spec) if c.inputs.gate is None and c.outputs.gate is None
    )
    assert expected_mac_ratio(spec, trace).item() == pytest.approx((residual + gates) / dense)


# --------------------------------------------------------------------------- channel independence


@pytest.mark.parametrize("stats", ["batch", "per-input", "frozen"])
@pytest.mark.parametrize("arch", ARCHS)
def test_a_closed_channel_changes_no_other_channel(arch, stats):
    # 16x16: the last stage still has 2x2 maps, so each input's own statistics carry signal
    spec = tiny(arch, 16, 1)
    model = random_gated(spec, 0)
    x = torch.randn(6, 1, 16, 16)
    with torch.no_grad():
        frozen = [(m.flatten(), v.flatten()) for m, v in model(x, mode="off").statistics]
    norm = {
        "batch": NormStats(),
        "per-input": NormStats(per_input=True),
        "frozen": NormStats(frozen=frozen),
    }[stats]
    block = 1  # close channel 2 of the block's first gated conv
    features: dict[str, torch.Tensor] = {}
    inner = model.backbone.blocks[block].convs[1]
    hook = inner.register_forward_pre_hook(lambda m, args: features.update(x=args[0]))
    masks = all_open(spec)
    with torch.no_grad():
        open_out = model(x, GateMode.EVAL, masks=masks, stats=norm)
        open_features = features["x"]
        masks[block][2] = 0
        closed_out = model(x, GateMode.EVAL, masks=masks, stats=norm)
    hook.remove()
    others = [c for c in range(model.backbone.blocks[block].width) if c != 2]
    assert torch.equal(features["x"][:, others], open_features[:, others])
    assert features["x"][:, 2].abs().max() == 0
    # What reads the closed channel is irrelevant; what reads an open one is not.
    with torch.no_grad():
        inner.conv.weight[:, 2] += 10.0
        torch.testing.assert_close(
            model(x, GateMode.EVAL, masks=masks, stats=norm).logits, closed_out.logits
        )
        inner.conv.weight[:, 3] += 10.0
        assert not torch.allclose(
            model(x, GateMode.EVAL, masks=masks, stats=norm).logits, closed_out.logits
        )
    assert not torch.equal(open_out.logits, closed_out.logits)


# --------------------------------------------------------------------------- meta-gradients


@pytest.fixture(scope="module")
def task(digits_episodes):
    return digits_episodes[0]


# soft gates and the expected cost: smooth, so central differences apply
META = replace(STRAIGHT_THROUGH_META, train_gates="soft")


@pytest.mark.parametrize("order", ["backbone_first", "gate_first"])
@pytest.mark.parametrize("arch", ARCHS)
def test_second_order_meta_gradient_matches_finite_differences(task, arch, order):
    support, query = task
    cfg = replace(META, order=order)
    torch.manual_seed(0)
    model = build_model(tiny(arch, gate_bias=1.0)).double()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(5)
    step = meta_gradients(model, params, support, query, cfg)
    assert set(step.grads) == set(params)
    assert 0 < step.flops_ratio < 1.1

    def objective(probe: dict[str, torch.Tensor]) -> float:
        torch.manual_seed(5)
        adapted = adapt(model, probe, support, cfg)
        return task_loss(model, adapted, query, cfg, regularize=True, support=support)[0].item()

    # a smaller step than the default: ReLU kinks lie within 1e-5 of some entries here; one
    # entry of each of the ~50-70 tensors keeps it to seconds
    assert_matches_central_differences(step.grads, params, objective, eps=1e-7, entries=1)


# --------------------------------------------------------------------------- sliced execution


def support_statistics(model: GatedResNet, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    spec = model.spec
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(10, spec.in_channels, spec.image_size, spec.image_size, generator=generator)
    with torch.no_grad():
        return [(m.flatten(), v.flatten()) for m, v in model(x, mode=GateMode.EVAL).statistics]


def check_equal(model: GatedResNet, sliced: SlicedGatedResNet, x: torch.Tensor) -> list[int] | None:
    """One input: the sliced model's logits, open channels and MACs equal the masked dense
    network's with the same statistics (its own at batch size 1, or the frozen ones). None
    (not compared) when a gate logit lies within float error of 0: it may fall either way."""
    stats = NormStats() if sliced.statistics is None else NormStats(frozen=sliced.statistics)
    with torch.no_grad():
        out = model(x, mode=GateMode.EVAL, stats=stats)
        dense = model(x, mode=GateMode.OFF, stats=stats).logits
    logits, opened = sliced.forward_with_open(x)
    # frozen statistics may scale logits up a lot: the tolerance follows their size
    scale = float(dense.abs().max()) + 1.0
    torch.testing.assert_close(sliced.forward_dense(x), dense, rtol=1e-4, atol=1e-5 * scale)
    margin = min(float((layer.prob[0] - 0.5).abs().min()) for layer in out.trace)
    if margin < 1e-5:
        return None
    assert [np.flatnonzero(layer.mask[0].numpy()).tolist() for layer in out.trace] == [
        o.tolist() for o in opened
    ]
    scale = float(out.logits.abs().max()) + 1.0
    torch.testing.assert_close(logits, out.logits, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(sliced(x), logits, rtol=0, atol=0)
    trace_macs = float(realized_macs(model.spec, out.trace)[0])
    assert sliced.macs(opened) == trace_macs
    assert sliced.flops_ratio(opened) == pytest.approx(trace_macs / dense_macs(model.spec))
    return [len(o) for o in opened]


@pytest.mark.parametrize("frozen", [True, False], ids=["support-stats", "own-stats"])
@pytest.mark.parametrize(("size", "channels"), [(8, 1), (28, 3), (11, 1)])
@pytest.mark.parametrize("arch", ARCHS)
def test_sliced_equals_masked_dense(arch, size, channels, frozen):
    spec = tiny(arch, size, channels, classes=4)
    compared = []
    for seed in range(2):
        model = random_gated(spec, seed)
        statistics = support_statistics(model, seed) if frozen else None
        sliced = sliced_model(spec, dict(model.named_parameters()), statistics=statistics)
        assert isinstance(sliced, SlicedGatedResNet) and sliced.backend == "torch"
        for _ in range(5):
            compared.append(check_equal(model, sliced, torch.randn(1, channels, size, size)))
    counts = np.array([c for c in compared if c is not None])
    assert len(counts) >= len(compared) - 1  # at most one input left uncompared
    sizes = np.array([shape.out_channels for shape in gate_shapes(spec)])
    partly = (counts > 0) & (counts < sizes)
    assert partly.mean() > 0.5  # genuinely sliced: most gates open some channels, not all


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_all_closed_or_all_open(arch):
    spec = tiny(arch, 8, 1)
    x = torch.randn(1, 1, 8, 8)
    for frozen in (True, False):
        model = random_gated(spec, 3)
        with torch.no_grad():
            for index, gate in enumerate(model.gate):
                gate.fc2.weight.zero_()
                gate.fc2.bias.fill_(5.0 if index % 2 else -5.0)
        statistics = support_statistics(model, 1) if frozen else None
        sliced = sliced_model(spec, dict(model.named_parameters()), statistics=statistics)
        stats = NormStats(frozen=statistics) if frozen else NormStats()
        with torch.no_grad():
            out = model(x, mode=GateMode.EVAL, stats=stats)
        logits, opened = sliced.forward_with_open(x)
        torch.testing.assert_close(logits, out.logits, rtol=1e-4, atol=1e-4)
        for index, (shape, o) in enumerate(zip(gate_shapes(spec), opened, strict=True)):
            assert len(o) == (shape.out_channels if index % 2 else 0)


def test_sliced_resnet_rejects_what_it_cannot_run():
    spec = tiny("resnet12")
    params = dict(random_gated(spec, 0).named_parameters())
    with pytest.raises(RuntimeError, match="Conv-N only"):
        sliced_model(spec, params, backend="native")
    with pytest.raises(ValueError, match="runs Conv-N"):
        SlicedGatedNet(spec, params, backend="torch")
    with pytest.raises(ValueError, match="missing"):
        SlicedGatedResNet(spec, {k: v for k, v in params.items() if "head" not in k})
    with pytest.raises(ValueError, match="statistics"):
        SlicedGatedResNet(spec, params, statistics=[(torch.zeros(4), torch.ones(4))])
    with pytest.raises(ValueError, match="one input"):
        SlicedGatedResNet(spec, params)(torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize("arch", ARCHS)
def test_model_file_round_trip(tmp_path, arch):
    spec = tiny(arch, 11, 3, classes=4)
    model = random_gated(spec, 1)
    statistics = support_statistics(model, 1)
    sliced = sliced_model(spec, dict(model.named_parameters()), statistics=statistics)
    path = tmp_path / "model.pt"
    save_model(sliced, path, partition=3)
    loaded = load_model(path)
    assert isinstance(loaded, SlicedGatedResNet)
    assert loaded.spec == spec and loaded.metadata == {"partition": 3}
    for (mean, var), (m, v) in zip(sliced.statistics, loaded.statistics, strict=True):
        assert torch.equal(mean, m) and torch.equal(var, v)
    for _ in range(3):
        x = torch.randn(1, 3, 11, 11)
        a, opened_a = sliced.forward_with_open(x)
        b, opened_b = loaded.forward_with_open(x)
        assert torch.equal(a, b)
        assert [o.tolist() for o in opened_a] == [o.tolist() for o in opened_b]


# --------------------------------------------------------------------------- federation, export


def resnet_config():
    cfg = tiny_fo_federation()
    cfg.model.arch = "resnet12"
    cfg.model.widths = "4,6,8,8"
    cfg.model.gate_hidden = 4
    return validate(cfg)


@pytest.fixture(scope="module")
def trained_run():
    """A few first-order meta-steps of a tiny ResNet-12 on digits."""
    cfg = resnet_config()
    federation = BareFederation(cfg)
    initial = {n: p.clone() for n, p in federation.params.items()}
    rounds = 4
    return cfg, initial, federation.train(rounds), rounds


def test_federated_rounds_train_the_resnet(trained_run):
    _, initial, params, _ = trained_run
    assert set(params) == set(initial)
    assert any(name.startswith("backbone.blocks.3.shortcut.") for name in params)
    for group in ("backbone.", "gate."):
        assert any(not torch.equal(params[n], initial[n]) for n in params if n.startswith(group)), (
            group
        )
    assert all(torch.isfinite(p).all() for p in params.values())


def test_export_from_a_resnet_run_folder(trained_run, tmp_path):
    cfg, _, params, rounds = trained_run
    run = tmp_path / "run"
    partition = 5
    reported = write_run_folder(run, cfg, params, rounds, RegularizerWeight(cfg), (partition,))
    out = tmp_path / "node.pt"
    result = export_run(run, partition, out)
    assert isinstance(result.model, SlicedGatedResNet)
    assert result.accuracy == result.reported == reported[str(partition)]
    assert result.masks_equal and result.accuracy == result.masked_dense_accuracy
    assert len(result.layer_active) == 4
    assert "model: ResNet-12 4-6-8-8, 8x8x1, 5 classes" in format_report(result)
    loaded = load_model(out)
    assert loaded.spec.arch is ModelArch.resnet12 and loaded.statistics is not None
    x = partition_task(cfg, partition).fixed_episode().query_x[:2]
    for i in range(2):
        assert torch.equal(loaded(x[i : i + 1]), result.model(x[i : i + 1]))
    # the frozen statistics cover every norm, shortcuts included
    spec = result.model.spec
    model = model_for(spec)
    adapted_stats = deployed_stats(model, result.model.params, x, MetaConfig())
    assert len(adapted_stats.frozen) == len(norm_channels(spec)) == len(loaded.statistics)
