"""The ONNX export: ONNX Runtime computes what the sliced model computes, gates in the graph;
static gates give the narrower network; an image file becomes exactly the model's input; and
docs/edge.md's script classifies with ONNX Runtime, numpy and Pillow alone."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from analysis.export import export_run, main
from conf.choices import GateKind
from gating.data import decode_pixels, load_dataset, pixel_encoding
from gating.deploy import SlicedGatedNet, sliced_model
from gating.deploy.onnx_export import (
    OPSET,
    compare,
    frequent_masks,
    onnx_model,
    read_metadata,
    session,
)
from gating.federated.budget import RegularizerWeight
from gating.federated.nodes import node_task
from gating.federated.round import BareFederation
from gating.model import GateMode, ModelSpec, build_model
from gating.model.norm import NormStats
from tests.support import write_run_folder
from tests.test_resnet import random_gated as random_resnet
from tests.test_resnet import resnet_config, support_statistics, tiny
from tests.test_sliced import frozen_statistics, params_of, random_gated, run_folder
from tests.test_sliced import trained_run as trained_run  # the fixture, re-exported

ROOT = Path(__file__).resolve().parents[1]
#: The gate ops of a conditional graph: none is left in the narrower network of static gates.
GATE_OPS = {"ReduceMean", "Greater", "Compress", "NonZero"}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SPECS = {
    "conv4-28": ModelSpec(in_channels=1, image_size=28, width=32),
    "digits-8": ModelSpec(in_channels=1, image_size=8, width=16),
    "rgb-odd-21": ModelSpec(in_channels=3, image_size=21, num_classes=4, width=13, depth=3),
    "k5-12": ModelSpec(in_channels=2, image_size=12, width=9, depth=2, kernel_size=5),
    "resnet12-11": tiny("resnet12", 11, 3, classes=4),
    "resnet18-8": tiny("resnet18", 8, 1, classes=4),
}


def random_model(spec: ModelSpec, seed: int) -> tuple[torch.nn.Module, list]:
    """A network whose gates open about half the channels, input-dependently, and the frozen
    statistics of a random support set."""
    if spec.is_resnet:
        model = random_resnet(spec, seed)
        return model, support_statistics(model, seed)
    model = random_gated(spec, seed)
    return model, frozen_statistics(model, seed)


def decided(model: torch.nn.Module, x: torch.Tensor, statistics: list) -> bool:
    """No gate logit within float error of 0 (such a channel may fall either way)."""
    with torch.no_grad():
        trace = model(x, mode=GateMode.EVAL, stats=NormStats(frozen=statistics)).trace
    return min(float((layer.prob[0] - 0.5).abs().min()) for layer in trace) > 1e-5


def assert_exact(runtime, sliced, x: torch.Tensor) -> None:
    """ONNX Runtime on every input of ``x``: the sliced model's open channels and prediction,
    logits within 1e-4 (relative to their size)."""
    check = compare(runtime, sliced, x)
    assert check.same_open is not False
    assert check.same_predictions
    assert check.max_logit_difference <= 1e-4 * max(1.0, check.largest_logit)


# --------------------------------------------------------------------------- random networks


@pytest.mark.parametrize("name", list(SPECS))
def test_graph_computes_what_the_sliced_network_computes(name):
    spec = SPECS[name]
    generator = torch.Generator().manual_seed(0)
    counts = []
    for seed in range(2):
        model, statistics = random_model(spec, seed)
        sliced = sliced_model(spec, params_of(model), backend="torch", statistics=statistics)
        graph = onnx_model(sliced)
        assert read_metadata(graph)["gates"] == "conditional"
        runtime, dense = session(graph), session(onnx_model(sliced, dense=True))
        shape = (8, spec.in_channels, spec.image_size, spec.image_size)
        x = torch.randn(shape, generator=generator)
        x = x[[i for i in range(len(x)) if decided(model, x[i : i + 1], statistics)]]
        assert len(x) >= 6
        assert_exact(runtime, sliced, x)
        check = compare(runtime, sliced, x)
        counts += [[len(o) for o in opened] for opened in check.opened]
        for i in range(len(x)):  # the dense graph: every channel, no gate (forward_dense)
            (logits,) = dense.run(["logits"], {"image": x[i : i + 1].numpy()})
            reference = sliced.forward_dense(x[i : i + 1]).numpy()
            scale = max(1.0, float(np.abs(reference).max()))
            np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-4 * scale)
    counts = np.array(counts)
    assert (counts > 0).any() and len({tuple(c) for c in counts}) > 1  # genuinely conditional


@pytest.mark.parametrize("provable", [True, False], ids=["constant-gates", "decided-per-input"])
def test_layers_all_closed_or_all_open(provable):
    """A layer with no open channel (a conv with no input channel outputs its bias; max-pool on
    zero channels) gives the sliced engines' logits, whether the gate is decided at export or
    per input in the graph."""
    spec = ModelSpec(in_channels=1, image_size=28, width=12, depth=4)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    for pattern in [(1, -1, 0, 1), (-1, 1, 1, 1), (1, 1, 1, -1), (1, 1, -1, -1), (-1,) * 4]:
        model = random_gated(spec, 7)
        with torch.no_grad():
            for gate, how in zip(model.gate, pattern, strict=True):
                if how:  # every channel open (+1) or closed (-1), whatever the input
                    gate.fc2.weight.fill_(0.0 if provable else 1e-4)
                    gate.fc2.bias.fill_(5.0 * how)
        statistics = frozen_statistics(model, 1)
        sliced = SlicedGatedNet(spec, params_of(model), backend="torch", statistics=statistics)
        runtime = session(onnx_model(sliced))
        assert_exact(runtime, sliced, x)
        for opened in compare(runtime, sliced, x).opened:
            for count, how in zip([len(o) for o in opened], pattern, strict=True):
                assert how == 0 or count == (spec.width if how > 0 else 0)


@pytest.mark.parametrize("arch", ["resnet12", "resnet18"])
def test_resnet_blocks_all_closed_or_all_open(arch):
    """A block whose gate closes every inner channel: its last conv reads no channel and
    outputs its bias, the residual path goes on whole."""
    spec = tiny(arch, 8, 1)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    model = random_resnet(spec, 3)
    with torch.no_grad():
        for index, gate in enumerate(model.gate):
            gate.fc2.weight.fill_(1e-4)  # decided per input in the graph, always the same way
            gate.fc2.bias.fill_(5.0 if index % 2 else -5.0)
    statistics = support_statistics(model, 1)
    sliced = sliced_model(spec, params_of(model), statistics=statistics)
    runtime = session(onnx_model(sliced))
    assert_exact(runtime, sliced, x)
    for opened in compare(runtime, sliced, x).opened:
        assert [len(o) > 0 for o in opened] == [bool(i % 2) for i in range(len(opened))]


@pytest.mark.parametrize("name", ["conv4-28", "rgb-odd-21", "resnet12-11", "resnet18-8"])
def test_static_gates_give_the_narrower_network(name):
    spec = SPECS[name]
    static = replace(spec, gates=GateKind.static)
    torch.manual_seed(3)
    model = build_model(static)
    with torch.no_grad():
        for gate in model.gate:
            gate.fc2.bias.normal_(0.0, 1.0)  # some channels closed for every input
    statistics = random_model(spec, 3)[1]
    sliced = sliced_model(static, params_of(model), backend="torch", statistics=statistics)
    graph = onnx_model(sliced)
    assert read_metadata(graph)["gates"] == "static"
    assert not {node.op_type for node in graph.graph.node} & GATE_OPS
    # narrower: the conv weights hold only the open channels (Conv-N's padded with zero ones up
    # to whole blocks of 16 where the width is a multiple of 16), fewer than the dense network's
    weights = [numpy_helper.to_array(t) for t in graph.graph.initializer if "conv.weight" in t.name]
    dense = [p for n, p in model.named_parameters() if "conv.weight" in n]
    assert sum(np.count_nonzero(w) for w in weights) < sum(p.numel() for p in dense)
    if not spec.is_resnet and spec.width % 16 == 0:
        assert all(w.shape[0] % 16 == 0 for w in weights)
    x = torch.randn(6, spec.in_channels, spec.image_size, spec.image_size)
    assert_exact(session(graph), sliced, x)


def test_the_expected_gates_fast_path_is_exact_where_it_hits_and_where_it_misses():
    """Inputs near one image open that image's channels (the fast path's constant network
    answers), random ones others (the general graph answers): the same results either way."""
    spec = SPECS["conv4-28"]
    model, statistics = random_model(spec, 0)
    sliced = sliced_model(spec, params_of(model), backend="torch", statistics=statistics)
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(1, 1, 28, 28, generator=generator)
    near = base + 1e-3 * torch.randn(6, 1, 28, 28, generator=generator)
    x = torch.cat([near, torch.randn(6, 1, 28, 28, generator=generator)])
    x = x[[i for i in range(len(x)) if decided(model, x[i : i + 1], statistics)]]
    expected, share = frequent_masks(sliced, near)
    assert share == 1.0
    graph = onnx_model(sliced, expected=expected)
    assert read_metadata(graph)["gates"].startswith("conditional, with a fast path")
    assert "If" in {node.op_type for node in graph.graph.node}
    hits = [
        all(
            np.array_equal(a, b)
            for a, b in zip(sliced.forward_with_open(x[i : i + 1])[1], expected, strict=True)
        )
        for i in range(len(x))
    ]
    assert 4 <= sum(hits) < len(x)  # both paths taken
    assert_exact(session(graph), sliced, x)
    with pytest.raises(ValueError, match="Conv-N"):
        onnx_model(sliced, dense=True, expected=expected)


def test_batch_statistics_are_refused():
    spec = SPECS["digits-8"]
    sliced = SlicedGatedNet(spec, params_of(random_gated(spec, 0)), backend="torch")
    with pytest.raises(ValueError, match="frozen statistics"):
        onnx_model(sliced)


# --------------------------------------------------------------------------- real run folders


def test_conv4_run_exports_an_exact_graph(trained_run, tmp_path, capsys):
    """Every query image of the node: ONNX Runtime's prediction is the sliced model's (logits
    within 1e-4) with masks that change per input, and the accuracy is the run's figure."""
    cfg = trained_run[0]
    run = tmp_path / "run"
    reported = run_folder(trained_run, run)["5"]
    out, images = tmp_path / "node5.onnx", tmp_path / "images"
    args = [str(run), "--partition", "5", "--format", "onnx", "--out", str(out)]
    assert main([*args, "--save-images", str(images)]) == 0
    printed = capsys.readouterr().out
    assert "ONNX Runtime on the exported graph, one image at a time" in printed
    assert "gates in the graph: conditional" in printed
    assert printed.strip().splitlines()[-1] == (
        f"RESULT accuracy={reported:.6f} reported={reported:.6f}"
    )

    graph = onnx.load(out)
    assert graph.opset_import[0].version == OPSET
    meta = read_metadata(graph)
    task = node_task(cfg, {"partition-id": 5, "num-partitions": 6})
    assert meta["opset"] == str(OPSET) and meta["input_name"] == "image"
    assert json.loads(meta["input_shape"]) == [1, 1, 8, 8] and meta["input_type"] == "float32"
    assert json.loads(meta["classes"]) == [int(c) for c in task.classes]
    assert json.loads(meta["class_names"]) == [str(c) for c in task.classes]  # digits: "0".."9"
    assert json.loads(meta["preprocessing"]) == pixel_encoding("digits", 1)
    assert float(meta["query_accuracy"]) == reported and meta["partition"] == "5"

    result = export_run(run, 5, None, backend="torch", fmt="onnx")
    runtime = session(out)
    check = compare(runtime, result.model, result.query_x)
    assert check.same_predictions and check.same_open
    assert check.max_logit_difference <= 1e-4
    assert float(np.mean(check.predictions == result.query_y.numpy())) == reported
    # the gates decide per input in the graph: the open channels differ between query images
    assert len({tuple(tuple(o.tolist()) for o in opened) for opened in check.opened}) >= 2

    # the PNG files are exactly the model's inputs through the dataset's encoding
    rows = (images / "labels.csv").read_text().splitlines()
    assert rows[0] == "file,label,class,class_name" and len(rows) == len(result.query_y) + 1
    for row in rows[1:]:
        name, label, cls, _ = row.split(",")
        index = int(name.removesuffix(".png"))
        pixels = np.asarray(Image.open(images / name))
        x = decode_pixels(pixels, json.loads(meta["preprocessing"]))
        assert np.array_equal(x, result.query_x[index : index + 1].numpy())
        assert int(label) == int(result.query_y[index]) and int(cls) == task.classes[int(label)]


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory) -> tuple[Path, float]:
    """A gated ResNet-12 (widths 4-6-8-8) after a few first-order meta-steps on digits, written
    as a run folder, and the accuracy its ClientApp reports for target node 5."""
    cfg = resnet_config()
    rounds = 4
    params = BareFederation(cfg).train(rounds)
    run = tmp_path_factory.mktemp("resnet") / "run"
    reported = write_run_folder(run, cfg, params, rounds, RegularizerWeight(cfg), (5,))
    return run, reported["5"]


def test_resnet12_run_exports_an_exact_graph(resnet_run, tmp_path):
    run, reported = resnet_run
    out = tmp_path / "node5.onnx"
    result = export_run(run, 5, out, fmt="onnx")
    assert result.model.spec.describe() == "ResNet-12 4-6-8-8"
    assert result.onnx is not None and result.onnx.agrees and result.onnx.gates == "conditional"
    assert result.onnx.accuracy == result.accuracy == reported
    check = compare(session(out), result.model, result.query_x)
    assert check.same_predictions and check.same_open
    assert check.max_logit_difference <= 1e-4
    assert float(np.mean(check.predictions == result.query_y.numpy())) == reported
    counts = np.array([[len(o) for o in opened] for opened in check.opened])
    assert (counts < 12).any()  # the trained gates close channels (4 gates of 2 x width)


def test_onnx_export_writes_over_nothing(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    run_folder(trained_run, run)
    checkpoint = (run / "checkpoint.pt").read_bytes()
    base = [str(run), "--format", "onnx"]
    assert main([*base, "--out", str(run / "checkpoint.pt"), "--force"]) == 2
    assert "one of the run's own files" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == checkpoint
    existing = tmp_path / "node.onnx"
    existing.write_text("keep me")
    assert main([*base, "--out", str(existing)]) == 2
    assert "exists" in capsys.readouterr().err and existing.read_text() == "keep me"
    images = tmp_path / "images"
    images.mkdir()
    (images / "mine.png").write_text("keep me")
    assert main([*base, "--save-images", str(images)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*base, "--out", str(existing), "--force"]) == 0
    assert onnx.load(existing).graph.output[0].name == "logits"


def test_save_images_refuses_resized_data_before_writing(trained_run, tmp_path, capsys):
    """A run that resized its data with PyTorch has no exact 8-bit image form: --save-images is
    refused by name, and nothing is written."""
    cfg, *rest = trained_run
    resized = cfg.copy()
    resized.dataset.image_size = 10  # 8x8 digits resized: Conv-4's head still sees 1x1
    run = tmp_path / "run"
    run_folder((resized, *rest), run)
    out, images = tmp_path / "node5.onnx", tmp_path / "images"
    args = [str(run), "--format", "onnx", "--out", str(out), "--save-images", str(images)]
    assert main(args) == 2
    assert "no exact 8-bit image form" in capsys.readouterr().err
    assert not out.exists() and not images.exists()


# --------------------------------------------------------------------------- image files


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.mark.parametrize("kind", ["omniglot", "imagefolder-gray", "imagefolder-rgb", "resized"])
def test_pixel_encoding_is_the_loaders(kind, tmp_path):
    """An image file through the encoding the metadata states (Pillow's Lanczos for another
    size, then the scaling) gives exactly what the dataset's loader gives."""
    rng = np.random.default_rng(0)
    rgb = kind == "imagefolder-rgb"
    side = 40 if kind == "resized" else 28
    files = []
    for c in range(2):
        for i in range(3):
            shape = (side, side, 3) if rgb else (side, side)
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            folder = tmp_path / "root" / ("alphabet" if kind == "omniglot" else "") / f"class{c}"
            files.append(folder / f"{i}.png")
            write_png(files[-1], pixels)
    name = "omniglot" if kind == "omniglot" else "imagefolder"
    dataset = load_dataset(name, tmp_path / "root", 28 if kind == "resized" else None)
    encoding = pixel_encoding(name, 3 if rgb else 1)
    size = dataset.images.shape[-1]  # the model's side (an RGB ImageFolder's default: 32)
    for index, path in enumerate(files):
        image = Image.open(path).convert(encoding["mode"])
        if image.size != (size, size):
            assert encoding["resize"] == "lanczos"
            image = image.resize((size, size), Image.Resampling.LANCZOS)
        x = decode_pixels(np.asarray(image), encoding)
        assert np.array_equal(x[0], dataset.images[index])


# --------------------------------------------------------------------------- without torch


def edge_script() -> str:
    """The python block that follows the classify.py marker in docs/edge.md, verbatim."""
    text = (ROOT / "docs" / "edge.md").read_text()
    match = re.search(r"<!-- classify\.py[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match is not None, "docs/edge.md lost its classify.py block"
    return match.group(1)


@pytest.mark.deploy
def test_edge_script_classifies_without_torch(trained_run, tmp_path):
    """docs/edge.md's script, run verbatim in a fresh virtual environment that holds only
    onnxruntime, numpy and Pillow from the package index, classifies a node's query image
    file as the sliced model does."""
    run = tmp_path / "run"
    run_folder(trained_run, run)
    model, images = tmp_path / "node5.onnx", tmp_path / "images"
    result = export_run(run, 5, model, fmt="onnx", images=images)
    venv = tmp_path / "edge"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    install = [python, "-m", "pip", "install", "--quiet", "onnxruntime", "numpy", "pillow"]
    done = subprocess.run(install, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    script = tmp_path / "classify.py"
    script.write_text(edge_script())
    no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, cwd=tmp_path)
    assert no_torch.returncode != 0
    no_project = subprocess.run([python, "-c", "import gating"], capture_output=True, cwd=tmp_path)
    assert no_project.returncode != 0
    for index in (0, len(result.query_y) - 1):
        done = subprocess.run(
            [python, str(script), str(model), str(images / f"{index:03d}.png")],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        printed = re.search(r"^class (\d+) ", done.stdout, re.M)
        assert printed is not None, done.stdout
        predicted = int(result.model(result.query_x[index : index + 1]).argmax())
        assert int(printed.group(1)) == result.classes[predicted]
        logits = [float(v) for v in done.stdout.split("logits", 1)[1].split()]
        reference = result.model(result.query_x[index : index + 1])[0].numpy()
        np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-3)  # printed to 4 places


# --------------------------------------------------------------------------- the benchmark


def test_onnx_benchmark_runs_and_agrees(subprocess_env):
    """benchmarks/onnx_inference.py on tiny settings: to its RESULT line, with ONNX Runtime
    equal to the sliced model on every measured input (the figures are BENCHMARKS.md's)."""
    args = ["--steps", "3", "--nodes", "1", "--reps", "1", "--widths", "", "--no-compile"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "onnx_inference.py"), *args],
        cwd=ROOT,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), last
    figures = dict(pair.split("=", 1) for pair in last.split()[1:])
    assert figures["exact"] == "True"
    assert math.isfinite(float(figures["speedup"])) and 0 < float(figures["flops_ratio"]) <= 1.1
    # int8 changes few predictions: its accuracy stays near the float graph's
    assert abs(float(figures["int8_gated_acc"]) - float(figures["float_gated_acc"])) <= 0.1
