"""Sliced execution equals the masked dense network; the exported model file round-trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import gating.deploy.sliced as sliced_module
from analysis.export import adapt_node, export_run, main
from gating.deploy import SlicedGatedNet, load_model, native_available, save_model
from gating.federated.nodes import node_task
from gating.federated.round import BareFederation
from gating.model import GatedConvNet, GateMode, ModelSpec, NormStats, dense_macs, realized_macs
from tests.support import tiny_fo_federation, write_run_folder


def need_native() -> None:
    """Skip, with the reason, where the C++ engine cannot be built (no compiler or no ninja:
    ``pip install -e '.[native]'``); asked only when a test needs it, never at collection."""
    ok, why = native_available()
    if not ok:
        pytest.skip(f"no C engine: {why}")


@pytest.fixture(params=["torch", "native"])
def backend(request) -> str:
    if request.param == "native":
        need_native()
    return request.param


SPECS = {
    "conv4-28": ModelSpec(in_channels=1, image_size=28, width=32),
    "digits-8": ModelSpec(in_channels=1, image_size=8, width=16),
    "rgb-odd-21": ModelSpec(in_channels=3, image_size=21, num_classes=4, width=13, depth=3),
    "k5-12": ModelSpec(in_channels=2, image_size=12, width=9, depth=2, kernel_size=5),
    "wide-64": ModelSpec(in_channels=1, image_size=14, width=64, depth=2, gate_hidden=8),
    "k1-9": ModelSpec(in_channels=1, image_size=9, width=5, depth=2, kernel_size=1),
}
TOL = {"rtol": 1e-4, "atol": 1e-4}


def random_gated(spec: ModelSpec, seed: int) -> GatedConvNet:
    """A network whose gates open roughly half the channels, input-dependently."""
    torch.manual_seed(seed)
    model = GatedConvNet(spec)
    with torch.no_grad():
        for gate in model.gate:
            gate.fc2.bias.normal_(0.0, 1.0)
        for block in model.backbone.blocks:
            block.norm.weight.normal_(0.5, 1.0)  # some negative scales: min-pooling path
            block.norm.bias.normal_(0.0, 0.5)
    return model.eval()


def params_of(model: GatedConvNet) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


COMPARED = {"yes": 0, "no": 0}


def frozen_statistics(model: GatedConvNet, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel statistics of a random 'support set' of 10 inputs, as a metabn node freezes
    them after Adapt."""
    spec = model.spec
    generator = torch.Generator().manual_seed(seed)
    support = torch.randn(
        10, spec.in_channels, spec.image_size, spec.image_size, generator=generator
    )
    with torch.no_grad():
        trace = model(support, mode=GateMode.EVAL).trace
    return [(layer.mean.flatten(), layer.var.flatten()) for layer in trace]


def stats_of(sliced: SlicedGatedNet) -> NormStats:
    """What the masked dense network must use to compute what ``sliced`` computes."""
    return NormStats() if sliced.statistics is None else NormStats(frozen=sliced.statistics)


def check_equal(model: GatedConvNet, sliced: SlicedGatedNet, x: torch.Tensor) -> list[int]:
    """Logits and open channels of one input equal the masked dense network's."""
    with torch.no_grad():
        out = model(x, mode=GateMode.EVAL, stats=stats_of(sliced))
    logits, opened = sliced.forward_with_open(x)
    masks = [np.flatnonzero(layer.mask[0].numpy()) for layer in out.trace]
    margin = min(float((layer.prob[0] - 0.5).abs().min()) for layer in out.trace)
    COMPARED["yes" if margin > 1e-5 else "no"] += 1
    if margin > 1e-5:  # a gate logit within float error of 0 may fall either way
        assert [m.tolist() for m in masks] == [o.tolist() for o in opened]
        torch.testing.assert_close(logits, out.logits, **TOL)
        torch.testing.assert_close(sliced.forward(x), logits, rtol=0, atol=0)
        trace_macs = float(realized_macs(model.spec, out.trace)[0])
        assert sliced.macs(opened) == trace_macs
        assert sliced.flops_ratio(opened) == pytest.approx(trace_macs / dense_macs(model.spec))
    return [len(o) for o in opened]


@pytest.mark.parametrize("frozen", [True, False], ids=["support-stats", "own-stats"])
@pytest.mark.parametrize("name", list(SPECS))
def test_sliced_equals_masked_dense_random(name, backend, frozen):
    spec = SPECS[name]
    opened = []
    for seed in range(3):
        model = random_gated(spec, seed)
        statistics = frozen_statistics(model, seed) if frozen else None
        sliced = SlicedGatedNet(spec, params_of(model), backend=backend, statistics=statistics)
        assert sliced.backend == backend
        for _ in range(4):
            x = torch.randn(1, spec.in_channels, spec.image_size, spec.image_size)
            opened.append(check_equal(model, sliced, x))
            with torch.no_grad():
                dense = model(x, mode=GateMode.OFF, stats=stats_of(sliced)).logits
            torch.testing.assert_close(sliced.forward_dense(x), dense, **TOL)
    counts = np.array(opened)
    assert (counts < spec.width).any() and (counts > 0).all()  # genuinely sliced


@pytest.mark.parametrize("frozen", [True, False], ids=["support-stats", "own-stats"])
def test_layers_all_closed_or_all_open(backend, frozen):
    spec = ModelSpec(in_channels=1, image_size=28, width=12, depth=4)
    x = torch.randn(1, 1, 28, 28)
    for pattern in [(1, -1, 0, 1), (-1, 1, 1, 1), (1, 1, 1, -1), (1, 1, -1, -1), (-1,) * 4]:
        model = random_gated(spec, 7)
        with torch.no_grad():
            for gate, how in zip(model.gate, pattern, strict=True):
                if how:  # every channel open (+1) or closed (-1), whatever the input
                    gate.fc2.weight.zero_()
                    gate.fc2.bias.fill_(5.0 * how)
        statistics = frozen_statistics(model, 1) if frozen else None
        sliced = SlicedGatedNet(spec, params_of(model), backend=backend, statistics=statistics)
        counts = check_equal(model, sliced, x)
        for count, how in zip(counts, pattern, strict=True):
            assert how == 0 or count == (spec.width if how > 0 else 0)


def test_backends_agree_and_stage_times():
    need_native()
    spec = SPECS["conv4-28"]
    model = random_gated(spec, 3)
    native = SlicedGatedNet(spec, params_of(model), backend="native")
    reference = SlicedGatedNet(spec, params_of(model), backend="torch")
    statistics = frozen_statistics(model, 3)
    native_frozen = SlicedGatedNet(spec, params_of(model), "native", statistics)
    reference_frozen = SlicedGatedNet(spec, params_of(model), "torch", statistics)
    for _ in range(5):
        x = torch.randn(1, 1, 28, 28)
        a, opened_a = native.forward_with_open(x)
        b, opened_b = reference.forward_with_open(x)
        torch.testing.assert_close(a, b, **TOL)
        assert [o.tolist() for o in opened_a] == [o.tolist() for o in opened_b]
        torch.testing.assert_close(native_frozen(x), reference_frozen(x), **TOL)
    stages = native.stage_times(x)
    assert list(stages)[:4] == ["input", "L0.gate", "L0.conv", "L0.norm_pool"]
    assert list(stages)[-1] == "head" and all(v >= 0 for v in stages.values())
    with pytest.raises(RuntimeError):
        reference.stage_times(x)


def test_falls_back_to_torch_without_a_compiler(monkeypatch):
    monkeypatch.setattr(sliced_module, "native_library", lambda: (None, "no compiler here"))
    spec = SPECS["digits-8"]
    params = params_of(random_gated(spec, 0))
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        assert SlicedGatedNet(spec, params).backend == "torch"
    with pytest.raises(RuntimeError, match="no compiler here"):
        SlicedGatedNet(spec, params, backend="native")


def test_rejects_wrong_parameters_and_inputs():
    spec = SPECS["digits-8"]
    params = params_of(random_gated(spec, 0))
    with pytest.raises(ValueError, match="missing"):
        SlicedGatedNet(spec, {k: v for k, v in params.items() if "head" not in k})
    with pytest.raises(ValueError, match="shape"):
        SlicedGatedNet(ModelSpec(in_channels=1, image_size=8, width=8), params)
    with pytest.raises(ValueError, match="backend"):
        SlicedGatedNet(spec, params, backend="cuda")
    sliced = SlicedGatedNet(spec, params)
    with pytest.raises(ValueError, match="one input"):
        sliced(torch.randn(2, 1, 8, 8))


def test_save_load_round_trip(tmp_path, backend):
    spec = SPECS["rgb-odd-21"]
    model = random_gated(spec, 1)
    statistics = frozen_statistics(model, 1)
    sliced = SlicedGatedNet(spec, params_of(model), backend=backend, statistics=statistics)
    path = tmp_path / "model.pt"
    save_model(sliced, path, partition=3, classes=[4, 1, 0, 2])
    loaded = load_model(path, backend=backend)
    assert loaded.spec == spec and loaded.metadata == {"partition": 3, "classes": [4, 1, 0, 2]}
    for (mean, var), (m, v) in zip(statistics, loaded.statistics, strict=True):
        assert torch.equal(mean, m) and torch.equal(var, v)
    for _ in range(4):
        x = torch.randn(1, 3, 21, 21)
        a, opened_a = sliced.forward_with_open(x)
        b, opened_b = loaded.forward_with_open(x)
        assert torch.equal(a, b)
        assert [o.tolist() for o in opened_a] == [o.tolist() for o in opened_b]
    torch.save({"something": "else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an exported sliced model"):
        load_model(tmp_path / "other.pt")
    # NaN parameters would predict one class for every input: refused, naming the tensor
    state = torch.load(path, weights_only=True)
    state["params"]["backbone.head.bias"][0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"not finite: backbone\.head\.bias"):
        load_model(tmp_path / "nan.pt")


# --------------------------------------------------------------------------- a real adapted model


def digits_config():
    return tiny_fo_federation()


@pytest.fixture(scope="module")
def trained_run() -> tuple[object, dict[str, torch.Tensor], int]:
    """A few first-order meta-steps on digits with fast gate learning: gates that really close
    channels, input-dependently, as after federated meta-training."""
    cfg = digits_config()
    rounds = 12
    federation = BareFederation(cfg)
    return cfg, federation.train(rounds), rounds, federation.regularizer_weight


def test_real_adapted_model(trained_run, backend):
    cfg, params, rounds, weight = trained_run
    result = adapt_node(cfg, params, 4, rounds, weight(rounds), backend=backend)
    assert result.role == "target" and result.model.backend == backend
    assert result.masks_equal and result.max_logit_difference < 1e-4
    assert result.accuracy == result.masked_dense_accuracy
    assert 0.0 < result.flops_ratio < 1.0  # the adapted gates do close channels
    # the same adaptation again (same seeds) gives the same model
    again = adapt_node(cfg, params, 4, rounds, weight(rounds), backend=backend)
    for name, value in result.model.params.items():
        assert torch.equal(value, again.model.params[name])
    spec = result.model.spec
    module = GatedConvNet(spec)
    module.load_state_dict(result.model.params)
    x = node_task(cfg, {"partition-id": 4, "num-partitions": 6}).fixed_episode().query_x
    for i in range(len(x)):
        check_equal(module, result.model, x[i : i + 1])
    # the gates are conditional here: the exactness holds with masks that change per input
    masks = {
        tuple(tuple(o.tolist()) for o in result.model.forward_with_open(x[i : i + 1])[1])
        for i in range(len(x))
    }
    assert len(masks) >= 3


def run_folder(trained_run, folder: Path) -> dict[str, float]:
    """``trained_run`` written as a run of simulate.py, target nodes 4 and 5 reported."""
    cfg, params, rounds, regularizer_weight = trained_run
    return write_run_folder(folder, cfg, params, rounds, regularizer_weight, (4, 5))


def test_export_from_a_run_folder(trained_run, tmp_path, capsys):
    cfg, _, rounds, regularizer_weight = trained_run
    run = tmp_path / "run"
    reported = run_folder(trained_run, run)
    # λ has moved from its initial value (dual ascent), so export must take it from the
    # checkpoint to adapt as the ClientApp did.
    assert regularizer_weight(rounds) != float(cfg.gating["lambda"])
    out = tmp_path / "node5.pt"
    result = export_run(run, 5, out)
    assert result.accuracy == result.reported == reported["5"]
    loaded = load_model(out)
    assert loaded.metadata["partition"] == 5 and loaded.metadata["server_round"] == rounds
    assert loaded.metadata["query_accuracy"] == result.accuracy
    assert loaded.metadata["classes"] == result.classes
    assert loaded.statistics is not None  # metabn: the frozen support statistics travel along
    x = node_task(cfg, {"partition-id": 5, "num-partitions": 6}).fixed_episode().query_x[:3]
    for i in range(3):
        assert torch.equal(loaded(x[i : i + 1]), result.model(x[i : i + 1]))

    assert main([str(run), "--partition", "4", "--out", str(tmp_path / "node4.pt")]) == 0
    printed = capsys.readouterr().out
    assert "exported sliced model, one image at a time" in printed and "node4.pt" in printed
    last = printed.strip().splitlines()[-1]
    assert last == f"RESULT accuracy={reported['4']:.6f} reported={reported['4']:.6f}"
    assert main([str(tmp_path / "missing")]) == 2


def test_export_writes_over_nothing_and_refuses_an_edited_config(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    run_folder(trained_run, run)
    checkpoint = (run / "checkpoint.pt").read_bytes()
    # the run's own checkpoint, even with --force: the run could no longer resume
    assert main([str(run), "--out", str(run / "checkpoint.pt"), "--force"]) == 2
    assert "one of the run's own files" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == checkpoint
    # another existing file: only with --force
    existing = tmp_path / "node.pt"
    existing.write_text("keep me")
    assert main([str(run), "--out", str(existing)]) == 2
    assert "exists" in capsys.readouterr().err and existing.read_text() == "keep me"
    assert main([str(run), "--out", str(existing), "--force"]) == 0
    # config.yaml edited after the run: its figures would not be the run's
    config = OmegaConf.load(run / "config.yaml")
    config.adapt.gate_lr = 0.9
    OmegaConf.save(config, run / "config.yaml")
    assert main([str(run), "--out", str(tmp_path / "other.pt")]) == 2
    error = capsys.readouterr().err
    assert "adapt.gate_lr" in error and "restore it" in error
    assert not (tmp_path / "other.pt").exists()


def test_saved_queries_reproduce_the_reported_accuracy(trained_run, tmp_path, capsys):
    """`--save-queries`: the model file and the npz alone give the run's figure for the node,
    as the snippet of docs/deploy.md ("A node's model file") computes it."""
    cfg = trained_run[0]
    run = tmp_path / "run"
    reported = run_folder(trained_run, run)["5"]
    task = node_task(cfg, {"partition-id": 5, "num-partitions": 6})
    model_file, queries_file = tmp_path / "node5.pt", tmp_path / "node5-queries"  # no suffix

    args = [str(run), "--partition", "5", "--out", str(model_file)]
    assert main([*args, "--save-queries", str(queries_file)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"RESULT accuracy={reported:.6f} reported={reported:.6f}"

    model = load_model(model_file)
    queries = np.load(queries_file)  # written under exactly the name given
    assert sorted(queries.files) == ["classes", "x", "y"]
    x, y = torch.from_numpy(queries["x"]), queries["y"]
    assert x.dtype == torch.float32 and y.dtype == np.int64
    assert x.shape == (cfg.task.ways * cfg.task.queries, 1, 8, 8) and y.shape == (len(x),)
    assert sorted(set(y.tolist())) == list(range(cfg.task.ways))  # node-local labels
    assert queries["classes"].tolist() == [int(c) for c in task.classes]
    predicted = np.array([int(model(x[i : i + 1]).argmax()) for i in range(len(y))])
    assert float(np.mean(predicted == y)) == reported
    # exactly the node's fixed query episode, the one the run evaluates on
    episode = task.fixed_episode()
    assert torch.equal(x, episode.query_x) and np.array_equal(y, episode.query_y.numpy())


def test_gate_map_draws_what_each_node_opens_per_input(trained_run, tmp_path, capsys):
    from analysis.gate_map import main as gate_map
    from analysis.gate_map import open_matrix

    run = tmp_path / "run"
    run_folder(trained_run, run)
    matrix, classes, channels = open_matrix(run, 5, inputs=6)
    assert matrix.shape == (6, sum(channels)) and set(np.unique(matrix)) <= {0.0, 1.0}
    assert len(set(classes)) == trained_run[0].task.ways  # inputs of every class, in turn
    assert 0 < matrix.mean() < 1  # the trained gates close some channels, not all
    out = tmp_path / "map.png"
    assert gate_map([str(run), "--partitions", "4", "5", "--inputs", "6", "--out", str(out)]) == 0
    assert out.stat().st_size > 5000
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("RESULT node4_varying=")
    assert gate_map([str(tmp_path / "missing"), "--partitions", "4"]) == 2


def test_comparisons_are_rarely_skipped():
    """check_equal skips inputs with a gate logit at float distance from 0: that stays rare, so
    the equality tests above do compare (counted here on their own inputs' kind)."""
    before = dict(COMPARED)
    for spec in SPECS.values():
        model = random_gated(spec, 11)
        sliced = SlicedGatedNet(spec, params_of(model), backend="torch")
        for _ in range(8):
            check_equal(
                model, sliced, torch.randn(1, spec.in_channels, spec.image_size, spec.image_size)
            )
    done = {k: COMPARED[k] - before[k] for k in COMPARED}
    assert done["yes"] + done["no"] == 8 * len(SPECS)
    assert done["no"] <= 0.05 * (done["yes"] + done["no"])
