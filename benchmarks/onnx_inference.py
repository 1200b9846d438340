"""ONNX Runtime at the edge: batch-1 latency of a node's exported ONNX graph, its gates in the
graph, against the same network with every channel, next to the C engine and the PyTorch paths;
and ONNX Runtime's int8 quantization on top of the gates.

    python benchmarks/onnx_inference.py                        # meta-trains a quick model here (A)
    python benchmarks/onnx_inference.py --run-dir RUN [--nodes 4]   # a finished run (B)

(A) meta-trains MetaGater in-process on Fashion-MNIST 5-way 5-shot tasks, as
benchmarks/gated_inference.py does (first order, target ratio 0.5, ``--steps``); (B) takes the
meta-initialization of a finished ``python simulate.py dataset=fashion_mnist ...`` run. Each of
``--nodes`` target nodes runs its one ``Adapt`` exactly as its ClientApp does
(``analysis.export.adapt_node``) and is exported with ``gating.deploy.onnx_export``; the measured
inputs are those nodes' query images.

Variants (one thread each: ONNX Runtime with ``intra_op_num_threads=1``, ``inter_op`` 1; torch
with ``set_num_threads(1)``; the C engine is single-threaded), timed interleaved within three
groups (each input runs every variant of its group back to back in a rotating order; medians):
  ort_gated      the exported graph (``analysis.export.onnx_graph``), the product: gates in the
                 graph, open channels only, and where the node's support images mostly open
                 the same channels the fast path: their constant-weight network, checked
  ort_general    the same without the fast path: every conv's weights chosen per input
  ort_dense      the same network, every channel, no gate, ONNX Runtime's full optimizations
  ort_dense_ext  the same, ORT_ENABLE_EXTENDED: no NCHWc layout, whose kernels need constant
                 weights (the kernels a graph whose weights depend on the input gets)
  ort_static     the narrower network of each node's most frequent open channels, as constant
                 weights (what a static mask of the same channels gets)
  c_sliced / c_dense   the C++ engine of gating/deploy (SlicedGatedNet, native backend)
  torch_sliced   the same sliced algorithm in PyTorch ops; torch_compile: torch.compile of it
speedup = ort_dense / ort_gated; flops_ratio = realized MACs (gates included) / dense MACs over
the measured inputs; efficiency = speedup * flops_ratio (1: latency falls as the MACs; target
>= 0.7). Then int8: ``onnxruntime.quantization`` on the gated graph (and the dense one for
contrast), calibrated on the nodes' support images, its accuracy against the float graph's on
the same query images. The last line is ``RESULT key=value ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime
import torch
from gated_inference import (
    adapted_nodes,
    add_model_arguments,
    fixed_share_network,
    latency_table,
    time_interleaved,
)
from host import describe_host  # benchmarks/ is on sys.path: the script's folder

from analysis.export import Export, onnx_graph
from gating.deploy import SlicedGatedNet, native_available, sliced_model
from gating.deploy.onnx_export import (
    INPUT,
    OUTPUT,
    compare,
    most_frequent,
    onnx_model,
    read_metadata,
)
from gating.model import ModelSpec

ORT_NAMES = ["ort_gated", "ort_general", "ort_dense", "ort_dense_ext", "ort_static"]
C_NAMES = ["c_sliced", "c_dense"]
TORCH_NAMES = ["torch_sliced", "torch_compile"]


def ort_session(graph: onnx.ModelProto, extended: bool = False) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    if extended:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    data = graph.SerializeToString()
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def ort_call(runtime: onnxruntime.InferenceSession) -> Callable[[torch.Tensor], object]:
    return lambda x: runtime.run([OUTPUT], {INPUT: x.numpy()})


def static_at(model: SlicedGatedNet, masks: list[np.ndarray]) -> SlicedGatedNet:
    """The same network with gates that open ``masks`` whatever the input (zero gate weights):
    its ONNX graph is the narrower network with constant weights."""
    params = dict(model.params)
    for i, opened in enumerate(masks):
        bias = torch.full_like(params[f"gate.{i}.fc2.bias"], -1.0)
        bias[torch.as_tensor(opened, dtype=torch.long)] = 1.0
        params[f"gate.{i}.fc1.weight"] = torch.zeros_like(params[f"gate.{i}.fc1.weight"])
        params[f"gate.{i}.fc2.weight"] = torch.zeros_like(params[f"gate.{i}.fc2.weight"])
        params[f"gate.{i}.fc2.bias"] = bias
    return sliced_model(model.spec, params, backend="torch", statistics=model.statistics)


@dataclasses.dataclass
class Node:
    export: Export
    graph: onnx.ModelProto
    general: onnx.ModelProto
    dense: onnx.ModelProto
    static: onnx.ModelProto
    support: np.ndarray  # (N, C, H, W): calibration images for int8
    inputs: list[torch.Tensor]
    opened: list[list[np.ndarray]]
    static_hits: int  # query inputs whose open channels are the most frequent ones


def build_node(export: Export, cfg) -> Node:
    model = export.model
    assert export.query_x is not None
    inputs = [export.query_x[i : i + 1].contiguous() for i in range(len(export.query_x))]
    opened = [model.forward_with_open(x)[1] for x in inputs]
    frequent, share = most_frequent(opened)
    hits = round(share * len(opened))
    assert export.support_x is not None
    return Node(
        export=export,
        graph=onnx_graph(export, {}),
        general=onnx_model(model),
        dense=onnx_model(model, dense=True),
        static=onnx_model(static_at(model, frequent)),
        support=export.support_x.numpy(),
        inputs=inputs,
        opened=opened,
        static_hits=hits,
    )


def compiled_sliced(model: SlicedGatedNet, probe: torch.Tensor) -> tuple[Callable | None, str]:
    """torch.compile of the sliced PyTorch path (dynamic shapes: the open counts change per
    input), or None and the error."""
    started = time.perf_counter()
    try:
        fn = torch.compile(model.forward, dynamic=True)
        with torch.inference_mode():
            out = fn(probe)
        diff = float((out - model.forward(probe)).abs().max())
    except Exception as error:  # report what torch.compile says, measure the rest
        return None, f"torch.compile failed: {type(error).__name__}: {str(error).splitlines()[0]}"
    seconds = time.perf_counter() - started
    return fn, f"torch.compile: first call {seconds:.0f} s, max |dlogit| vs eager {diff:.1e}"


def int8_rows(nodes: list[Node], log: Callable[[str], None]) -> tuple[list[str], dict]:
    """ONNX Runtime's quantization of each node's gated and dense graphs: accuracy on the
    node's query images against the float graph, latency. Returns the table and figures."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    class Support(CalibrationDataReader):
        def __init__(self, images: np.ndarray) -> None:
            self.items = iter([{INPUT: images[i : i + 1]} for i in range(len(images))])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    methods: dict[str, Callable[[str, str, Node], None]] = {
        "static QDQ (int8 weights, uint8 activations)": lambda src, dst, node: quantize_static(
            src, dst, Support(node.support), quant_format=QuantFormat.QDQ
        ),
        "static QOperator": lambda src, dst, node: quantize_static(
            src, dst, Support(node.support), quant_format=QuantFormat.QOperator
        ),
        "dynamic (int8 weights)": lambda src, dst, node: quantize_dynamic(
            src, dst, weight_type=QuantType.QInt8
        ),
    }
    lines = [
        "| graph | quantization | float acc | int8 acc | int8 = float predictions | float us "
        "| int8 us |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        for kind in ("gated", "dense"):
            for method, quantize in methods.items():
                acc_f, acc_q, same, us_f, us_q, errors = [], [], [], [], [], []
                for n, node in enumerate(nodes):
                    src, dst = f"{folder}/{kind}{n}.onnx", f"{folder}/{kind}{n}_q.onnx"
                    onnx.save(node.graph if kind == "gated" else node.dense, src)
                    try:
                        with contextlib.redirect_stdout(io.StringIO()):  # the tool prints protos
                            quantize(src, dst, node)
                        quantized = ort_session(onnx.load(dst))
                    except Exception as error:
                        errors.append(f"{type(error).__name__}: {str(error).splitlines()[0]}")
                        continue
                    runtime = ort_session(onnx.load(src))
                    labels = node.export.query_y.numpy()
                    pred_f = predictions(runtime, node.inputs)
                    pred_q = predictions(quantized, node.inputs)
                    acc_f.append(float(np.mean(pred_f == labels)))
                    acc_q.append(float(np.mean(pred_q == labels)))
                    same.append(float(np.mean(pred_f == pred_q)))
                    times = time_interleaved(
                        [(ort_call(runtime), ort_call(quantized))] * len(node.inputs),
                        ["float", "int8"],
                        node.inputs,
                        2,
                        0,
                    )
                    us_f.append(statistics.median(times["float"]))
                    us_q.append(statistics.median(times["int8"]))
                if errors:
                    lines.append(f"| {kind} | {method} | - | refused: {errors[0][:120]} | | | |")
                    continue
                lines.append(
                    f"| {kind} | {method} | {np.mean(acc_f):.4f} | {np.mean(acc_q):.4f} | "
                    f"{np.mean(same):.3f} | {np.mean(us_f):.1f} | {np.mean(us_q):.1f} |"
                )
                if method.startswith("static QDQ"):
                    figures[f"int8_{kind}_acc"] = float(np.mean(acc_q))
                    figures[f"float_{kind}_acc"] = float(np.mean(acc_f))
                    figures[f"int8_{kind}_us"] = float(np.mean(us_q))
    log(f"(int8 measured on {len(nodes)} node(s), 2 passes each)")
    return lines, figures


def predictions(runtime: onnxruntime.InferenceSession, inputs: list[torch.Tensor]) -> np.ndarray:
    return np.array([int(runtime.run([OUTPUT], {INPUT: x.numpy()})[0].argmax()) for x in inputs])


def synthetic(spec: ModelSpec, ratios: list[float], inputs: list[torch.Tensor], reps: int):
    """A random width-``spec.width`` network whose gates open the trained per-layer shares of
    channels, kept conditional (tiny fc2 weights): ORT gated and dense, and the C engine."""
    net = fixed_share_network(spec, ratios, gate_weight=1e-6)  # decided in the graph
    params = {n: p.detach() for n, p in net.named_parameters()}
    support = torch.rand(10, spec.in_channels, spec.image_size, spec.image_size)
    with torch.no_grad():
        trace = net(support, mode="eval").trace
    stats = [(layer.mean.flatten(), layer.var.flatten()) for layer in trace]
    native = SlicedGatedNet(spec, params, backend="native", statistics=stats)
    ratio = float(np.mean([native.flops_ratio(native.forward_with_open(x)[1]) for x in inputs]))
    gated, dense = ort_session(onnx_model(native)), ort_session(onnx_model(native, dense=True))
    fns = (ort_call(gated), ort_call(dense))
    times = time_interleaved([fns] * len(inputs), ["ort_gated", "ort_dense"], inputs, reps, 0)
    c_times = time_interleaved(
        [(native.forward, native.forward_dense)] * len(inputs),
        ["c_sliced", "c_dense"],
        inputs,
        reps,
        0,
    )
    med = {n: statistics.median(t) for n, t in {**times, **c_times}.items()}
    return ratio, med


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--widths", default="64,128", help="widths for the synthetic table")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 table")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, flush=True)

    ok, reason = native_available()
    if not ok:
        print(f"error: the C engine is unavailable ({reason}); nothing to compare", file=sys.stderr)
        return 2
    started = time.perf_counter()
    torch.set_num_threads(1)
    cfg, exports = adapted_nodes(args, log)
    nodes = [build_node(e, cfg) for e in exports]
    spec = exports[0].model.spec
    log(f"machine: {describe_host()}, onnxruntime {onnxruntime.__version__}")

    # -- exactness on the measured inputs: ONNX Runtime against the sliced model
    exact_lines, exact = [], True
    for node in nodes:
        check = compare(ort_session(node.graph), node.export.model, node.export.query_x)
        accuracy = float(np.mean(check.predictions == node.export.query_y.numpy()))
        exact &= check.same_predictions and bool(check.same_open)
        exact &= accuracy == node.export.accuracy and check.max_logit_difference <= 1e-4
        exact_lines.append(
            f"node {node.export.partition}: ONNX Runtime accuracy {accuracy:.4f} = sliced "
            f"{node.export.accuracy:.4f}; same predictions {check.same_predictions}, same open "
            f"channels {check.same_open}, max |dlogit| {check.max_logit_difference:.1e}; "
            f"most frequent masks on {node.static_hits}/{len(node.inputs)} inputs"
        )

    # -- latency: the three groups, each interleaved within itself
    jobs: dict[str, list[tuple[Callable, ...]]] = {"ort": [], "c": [], "torch": []}
    inputs, ratios, opened_share = [], [], []
    compile_note = "torch.compile: skipped (--no-compile)"
    for node in nodes:
        model = node.export.model
        torch_model = SlicedGatedNet(
            model.spec, model.params, backend="torch", statistics=model.statistics
        )
        compiled = None
        if not args.no_compile:
            compiled, compile_note = compiled_sliced(torch_model, node.inputs[0])
        ort_fns = tuple(
            ort_call(ort_session(g, extended=ext))
            for g, ext in (
                (node.graph, False),
                (node.general, False),
                (node.dense, False),
                (node.dense, True),
                (node.static, False),
            )
        )
        for x, op in zip(node.inputs, node.opened, strict=True):
            jobs["ort"].append(ort_fns)
            jobs["c"].append((model.forward, model.forward_dense))
            jobs["torch"].append((torch_model.forward, compiled or torch_model.forward))
            inputs.append(x)
            ratios.append(model.flops_ratio(op))
            opened_share.append([len(o) / spec.width for o in op])
    times: dict[str, list[float]] = {}
    for group, names in (("ort", ORT_NAMES), ("c", C_NAMES), ("torch", TORCH_NAMES)):
        times.update(time_interleaved(jobs[group], names, inputs, args.reps, args.seed))
    if "failed" in compile_note or args.no_compile:
        del times["torch_compile"]
    names = [n for n in ORT_NAMES + C_NAMES + TORCH_NAMES if n in times]
    med = {n: statistics.median(times[n]) for n in names}
    flops_ratio = float(np.mean(ratios))
    speedup = med["ort_dense"] / med["ort_gated"]
    efficiency = speedup * flops_ratio

    log("")
    log(
        f"## Batch-1 latency, Conv-{spec.depth} width {spec.width} {spec.image_size}x"
        f"{spec.image_size}, {len(inputs)} query inputs x {args.reps} reps (median us, one core)"
    )
    log("")
    for line in latency_table(times, names, "ort_dense"):
        log(line)
    log("")
    log(
        f"realized flops_ratio {flops_ratio:.3f} (MACs incl. gates); open channels per layer: "
        + ", ".join(f"{r:.2f}" for r in np.mean(opened_share, axis=0))
    )
    log(
        f"ONNX Runtime: speedup dense/gated {speedup:.3f}, efficiency {efficiency:.3f} "
        f"(target >= 0.7); without NCHWc: dense_ext/gated "
        f"{med['ort_dense_ext'] / med['ort_gated']:.3f}"
        f"; static narrower network: dense/static {med['ort_dense'] / med['ort_static']:.3f} "
        f"(efficiency {med['ort_dense'] / med['ort_static'] * flops_ratio:.3f})"
        f"; without the fast path: dense/general {med['ort_dense'] / med['ort_general']:.3f} "
        f"(efficiency {med['ort_dense'] / med['ort_general'] * flops_ratio:.3f})"
    )
    fast = [read_metadata(n.graph)["gates"] != "conditional" for n in nodes]
    log(
        "fast path in "
        + ", ".join(
            f"node {n.export.partition} ({read_metadata(n.graph).get('expected_gates_share')} "
            f"of its support images{'' if f else ': below the threshold, none'})"
            for n, f in zip(nodes, fast, strict=True)
        )
    )
    log(
        f"C engine: dense/sliced {med['c_dense'] / med['c_sliced']:.3f}, efficiency "
        f"{med['c_dense'] / med['c_sliced'] * flops_ratio:.3f}; ort_gated / c_sliced "
        f"{med['ort_gated'] / med['c_sliced']:.2f}"
    )
    log(compile_note)
    for line in exact_lines:
        log(line)

    synthetic_figures = []
    widths = [int(w) for w in args.widths.split(",") if w.strip()]
    if widths:
        log("")
        log(
            "## Other widths: random weights, gates decided in the graph, opening the trained "
            "per-layer shares (synthetic; cost structure only)"
        )
        log("")
        log(
            "| width | flops_ratio | ort dense us | ort gated us | ort speedup | ort efficiency "
            "| c dense us | c sliced us | c efficiency |"
        )
        log("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        probe = inputs[: min(len(inputs), 60)]
        for width in widths:
            wspec = dataclasses.replace(spec, width=width)
            ratio, wm = synthetic(wspec, list(np.mean(opened_share, axis=0)), probe, args.reps)
            s, c = wm["ort_dense"] / wm["ort_gated"], wm["c_dense"] / wm["c_sliced"]
            synthetic_figures.append(f"eff_w{width}={s * ratio:.3f}")
            log(
                f"| {width} | {ratio:.3f} | {wm['ort_dense']:.1f} | {wm['ort_gated']:.1f} | "
                f"{s:.2f} | {s * ratio:.2f} | {wm['c_dense']:.1f} | {wm['c_sliced']:.1f} | "
                f"{c * ratio:.2f} |"
            )

    int8 = {}
    if not args.no_int8:
        log("")
        log("## int8: ONNX Runtime's quantization, calibrated on each node's support images")
        log("")
        lines, int8 = int8_rows(nodes, log)
        for line in lines:
            log(line)
    log("")
    log(f"total {time.perf_counter() - started:.0f}s")
    figures = [
        f"speedup={speedup:.3f}",
        f"flops_ratio={flops_ratio:.3f}",
        f"efficiency={efficiency:.3f}",
        *(f"{n}_us={med.get(n, float('nan')):.1f}" for n in ORT_NAMES + C_NAMES + TORCH_NAMES),
        f"exact={exact}",
        *synthetic_figures,
        *(f"{k}={v:.4f}" for k, v in int8.items()),
    ]
    print("RESULT " + " ".join(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
