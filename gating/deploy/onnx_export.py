"""An adapted node's network as an ONNX graph, its gates inside: runs on ONNX Runtime alone.

ONNX is the edge's common format (ONNX Runtime on Linux, Android, iOS and in the browser), so
a node that has neither PyTorch nor this project can run what ``analysis.export`` adapts for
it. The graph is the sliced network of :mod:`gating.deploy.sliced` (Conv-N) and
:mod:`gating.deploy.sliced_resnet` (the gated ResNets), written with ``onnx.helper``:

- **Gates in the graph.** For each input the graph evaluates every gate (global average pool of
  the layer input's open channels, the gate MLP on the matching fc1 rows, open where the logit
  is > 0: ``Greater``, a boolean mask) and keeps the conv weight rows of the open output
  channels and the columns of the open input channels (``Compress`` by the masks), so each conv
  computes only open channels, as the sliced engines do; a ResNet block's residual path (last
  conv, shortcut, sum) runs whole. Each gate's mask is also a graph output (``open.<gate>``).
- **Static gates become the narrower network.** A gate whose decision cannot depend on the input
  (zero fc1 weights, as a static mask becomes through
  :func:`gating.deploy.factory.as_conditional`; or zero fc2 weights) is decided at export: its
  channels are sliced out of the weights, and a network of such gates is a plain, narrower
  network with no gate left in it.
- **Frozen norm statistics folded in.** A ``metabn`` node's norm with its frozen support
  statistics is the per-channel affine map ``y * scale + shift`` (:func:`norm_affine`,
  :func:`resnet_norm_affine`); ``scale`` multiplies the conv weights and ``shift`` is the
  conv's bias. Each input's own statistics (``model.norm=batch``) are not exported.
- **Empty layers.** A Conv-N layer with no open channel still gives the sliced engines' logits:
  a conv with no input channel outputs its bias (the frozen shift), and the 2x2 max-pool, which
  ONNX Runtime refuses on zero channels, pools the channels as the batch axis (``Reshape``
  (1, n, H, W) -> (n, 1, H, W), where zero is allowed).

Speed. ONNX Runtime's fastest CPU convolutions (its NCHWc layout) need weights known when the
session starts; weights chosen per input run on its general im2col-and-GEMM path instead, which
at Conv-4 28x28 costs more than the gates save. Hence constant-weight layers padded to whole
NCHWc blocks, and for Conv-N the fast path for the gates a node expects (``expected``): the
constant-weight network of those channels, checked per input, the general graph under an ``If``
where a gate disagrees (BENCHMARKS.md, "ONNX Runtime at the edge").

The file states, in its ``metadata_props``, the opset, the input's name, shape and type, the
node's classes (global ids in logit order) and whatever the exporter adds (the preprocessing of
image files, the node's accuracy, ...). :func:`compare` checks a graph against the sliced model on
given inputs.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor

from conf.choices import ModelArch
from gating.deploy.factory import SlicedModel
from gating.deploy.sliced import norm_affine
from gating.deploy.sliced_resnet import resnet_norm_affine
from gating.model import ModelSpec
from gating.model.layout import has_projection, resnet_blocks
from gating.model.resnet import conv_norm_names

if TYPE_CHECKING:
    import onnxruntime

#: ONNX opset 17 (ONNX Runtime 1.13 and later) and the IR version it needs (8: older readers too).
OPSET = 17
IR_VERSION = 8
FORMAT = "metagater-onnx/1"
INPUT = "image"
OUTPUT = "logits"

#: A layer's open channels: known at export (their indices) or decided per input in the graph (the
#: name of its boolean mask over the channels).
Index = np.ndarray | str


class _Graph:
    """Nodes, constants and outputs of one graph, with unique tensor names (each starting with
    ``prefix``: a subgraph's names must not shadow its parent's)."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[onnx.TensorProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.conditional = False  # some gate decides per input
        self._names: set[str] = {INPUT}
        self._small: dict[tuple, str] = {}

    def _fresh(self, hint: str) -> str:
        hint = self.prefix + hint
        name, n = hint, 1
        while name in self._names:
            n += 1
            name = f"{hint}_{n}"
        self._names.add(name)
        return name

    def const(self, value: np.ndarray | Sequence[int], hint: str) -> str:
        array = np.asarray(value)
        if array.dtype != np.bool_:
            array = array.astype(np.float32 if array.dtype.kind == "f" else np.int64, copy=False)
        key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 8 else None
        if key in self._small:  # one copy of each small constant (shapes, zero)
            return self._small[key]
        name = self._fresh(hint)
        self.constants.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        if key is not None:
            self._small[key] = name
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        name = out if out is not None else self._fresh(f"{op_type.lower()}")
        if out is not None:
            self._names.add(out)
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], **attrs))
        return name

    def split(self, x: str, sizes: Sequence[int], hint: str) -> list[str]:
        names = [self._fresh(f"{hint}.{k}") for k in range(len(sizes))]
        self.nodes.append(helper.make_node("Split", [x, self.const(sizes, "sizes")], names, axis=0))
        return names

    def select(self, array: np.ndarray, hint: str, by_axis: Mapping[int, Index]) -> str:
        """``array`` restricted to the open channels along each given axis: channels known at
        export are sliced here, those decided per input by ``Compress`` with their mask."""
        values = np.asarray(array, dtype=np.float32)
        for axis, index in by_axis.items():
            if not isinstance(index, str) and len(index) != values.shape[axis]:
                values = np.take(values, index, axis=axis)
        name = self.const(values, hint)
        for axis, index in by_axis.items():
            if isinstance(index, str):
                name = self.op("Compress", name, index, axis=axis)
        return name

    def output(self, name: str, dtype: int, shape: Sequence[int | str]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))

    def graph(self, name: str, inputs: Sequence[onnx.ValueInfoProto] = ()) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, name, list(inputs), self.outputs, self.constants)


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).numpy()


def _gate(
    g: _Graph,
    x: str,
    in_set: Index,
    p: Mapping[str, Tensor],
    gate: str,
    groups: Sequence[int],
    name: str,
) -> list[Index]:
    """The open channels of each column group of gate ``gate`` for layer input ``x`` (whose
    channels are ``in_set``): constant indices when the decision cannot depend on the input,
    else boolean masks computed in the graph. The graph output ``name`` is the gate's whole
    boolean decision (True: open), for every input."""
    w1t, b1 = _numpy(p[f"{gate}.fc1.weight"]).T, _numpy(p[f"{gate}.fc1.bias"])
    w2t, b2 = _numpy(p[f"{gate}.fc2.weight"]).T, _numpy(p[f"{gate}.fc2.bias"])
    starts = np.cumsum([0, *groups])
    g.output(name, TensorProto.BOOL, [int(starts[-1])])
    if not w2t.any() or (not isinstance(in_set, str) and not w1t[in_set].any()):
        # logit = fc2(relu(fc1 bias)) for every input, in torch's order (addmm), in float32
        hidden = torch.from_numpy(np.maximum(b1, 0)[None])
        logits = torch.addmm(torch.from_numpy(b2), hidden, torch.from_numpy(w2t))[0].numpy()
        g.op("Identity", g.const(logits > 0, f"{name}.constant"), out=name)
        return [np.flatnonzero(logits[a:b] > 0) for a, b in itertools.pairwise(starts)]
    g.conditional = True
    gap = g.op("ReduceMean", x, axes=[2, 3], keepdims=0)  # (1, open input channels)
    w1 = g.select(w1t, f"{gate}.fc1.weight_t", {0: in_set})
    hidden = g.op("Relu", g.op("Gemm", gap, w1, g.const(b1, f"{gate}.fc1.bias")))
    logits = g.op("MatMul", hidden, g.const(w2t, f"{gate}.fc2.weight_t"))
    # open where logit + b2 > 0, that is where logit > -b2 (the same test in floating point)
    opened = g.op("Greater", logits, g.const(-b2[None], f"{gate}.fc2.bias_negated"))
    opened = g.op("Reshape", opened, g.const([-1], "flat"), out=name)
    if len(groups) == 1:
        return [opened]
    return list(g.split(opened, groups, name))


def _conv(
    g: _Graph,
    x: str,
    weight: Tensor,
    affine: tuple[Tensor, Tensor],
    out_set: Index,
    in_set: Index,
    stride: int,
    hint: str,
) -> str:
    """conv -> frozen norm of input ``x`` (channels ``in_set``) for output channels
    ``out_set``: the norm's scale folded into the weights, its shift the conv's bias."""
    scale, shift = (_numpy(t) for t in affine)
    folded = _numpy(weight) * scale[:, None, None, None]
    w = g.select(folded, f"{hint}.weight", {0: out_set, 1: in_set})
    b = g.select(shift, f"{hint}.bias", {0: out_set})
    k = weight.shape[-1]
    return g.op("Conv", x, w, b, kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride] * 2)


def _pool(g: _Graph, x: str, side: int, maybe_empty: bool) -> str:
    """2x2 max-pool, ceil mode; channels as the batch axis where there may be none."""
    if not maybe_empty:
        return g.op("MaxPool", x, kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
    out = -(-side // 2)
    x = g.op("Reshape", x, g.const([-1, 1, side, side], "as_batch"))
    x = g.op("MaxPool", x, kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
    return g.op("Reshape", x, g.const([1, -1, out, out], "as_channels"))


def _conv_net(
    g: _Graph, spec: ModelSpec, p: Mapping[str, Tensor], affine, dense: bool
) -> list[Index]:
    """The general Conv-N graph (gates decided per input where they can be); returns each
    layer's open channels."""
    x, in_set = INPUT, np.arange(spec.in_channels)
    sides = spec.layer_sizes()
    opened: list[Index] = []
    for i in range(spec.depth):
        if dense:
            out_set: Index = np.arange(spec.width)
        else:
            name = f"{g.prefix}open.{i}"
            out_set = _gate(g, x, in_set, p, f"gate.{i}", [spec.width], name)[0]
        opened.append(out_set)
        conv = f"backbone.blocks.{i}.conv"
        y = _conv(g, x, p[f"{conv}.weight"], affine[i], out_set, in_set, 1, conv)
        maybe_empty = isinstance(out_set, str) or len(out_set) == 0
        x = _pool(g, g.op("Relu", y), sides[i], maybe_empty)
        in_set = out_set
    # the head's weights per last-layer channel: (C, S, classes), S = positions of its map
    spatial = sides[-1] ** 2
    head = _numpy(p["backbone.head.weight"]).reshape(spec.num_classes, spec.width, spatial)
    rows = g.select(head.transpose(1, 2, 0), "backbone.head.weight_t", {0: in_set})
    rows = g.op("Reshape", rows, g.const([-1, spec.num_classes], "head_rows"))
    flat = g.op("Reshape", x, g.const([1, -1], "features"))
    logits = g.op("MatMul", flat, rows)
    bias = g.const(_numpy(p["backbone.head.bias"]), "head.bias")
    g.op("Add", logits, bias, out=g.prefix + OUTPUT)
    return opened


#: ONNX Runtime's NCHWc channel block on AVX-512 (AVX2's 8 divides it). Its fast convolutions
#: take an input of fewer channels than a block or a whole number of blocks, and its max-pool a
#: whole number: a constant-weight layer is padded up to one with zero channels (exact: a zero
#: channel stays zero through ReLU and pooling and meets zero weights in the next layer).
BLOCK = 16


def _padded(channels: int, width: int) -> int:
    """Whole blocks, where the layer's full width is some (a narrower width is left as is); at
    least one channel (a layer with none open: one zero channel, ONNX has no empty conv)."""
    return max(BLOCK, -(-channels // BLOCK) * BLOCK) if width % BLOCK == 0 else max(channels, 1)


def _open_mask(width: int, channels: np.ndarray) -> np.ndarray:
    """A gate's boolean decision over its ``width`` channels, ``channels`` open."""
    mask = np.zeros(width, np.bool_)
    mask[channels] = True
    return mask


def _static_conv_net(
    g: _Graph,
    spec: ModelSpec,
    p: Mapping[str, Tensor],
    affine,
    opened: Sequence[np.ndarray],
    pools: list[tuple[str, np.ndarray, int]] | None = None,
) -> str:
    """Conv-N with each layer's open channels ``opened`` fixed: constant weights, each layer
    padded to whole NCHWc blocks. Returns the logits; with ``pools``, appends per layer the
    global average pool of its input with that input's channels and padded count."""
    x, in_set, in_count = INPUT, np.arange(spec.in_channels), spec.in_channels
    for i, out_set in enumerate(opened):
        if pools is not None:
            pools.append((g.op("GlobalAveragePool", x), in_set, in_count))
        conv = f"backbone.blocks.{i}.conv"
        scale, shift = (_numpy(t) for t in affine[i])
        folded = _numpy(p[f"{conv}.weight"]) * scale[:, None, None, None]
        out_count, k = _padded(len(out_set), spec.width), folded.shape[-1]
        weight = np.zeros((out_count, in_count, k, k), np.float32)
        weight[: len(out_set), : len(in_set)] = folded[out_set][:, in_set]
        bias = np.zeros(out_count, np.float32)
        bias[: len(out_set)] = shift[out_set]
        y = g.op(
            "Conv",
            x,
            g.const(weight, f"{conv}.weight"),
            g.const(bias, f"{conv}.bias"),
            kernel_shape=[k, k],
            pads=[k // 2] * 4,
        )
        x = g.op("MaxPool", g.op("Relu", y), kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
        in_set, in_count = out_set, out_count
    spatial = spec.layer_sizes()[-1] ** 2
    head = _numpy(p["backbone.head.weight"]).reshape(spec.num_classes, spec.width, spatial)
    rows = np.zeros((in_count, spatial, spec.num_classes), np.float32)
    rows[: len(in_set)] = head.transpose(1, 2, 0)[in_set]
    flat = g.op("Reshape", x, g.const([1, -1], "features"))
    logits = g.op("MatMul", flat, g.const(rows.reshape(-1, spec.num_classes), "head.rows"))
    return g.op("Add", logits, g.const(_numpy(p["backbone.head.bias"]), "head.bias"))


def _all_gates_as_expected(
    g: _Graph,
    spec: ModelSpec,
    p: Mapping[str, Tensor],
    pools: Sequence[tuple[str, np.ndarray, int]],
    expected: Sequence[np.ndarray],
) -> str:
    """Whether every gate, fed the static network's own layer inputs, opens exactly the
    ``expected`` channels: all gates in two block-diagonal matrix products, each logit signed
    (+ where the channel should open, - where not), then min > 0. By induction over the layers
    the static network then computed what the gated one would (a logit of exactly 0 counts as
    unexpected: the general graph decides it)."""
    hidden = spec.gate_hidden
    fc1 = np.zeros((sum(count for _, _, count in pools), hidden * len(pools)), np.float32)
    fc2 = np.zeros((hidden * len(pools), spec.width * len(pools)), np.float32)
    b1, b2, row = [], [], 0
    for i, ((_, in_set, count), opened) in enumerate(zip(pools, expected, strict=True)):
        gate, cols = f"gate.{i}", slice(i * hidden, (i + 1) * hidden)
        fc1[row : row + len(in_set), cols] = _numpy(p[f"{gate}.fc1.weight"]).T[in_set]
        sign = -np.ones(spec.width, np.float32)
        sign[opened] = 1.0
        fc2[cols, i * spec.width : (i + 1) * spec.width] = _numpy(p[f"{gate}.fc2.weight"]).T * sign
        b1.append(_numpy(p[f"{gate}.fc1.bias"]))
        b2.append(_numpy(p[f"{gate}.fc2.bias"]) * sign)
        row += count
    means = g.op("Flatten", g.op("Concat", *(name for name, _, _ in pools), axis=1))
    h = g.op(
        "Relu",
        g.op("Gemm", means, g.const(fc1, "check.fc1"), g.const(np.concatenate(b1), "check.b1")),
    )
    signed = g.op("Gemm", h, g.const(fc2, "check.fc2"), g.const(np.concatenate(b2), "check.b2"))
    lowest = g.op("ReduceMin", signed, keepdims=0)
    return g.op("Greater", lowest, g.const(np.zeros((), np.float32), "zero"))


def _speculative_conv_net(
    g: _Graph, spec: ModelSpec, p: Mapping[str, Tensor], affine, expected: Sequence[np.ndarray]
) -> None:
    """The static network of the ``expected`` open channels, checked: where every gate agrees
    (the inputs the node mostly sees) its logits, else the general graph (``If``)."""
    pools: list[tuple[str, np.ndarray, int]] = []
    logits = _static_conv_net(g, spec, p, affine, expected, pools)
    agree = _all_gates_as_expected(g, spec, p, pools, expected)
    hit = _Graph(prefix="hit.")
    hit.op("Identity", logits, out=f"hit.{OUTPUT}")  # a branch may not output an outer name
    hit.output(f"hit.{OUTPUT}", TensorProto.FLOAT, [1, spec.num_classes])
    general = _Graph(prefix="general.")
    _conv_net(general, spec, p, affine, dense=False)
    general.outputs.insert(
        0,
        helper.make_tensor_value_info(
            f"general.{OUTPUT}", TensorProto.FLOAT, [1, spec.num_classes]
        ),
    )
    names = [OUTPUT]
    for i, opened in enumerate(expected):
        mask = _open_mask(spec.width, opened)
        hit.op("Identity", hit.const(mask, f"open.{i}.expected"), out=f"hit.open.{i}")
        hit.output(f"hit.open.{i}", TensorProto.BOOL, [spec.width])
        names.append(f"open.{i}")
        g.output(f"open.{i}", TensorProto.BOOL, [spec.width])
    g.nodes.append(
        helper.make_node(
            "If",
            [agree],
            names,
            then_branch=hit.graph("expected_gates"),
            else_branch=general.graph("general"),
        )
    )
    g.conditional = True


def most_frequent(opened: Sequence[Sequence[np.ndarray]]) -> tuple[list[np.ndarray], float]:
    """The open channels per gated layer that most inputs got (``opened``: per input, per
    layer), and the share of the inputs that got exactly those."""
    seen = Counter(tuple(tuple(int(c) for c in layer) for layer in one) for one in opened)
    masks, count = seen.most_common(1)[0]
    return [np.asarray(m, dtype=np.int64) for m in masks], count / len(opened)


def frequent_masks(model: SlicedModel, images: Tensor) -> tuple[list[np.ndarray], float]:
    """:func:`most_frequent` of what ``model`` opens for each of ``images`` (N, C, H, W)."""
    with torch.no_grad():
        return most_frequent(
            [model.forward_with_open(images[i : i + 1])[1] for i in range(len(images))]
        )


def _resnet(g: _Graph, spec: ModelSpec, p: Mapping[str, Tensor], affine, dense: bool) -> str:
    layers = iter(zip(conv_norm_names(spec), affine, strict=True))

    def conv(x: str, out_set: Index, in_set: Index, stride: int) -> str:
        name, pair = next(layers)
        return _conv(g, x, p[f"{name}.conv.weight"], pair, out_set, in_set, stride, name)

    x = INPUT
    if spec.arch is ModelArch.resnet18:
        x = g.op("Relu", conv(x, np.arange(spec.widths[0]), np.arange(spec.in_channels), 1))
    gated = spec.gated_convs_per_block
    for index, (c_in, width, stride, _) in enumerate(resnet_blocks(spec)):
        if dense:
            sets: list[Index] = [np.arange(width)] * gated
        else:
            sets = _gate(
                g, x, np.arange(c_in), p, f"gate.{index}", [width] * gated, f"open.{index}"
            )
        h, in_set = x, np.arange(c_in)
        for j, out_set in enumerate(sets):
            h = g.op("Relu", conv(h, out_set, in_set, stride if j == 0 else 1))
            in_set = out_set
        h = conv(h, np.arange(width), in_set, 1)  # the residual path runs whole
        shortcut = (
            conv(x, np.arange(width), np.arange(c_in), stride)
            if has_projection(spec, c_in, width, stride)
            else x
        )
        x = g.op("Relu", g.op("Add", h, shortcut))
        if spec.arch is ModelArch.resnet12:
            x = g.op("MaxPool", x, kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
    pooled = g.op("Flatten", g.op("GlobalAveragePool", x))
    weight = g.const(_numpy(p["backbone.head.weight"]), "backbone.head.weight")
    bias = g.const(_numpy(p["backbone.head.bias"]), "backbone.head.bias")
    return g.op("Gemm", pooled, weight, bias, transB=1, out=OUTPUT)


def onnx_model(
    model: SlicedModel,
    metadata: Mapping[str, Any] | None = None,
    dense: bool = False,
    expected: Sequence[np.ndarray] | None = None,
) -> onnx.ModelProto:
    """The ONNX graph of a sliced model (its frozen statistics folded in), gates inside.

    ``dense=True`` gives the same network with every channel and no gate evaluated (the
    sliced model's ``forward_dense``): the dense reference for latency. ``expected`` (Conv-N
    with conditional gates: the open channels per layer that most inputs get, as
    :func:`frequent_masks` finds them) adds a fast path: the constant-weight network of those
    channels, taken wherever every gate agrees, the general graph elsewhere; the results are
    the same either way. ``metadata`` values are stored as text (JSON for non-strings) in the
    file's ``metadata_props``.
    """
    spec = model.spec
    if expected is not None and (spec.is_resnet or dense):
        raise ValueError("the expected gates' fast path is for a gated Conv-N graph")
    if model.statistics is None:
        raise ValueError(
            "ONNX export needs the norms' frozen statistics (model.norm=metabn, the default); "
            "this model normalizes each input with its own statistics (model.norm=batch)"
        )
    g = _Graph()
    if spec.is_resnet:
        affine = resnet_norm_affine(spec, model.params, model.statistics)
        _resnet(g, spec, model.params, affine, dense)
    else:
        affine = norm_affine(spec, model.params, model.statistics)
        opened = _conv_net(g, spec, model.params, affine, dense)
        if not dense and not g.conditional:  # a narrower network: constant, padded weights
            g = _Graph()
            g.op("Identity", _static_conv_net(g, spec, model.params, affine, opened), out=OUTPUT)
            for i, channels in enumerate(opened):
                mask = _open_mask(spec.width, channels)
                g.op("Identity", g.const(mask, f"open.{i}.constant"), out=f"open.{i}")
                g.output(f"open.{i}", TensorProto.BOOL, [spec.width])
        elif not dense and expected is not None:
            g = _Graph(prefix="static.")
            _speculative_conv_net(g, spec, model.params, affine, expected)
    shape = [1, spec.in_channels, spec.image_size, spec.image_size]
    gates = "dense" if dense else ("conditional" if g.conditional else "static")
    if gates == "conditional" and expected is not None:
        gates = "conditional, with a fast path for the expected gates"
    graph = helper.make_graph(
        g.nodes,
        f"{spec.describe()} ({gates})",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, shape)],
        [
            helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [1, spec.num_classes]),
            *g.outputs,
        ],
        g.constants,
    )
    onnx_file = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="MetaGater",
        doc_string=(
            f"{spec.describe()}, {spec.image_size}x{spec.image_size}x{spec.in_channels}, "
            f"{spec.num_classes} classes; gates {gates}"
        ),
    )
    onnx_file.ir_version = IR_VERSION
    props = {
        "format": FORMAT,
        "opset": OPSET,
        "input_name": INPUT,
        "input_shape": shape,
        "input_type": "float32",
        "output_name": OUTPUT,
        "gates": gates,
        "model": spec.describe(),
        **(metadata or {}),
    }
    helper.set_model_props(
        onnx_file, {k: v if isinstance(v, str) else json.dumps(v) for k, v in props.items()}
    )
    onnx.checker.check_model(onnx_file, full_check=True)  # with strict shape inference
    return onnx_file


def save_onnx(
    model: SlicedModel, path: str | os.PathLike[str], dense: bool = False, **metadata: Any
) -> onnx.ModelProto:
    """Write :func:`onnx_model` of ``model`` to ``path`` and return it."""
    onnx_file = onnx_model(model, metadata, dense=dense)
    onnx.save_model(onnx_file, os.fspath(path))
    return onnx_file


def read_metadata(source: onnx.ModelProto | str | os.PathLike[str]) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, as text."""
    onnx_file = source if isinstance(source, onnx.ModelProto) else onnx.load(os.fspath(source))
    return {prop.key: prop.value for prop in onnx_file.metadata_props}


def session(
    source: onnx.ModelProto | str | os.PathLike[str], threads: int = 1
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session on the CPU with ``threads`` intra-op threads (one: an edge
    device's core) and one inter-op thread."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    data = source.SerializeToString() if isinstance(source, onnx.ModelProto) else os.fspath(source)
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


@dataclass
class Comparison:
    """ONNX Runtime against the sliced model on the same inputs, one at a time."""

    predictions: np.ndarray  # ONNX Runtime's argmax per input
    sliced_predictions: np.ndarray
    max_logit_difference: float
    largest_logit: float  # the sliced model's largest |logit|, for the scale of the difference
    same_open: bool | None  # the same open channels per gate (None: a dense graph, no gate)
    opened: list[list[np.ndarray]]  # per input, the graph's open channels per gate

    @property
    def same_predictions(self) -> bool:
        return bool(np.array_equal(self.predictions, self.sliced_predictions))


def compare(
    runtime: onnxruntime.InferenceSession, model: SlicedModel, inputs: Tensor | np.ndarray
) -> Comparison:
    """Run every input of ``inputs`` (N, C, H, W) through ONNX Runtime and the sliced model."""
    x = np.ascontiguousarray(np.asarray(inputs, dtype=np.float32))
    names = [o.name for o in runtime.get_outputs()]
    predictions, sliced_predictions, opened = [], [], []
    max_diff, largest, same_open = 0.0, 0.0, True
    with torch.no_grad():
        for i in range(len(x)):
            logits, *masks = runtime.run(names, {INPUT: x[i : i + 1]})
            open_sets = [np.flatnonzero(mask) for mask in masks]
            reference, reference_open = model.forward_with_open(torch.from_numpy(x[i : i + 1]))
            max_diff = max(max_diff, float(np.abs(logits - reference.numpy()).max()))
            largest = max(largest, float(reference.abs().max()))
            predictions.append(int(logits.argmax()))
            sliced_predictions.append(int(reference.argmax()))
            opened.append(open_sets)
            same_open &= len(open_sets) == len(reference_open) and all(
                np.array_equal(a, b) for a, b in zip(open_sets, reference_open, strict=True)
            )
    return Comparison(
        predictions=np.asarray(predictions),
        sliced_predictions=np.asarray(sliced_predictions),
        max_logit_difference=max_diff,
        largest_logit=largest,
        same_open=same_open if len(names) > 1 else None,
        opened=opened,
    )
