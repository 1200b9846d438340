"""Export a target node's adapted gated network from a finished run as a sliced model file.

    python -m analysis.export RUN_DIR --partition P --out model.pt [--save-queries queries.npz]
    python -m analysis.export RUN_DIR --partition P --format onnx --out node.onnx \
        [--save-images DIR]

It rebuilds partition P's task exactly as the ClientApp does (``gating.federated.nodes`` with the
run's config and ``num-partitions = train_nodes + target_nodes``), runs the one two-stage
``Adapt`` on the node's fixed support episode with the same λ and gate-noise seed as the run's
final evaluation, freezes the norms' statistics as the node does (``metabn``: from its support
set), and writes a sliced model file (:class:`gating.deploy.SlicedGatedNet` for Conv-N,
:class:`gating.deploy.SlicedGatedResNet` for the gated ResNets, picked by
:func:`gating.deploy.sliced_model`): the deployment form that runs only the open channels, with
everything a node needs to classify one image at a time.

It classifies the node's queries one at a time with the exported model and with the masked
dense network (same function, other arithmetic: they must agree), next to the accuracy the run
reported for that node (``task_accuracy.json``), which is the same one-image-at-a-time figure,
and the transductive accuracy (norm statistics of the whole query batch) for contrast. The last
line is ``RESULT accuracy=<exported model, one image at a time> reported=<the run's figure>``.

``--format onnx`` writes the same network as an ONNX graph with its gates inside
(:mod:`gating.deploy.onnx_export`), which ONNX Runtime runs without PyTorch or this project
(docs/edge.md), and then runs the written file on every query with ONNX Runtime: its
predictions must be the sliced model's, so the RESULT line's accuracy is ONNX Runtime's.

``--save-queries FILE.npz`` also writes those query images, so that anyone can check the model
file on its own (:func:`save_queries`): ``x`` (N, C, H, W) float32, the model's input as is;
``y`` (N,) int64 node-local labels, what ``logits.argmax()`` predicts; ``classes`` the global
class id of each node-local label. ``--save-images DIR`` writes them as image files instead
(:func:`save_images`): ``DIR/000.png``, ... whose pixels the dataset's loader maps exactly to
those inputs, and ``DIR/labels.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from conf.schema import RUN_ONLY_KEYS, changed_settings, saved_flat, settings_from_flat, to_flat
from gating.data import DatasetError, encode_pixels, load_dataset, pixel_encoding
from gating.deploy import BACKENDS, SlicedModel, save_model, sliced_model
from gating.federated.budget import RegularizerWeight
from gating.federated.nodes import partition_task
from gating.federated.strategies import strategy_of
from gating.federated.target import adapt_target_node
from gating.meta import accuracy, forward
from gating.model import GateMode, gate_shapes
from server.checkpoint import CHECKPOINT_NAME, RESULT_FILES, RunFolderError, load_checkpoint
from server.results import TASK_ACCURACY_FILE

if TYPE_CHECKING:
    import onnx

CONFIG = "config.yaml"
TASK_ACCURACY = TASK_ACCURACY_FILE
#: What a run writes into its folder: an export never replaces these.
RUN_FILES = frozenset({*RESULT_FILES, CONFIG})
#: What ``--format`` writes: the torch model file of ``gating.deploy``, or an ONNX graph.
FORMATS = ("torch", "onnx")
#: ONNX Runtime's logits may differ from the sliced model's by float rounding: this much,
#: relative to the largest logit (at least 1), before the export is called wrong.
ONNX_TOLERANCE = 1e-4
#: The ONNX graph of a Conv-N node gets its fast path (the constant-weight network of the most
#: frequent open channels, checked per input) when at least this share of the node's support
#: images open those channels: a miss runs both networks (BENCHMARKS.md, "ONNX Runtime at the
#: edge"), so the fast path pays only where nearly every input hits it.
FAST_PATH_SHARE = 0.9


@dataclass
class OnnxCheck:
    """ONNX Runtime running the exported graph on the node's query set, one image at a time."""

    accuracy: float
    max_logit_difference: float  # against the sliced model, over the query set
    same_predictions: bool  # ONNX Runtime's argmax is the sliced model's for every query
    same_open: bool | None  # the graph's gates open the sliced model's channels (None: no gate)
    gates: str  # "conditional" (decided per input in the graph) or "static" (narrower network)
    largest_logit: float

    @property
    def agrees(self) -> bool:
        tolerance = ONNX_TOLERANCE * max(1.0, self.largest_logit)
        return (
            self.same_predictions
            and self.same_open is not False
            and self.max_logit_difference <= tolerance
        )


@dataclass
class Export:
    """An adapted node's sliced model and how it does on the node's query set."""

    model: SlicedModel
    partition: int
    role: str
    server_round: int
    classes: list[int]  # global class ids in node-local label order (logit i -> classes[i])
    accuracy: float  # the sliced model, one query input at a time
    masked_dense_accuracy: float  # the gated module in GateMode.EVAL, one input at a time
    transductive_accuracy: float  # the gated module, norm statistics of the whole query batch
    max_logit_difference: float  # sliced vs masked dense, over the query set
    masks_equal: bool  # the same channels open for every query input
    flops_ratio: float  # mean realized MACs / dense MACs over the query inputs
    layer_active: list[float] = field(default_factory=list)  # mean open ratio per gate
    reported: float | None = None  # the run's task_accuracy.json figure for this node
    dataset: str = ""
    class_names: list[str] = field(default_factory=list)  # names of `classes`, in logit order
    # how the dataset's loader maps an image file's pixels to the model's input
    preprocessing: dict[str, object] = field(default_factory=dict)
    onnx: OnnxCheck | None = None  # ONNX Runtime on the exported graph (--format onnx)
    # the node's query set, which `accuracy` and the run's figure are computed on
    query_x: Tensor | None = field(default=None, repr=False)  # (N, C, H, W) float32
    query_y: Tensor | None = field(default=None, repr=False)  # (N,) node-local labels
    support_x: Tensor | None = field(default=None, repr=False)  # what the node adapted on

    def metadata(self) -> dict[str, object]:
        return {
            "partition": self.partition,
            "role": self.role,
            "server_round": self.server_round,
            "classes": self.classes,
            "query_accuracy": self.accuracy,
            "flops_ratio": self.flops_ratio,
        }


def adapt_node(
    cfg: DictConfig,
    params: Mapping[str, Tensor],
    partition: int,
    server_round: int,
    reg_weight: float,
    backend: str = "auto",
) -> Export:
    """One ``Adapt`` of node ``partition`` from the meta-initialization ``params``, exactly as
    its ClientApp evaluates it in round ``server_round`` with λ = ``reg_weight``, and the sliced
    model of the result."""
    node = adapt_target_node(cfg, partition_task(cfg, partition), params, server_round, reg_weight)
    task, spec, model, meta_cfg = node.task, node.spec, node.model, node.meta_cfg
    adapted, stats = node.adapted, node.stats
    sliced = sliced_model(spec, adapted, backend=backend, statistics=stats.frozen)

    query_x, query_y = node.query.x, node.query.y
    sliced_preds, dense_preds, ratios, opened_all = [], [], [], []
    max_diff, masks_equal = 0.0, True
    with torch.no_grad():
        for i in range(len(query_y)):
            x = query_x[i : i + 1]
            logits, opened = sliced.forward_with_open(x)
            out = forward(model, adapted, x, GateMode.EVAL, meta_cfg, stats)
            max_diff = max(max_diff, float((logits - out.logits).abs().max()))
            masks = [np.flatnonzero(layer.mask[0].numpy()) for layer in out.trace]
            masks_equal &= all(np.array_equal(a, b) for a, b in zip(masks, opened, strict=True))
            sliced_preds.append(int(logits.argmax()))
            dense_preds.append(int(out.logits.argmax()))
            ratios.append(sliced.flops_ratio(opened))
            opened_all.append([len(o) for o in opened])
        batch = forward(model, adapted, query_x, GateMode.EVAL, meta_cfg)
    labels = query_y.numpy()
    gate_channels = np.array([shape.out_channels for shape in gate_shapes(spec)])
    names = load_dataset(cfg.dataset.name, cfg.dataset.path, cfg.dataset.image_size).class_names
    return Export(
        model=sliced,
        partition=task.partition_id,
        role=task.role,
        server_round=server_round,
        classes=[int(c) for c in task.classes],
        accuracy=float(np.mean(np.asarray(sliced_preds) == labels)),
        masked_dense_accuracy=float(np.mean(np.asarray(dense_preds) == labels)),
        transductive_accuracy=accuracy(batch.logits, query_y),
        max_logit_difference=max_diff,
        masks_equal=masks_equal,
        flops_ratio=float(np.mean(ratios)),
        layer_active=[float(r) for r in np.mean(opened_all, axis=0) / gate_channels],
        query_x=query_x,
        query_y=query_y,
        support_x=node.support.x,
        dataset=str(cfg.dataset.name),
        class_names=[names[c] for c in task.classes],
        preprocessing=pixel_encoding(cfg.dataset.name, spec.in_channels, cfg.dataset.image_size),
    )


def load_run(run_dir: str | Path) -> tuple[DictConfig, dict[str, Tensor], int, float]:
    """A run folder's config, final meta-initialization, the round it was taken after and the
    λ its final evaluation used."""
    run_dir = Path(run_dir)
    for name in (CHECKPOINT_NAME, CONFIG):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(
                f"{run_dir / name} does not exist: give the folder of a run of simulate.py "
                "(it holds config.yaml and checkpoint.pt)"
            )
    try:
        loaded = OmegaConf.load(run_dir / CONFIG)
    except Exception as error:  # a damaged YAML file
        raise ValueError(f"{run_dir / CONFIG} is not readable: {error}") from error
    if not isinstance(loaded, DictConfig):
        raise ValueError(f"{run_dir / CONFIG} is not a run configuration")
    cfg = typed_config(loaded, run_dir / CONFIG)
    state = load_checkpoint(run_dir / CHECKPOINT_NAME)  # refuses code, truncation, foreign files
    try:
        params = {n: t.detach().to(torch.float32) for n, t in state["strategy"]["params"].items()}
        server_round = int(state["round"])
        reg_weight = RegularizerWeight.from_checkpoint(cfg, state)(server_round)
        ran_with = dict(state["config"])
    except Exception as error:
        raise ValueError(
            f"{run_dir / CHECKPOINT_NAME} is not a readable checkpoint of this project: "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from error
    # The node adapts as in the run only under the run's own settings: a config.yaml edited
    # since would give another model and another accuracy.
    changed = changed_settings(ran_with, to_flat(cfg), RUN_ONLY_KEYS | {"federation.rounds"})
    if changed:
        details = ", ".join(f"{k}: {old!r} in the checkpoint, {new!r}" for k, old, new in changed)
        raise ValueError(
            f"{run_dir / CONFIG} differs from the settings the run's checkpoint was written "
            f"with ({details}): restore it (the checkpoint holds the run's own)"
        )
    return cfg, params, server_round, reg_weight


def typed_config(loaded: DictConfig, path: Path) -> DictConfig:
    """The run's settings typed by the schema (enums, not strings), as the run had them."""
    try:
        return settings_from_flat(saved_flat(loaded))
    except (KeyError, ValueError) as error:
        raise ValueError(f"{path} does not fit this version's configuration: {error}") from error


def reported_accuracy(run_dir: Path, partition: int) -> float | None:
    """The run's own final accuracy for node ``partition``, if it recorded one."""
    path = run_dir / TASK_ACCURACY
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get(str(partition))


def save_queries(result: Export, path: str | Path) -> None:
    """Write the node's query set, on which ``result.accuracy`` and the run's reported figure
    are computed, to ``path`` (exactly that name) as an npz: ``x`` (N, C, H, W) float32 images
    ready for the model, ``y`` (N,) int64 node-local labels (logit i is label i), ``classes``
    the global class id of each node-local label."""
    assert result.query_x is not None and result.query_y is not None
    with open(path, "wb") as file:  # np.savez(name) would append ".npz" to another suffix
        np.savez(
            file,
            x=result.query_x.numpy().astype(np.float32, copy=False),
            y=result.query_y.numpy().astype(np.int64, copy=False),
            classes=np.asarray(result.classes, dtype=np.int64),
        )


def query_pixels(result: Export) -> list[np.ndarray]:
    """The node's query images as 8-bit pixels that the dataset's loader
    (``result.preprocessing``) maps exactly to the model's inputs; a ValueError for a run whose
    data have no such form (resized with PyTorch, float npz values)."""
    assert result.query_x is not None
    try:
        return [encode_pixels(x.numpy(), result.preprocessing) for x in result.query_x]
    except DatasetError as error:
        raise ValueError(f"--save-images: {error}") from error


def save_images(result: Export, folder: str | Path, pixels: list[np.ndarray] | None = None) -> None:
    """Write the node's query images into ``folder`` as PNG files ``000.png``, ``001.png``, ...
    (:func:`query_pixels`, unless given), and ``labels.csv``: per file its node-local label,
    global class id and class name."""
    from PIL import Image

    assert result.query_y is not None
    pixels = query_pixels(result) if pixels is None else pixels
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "labels.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["file", "label", "class", "class_name"])
        for i, (image, label) in enumerate(zip(pixels, result.query_y.tolist(), strict=True)):
            Image.fromarray(image).save(folder / f"{i:03d}.png")
            writer.writerow(
                [f"{i:03d}.png", label, result.classes[label], result.class_names[label]]
            )


def onnx_metadata(result: Export, run_dir: Path) -> dict[str, object]:
    """What an ONNX file states besides its graph: the node, its classes and their names, how
    an image file becomes its input, where it came from."""
    return {
        **result.metadata(),
        "class_names": result.class_names,
        "dataset": result.dataset,
        "preprocessing": result.preprocessing,
        "run_dir": str(run_dir.resolve()),
    }


def onnx_graph(result: Export, metadata: dict[str, object]) -> onnx.ModelProto:
    """The node's ONNX graph; a Conv-N node's with the fast path for its expected gates where
    at least :data:`FAST_PATH_SHARE` of its support images open the same channels."""
    from gating.deploy.onnx_export import frequent_masks, onnx_model

    expected = None
    if not result.model.spec.is_resnet and result.support_x is not None:
        masks, share = frequent_masks(result.model, result.support_x)
        metadata = {**metadata, "expected_gates_share": share}  # of the support images
        expected = masks if share >= FAST_PATH_SHARE else None
    return onnx_model(result.model, metadata, expected=expected)


def write_onnx(result: Export, out: str | Path | None, run_dir: Path) -> OnnxCheck:
    """Write the node's ONNX graph to ``out`` (None: build it only) and run it, as read back from
    the file, with ONNX Runtime on every query input against the sliced model."""
    try:
        from gating.deploy.onnx_export import compare, session
    except ImportError as error:
        raise ValueError(
            f"--format onnx needs the onnx and onnxruntime packages ({error}): "
            "pip install -e '.[onnx]'"
        ) from error
    graph = onnx_graph(result, onnx_metadata(result, run_dir))
    if out is not None:
        Path(out).write_bytes(graph.SerializeToString())
    assert result.query_x is not None and result.query_y is not None
    runtime = session(graph if out is None else out)
    check = compare(runtime, result.model, result.query_x)
    gates = next(p.value for p in graph.metadata_props if p.key == "gates")
    return OnnxCheck(
        accuracy=float(np.mean(check.predictions == result.query_y.numpy())),
        max_logit_difference=check.max_logit_difference,
        same_predictions=check.same_predictions,
        same_open=check.same_open,
        gates=gates,
        largest_logit=check.largest_logit,
    )


def export_run(
    run_dir: str | Path,
    partition: int | None,
    out: str | Path | None,
    backend: str = "auto",
    queries: str | Path | None = None,
    force: bool = False,
    fmt: str = "torch",
    images: str | Path | None = None,
) -> Export:
    """Adapt ``partition`` (default: the first target node) of a finished run and, if ``out``
    is given, write its sliced model there (``fmt``: the torch model file, or ``"onnx"``: the
    ONNX graph, checked with ONNX Runtime on the node's queries even without ``out``); if
    ``queries`` is given, the node's query set there (:func:`save_queries`); if ``images``, its
    query images as PNG files into that folder (:func:`save_images`). An existing file (or a
    folder that is not empty) is replaced only with ``force``, and the run's own files never."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    run_dir = Path(run_dir)
    if images is not None and Path(images).exists():
        if not Path(images).is_dir():
            raise ValueError(f"{images} exists and is not a folder: choose another name")
        if any(Path(images).iterdir()) and not force:
            raise ValueError(
                f"{images} is a folder that is not empty: nothing is written over; choose "
                "another name, or pass --force to replace its images"
            )
        if Path(images).resolve() == run_dir.resolve():
            raise ValueError(f"{images} is the run's own folder: choose another name")
    for path in (out, queries):
        if path is not None and Path(path).exists() and not force:
            raise ValueError(
                f"{path} exists: nothing is written over (a run's checkpoint, a model file); "
                "choose another name, or pass --force to replace a file that is not the run's"
            )
        if (
            path is not None
            and Path(path).resolve().parent == run_dir.resolve()
            and (Path(path).name in RUN_FILES)
        ):
            raise ValueError(f"{path} is one of the run's own files: choose another name")
    cfg, params, server_round, reg_weight = load_run(run_dir)
    if not strategy_of(cfg).gated:
        raise ValueError(
            f"the run in {run_dir} is {cfg.strategy.name}, which has no gates: nothing to slice"
        )
    if partition is None:
        partition = int(cfg.federation.train_nodes)
    result = adapt_node(cfg, params, partition, server_round, reg_weight, backend=backend)
    result.reported = reported_accuracy(run_dir, partition)
    pixels = None if images is None else query_pixels(result)  # refused before anything is written
    if fmt == "onnx":
        result.onnx = write_onnx(result, out, run_dir)
    elif out is not None:
        save_model(result.model, out, run_dir=str(run_dir.resolve()), **result.metadata())
    if queries is not None:
        save_queries(result, queries)
    if images is not None:
        save_images(result, images, pixels)
    return result


def format_report(result: Export) -> str:
    spec = result.model.spec
    norm = "frozen support statistics" if result.model.statistics is not None else "its own"
    reported = "-" if result.reported is None else f"{result.reported:.4f}"
    check = result.onnx
    lines = [
        f"partition {result.partition} ({result.role} node), adapted from the round "
        f"{result.server_round} meta-initialization; classes {result.classes}",
        f"backend {result.model.backend}; norm statistics: {norm}; flops_ratio "
        f"{result.flops_ratio:.3f} (MACs, gates included); open channels per gate "
        + ", ".join(f"{r:.2f}" for r in result.layer_active),
        "",
        "| query accuracy | value |",
        "| --- | --- |",
        f"| exported sliced model, one image at a time | {result.accuracy:.4f} |",
        f"| masked dense network (GateMode.EVAL), one image at a time | "
        f"{result.masked_dense_accuracy:.4f} |",
        *(
            [f"| ONNX Runtime on the exported graph, one image at a time | {check.accuracy:.4f} |"]
            if check is not None
            else []
        ),
        f"| the run's reported accuracy for this node (task_accuracy.json) | {reported} |",
        f"| transductive: norm statistics of the whole query batch | "
        f"{result.transductive_accuracy:.4f} |",
        "",
        f"sliced vs masked dense, batch 1: max |logit difference| "
        f"{result.max_logit_difference:.2e}, same open channels: {result.masks_equal}",
        f"model: {spec.describe()}, {spec.image_size}x{spec.image_size}x"
        f"{spec.in_channels}, {spec.num_classes} classes",
    ]
    if check is not None:
        same_open = "-" if check.same_open is None else str(check.same_open)
        lines.append(
            f"ONNX Runtime vs sliced, batch 1: max |logit difference| "
            f"{check.max_logit_difference:.2e}, same prediction for every query: "
            f"{check.same_predictions}, same open channels: {same_open}; gates in the graph: "
            f"{check.gates}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.export",
        description="Adapt one node of a finished run and export its sliced gated model.",
    )
    parser.add_argument("run_dir", type=Path, help="a run folder (config.yaml, checkpoint.pt)")
    parser.add_argument(
        "--partition", type=int, default=None, help="the node (default: the first target node)"
    )
    parser.add_argument("--out", type=Path, default=None, help="where to write the model file")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="torch",
        help="torch: the sliced model file gating.deploy.load_model reads; onnx: an ONNX graph "
        "with the gates inside, for ONNX Runtime without PyTorch (docs/edge.md)",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument(
        "--save-queries",
        type=Path,
        default=None,
        metavar="FILE.npz",
        help="also write the node's query images (x), node-local labels (y) and their global "
        "class ids (classes): the set the accuracies are computed on",
    )
    parser.add_argument(
        "--save-images",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write the node's query images as PNG files DIR/000.png, ... (exactly the "
        "model's inputs through the dataset's loader) and DIR/labels.csv",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --out or --save-queries file, or the images in --save-images",
    )
    args = parser.parse_args(argv)
    try:
        result = export_run(
            args.run_dir,
            args.partition,
            args.out,
            args.backend,
            queries=args.save_queries,
            force=args.force,
            fmt=args.format,
            images=args.save_images,
        )
    except (FileNotFoundError, ValueError, RunFolderError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.out is not None:
        print(f"wrote {args.out}")
    if args.save_queries is not None:
        print(
            f"wrote {args.save_queries} ({len(result.classes)}-way, {len(result.query_x)} queries)"
        )
    if args.save_images is not None:
        print(f"wrote {len(result.query_x)} images and labels.csv into {args.save_images}")
    if result.reported is None:
        print(
            f"note: the run has no accuracy of its own for partition {result.partition} "
            f"(a {result.role} node; runs evaluate their target nodes): reported=nan"
        )
    reported = "nan" if result.reported is None else f"{result.reported:.6f}"
    accuracy = result.accuracy if result.onnx is None else result.onnx.accuracy
    print(f"RESULT accuracy={accuracy:.6f} reported={reported}")
    if result.accuracy != result.masked_dense_accuracy or not result.masks_equal:
        print("error: the sliced model disagrees with the masked dense network", file=sys.stderr)
        return 1
    if result.onnx is not None and not result.onnx.agrees:
        print("error: ONNX Runtime disagrees with the sliced model", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
