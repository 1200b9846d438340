"""One description of a gated network's costly layers, for every architecture.

MAC accounting (``gating.model.macs``), the sliced engines (``gating.deploy``) and the checks on
frozen statistics all need the same facts about a network: which conv and linear layers it has,
how many output positions each computes, and where each layer's *active* input and output channel
counts come from: a gate's mask (a block of columns of one gate's output), or a fixed count.
They are written here once per architecture, from the :class:`~gating.model.spec.ModelSpec`
alone, and tested against ``FlopCounterMode`` with every gate open (tests/test_gating.py,
tests/test_resnet.py).

Cost model (1 MAC = one multiply-add): a layer costs ``kernel_area * spatial * in * out``,
with ``in`` and ``out`` its active channel counts. A conv has ``kernel_area = k*k`` and
``spatial = H_out * W_out``; Conv-N's head, a linear layer on the flattened last map, is a conv
whose kernel covers the whole map: ``kernel_area = 1``, ``spatial`` = the positions each input
channel contributes; the ResNets' head after global average pooling has both 1.

Gates (Bejnordi, Blankevoort and Welling, "Batch-shaping for learning conditional channel gated
networks", ICLR 2020, arXiv 1907.06627): Conv-N has one per conv, controlling its outputs; the
ResNets have one per residual block, reading the block's input and controlling the outputs of
the block's inner convs (ResNet-12: the first two of three; ResNet-18's basic block: the first of
two). The residual path (the block's last conv, its shortcut, the sum) stays whole, so a block's
output, and with it the next gate's input, is always dense.
"""

from __future__ import annotations

from dataclasses import dataclass

from conf.choices import ModelArch
from gating.model.spec import ModelSpec


@dataclass(frozen=True)
class Channels:
    """Where a layer's active input or output channel count comes from.

    ``count`` channels in all; when ``gate`` is set they are the columns
    ``offset : offset + count`` of that gate's mask (its :class:`LayerTrace` in the trace),
    otherwise all of them are always computed.
    """

    count: int
    gate: int | None = None
    offset: int = 0

    @property
    def stop(self) -> int:
        return self.offset + self.count


@dataclass(frozen=True)
class LayerCost:
    """One conv or linear layer: ``kernel_area * spatial * in * out`` MACs for ``in`` active
    input and ``out`` active output channels (see the module docstring)."""

    name: str
    kernel_area: int
    spatial: int  # output positions of a conv (H_out * W_out); Conv-N's head: positions per input
    inputs: Channels
    outputs: Channels

    @property
    def in_channels(self) -> int:
        return self.inputs.count

    @property
    def out_channels(self) -> int:
        return self.outputs.count

    @property
    def factor(self) -> int:
        """MACs per (active input, active output) channel pair."""
        return self.kernel_area * self.spatial

    @property
    def dense_macs(self) -> int:
        return self.factor * self.inputs.count * self.outputs.count


@dataclass(frozen=True)
class GateShape:
    """A gate MLP reads ``in_channels`` (global average pool of its input) and yields one logit
    per controlled channel; :attr:`groups` says which layer's outputs each block of logits opens."""

    in_channels: int
    out_channels: int
    groups: tuple[int, ...]  # the sizes of the column blocks, one per controlled conv


def gate_shapes(spec: ModelSpec) -> list[GateShape]:
    """Every gate, in trace order."""
    if not spec.is_resnet:
        channels = [spec.in_channels] + [spec.width] * spec.depth
        return [GateShape(channels[i], spec.width, (spec.width,)) for i in range(spec.depth)]
    return [
        GateShape(c_in, width * spec.gated_convs_per_block, (width,) * spec.gated_convs_per_block)
        for c_in, width, _, _ in resnet_blocks(spec)
    ]


def resnet_blocks(spec: ModelSpec) -> list[tuple[int, int, int, int]]:
    """Per residual block ``(in_channels, width, stride, input side)``, in forward order."""
    if not spec.is_resnet:
        raise ValueError(f"{spec.describe()} has no residual blocks")
    blocks = []
    sizes = spec.layer_sizes()
    if spec.arch is ModelArch.resnet12:
        c_in = spec.in_channels
        for stage, width in enumerate(spec.widths):
            blocks.append((c_in, width, 1, sizes[stage]))
            c_in = width
        return blocks
    c_in, side = spec.widths[0], spec.image_size  # after the stem
    for stage, width in enumerate(spec.widths):
        for block in range(spec.blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            blocks.append((c_in, width, stride, side))
            side = -(-side // stride)
            c_in = width
    return blocks


def has_projection(spec: ModelSpec, c_in: int, width: int, stride: int) -> bool:
    """Whether a residual block's shortcut is a 1x1 conv + norm: always in ResNet-12; in
    ResNet-18 where the shape changes (otherwise the identity)."""
    return spec.arch is ModelArch.resnet12 or stride != 1 or c_in != width


def layer_costs(spec: ModelSpec) -> list[LayerCost]:
    """Every conv and linear layer of the backbone in forward order, the head last (the gate
    MLPs are counted by ``gating.model.macs.gate_macs``)."""
    k2 = spec.kernel_size**2
    if not spec.is_resnet:
        sizes = spec.layer_sizes()
        costs = []
        inputs = Channels(spec.in_channels)
        for index in range(spec.depth):
            outputs = Channels(spec.width, gate=index)
            costs.append(LayerCost(f"conv{index + 1}", k2, sizes[index] ** 2, inputs, outputs))
            inputs = outputs
        head_spatial = sizes[-1] ** 2
        costs.append(LayerCost("head", 1, head_spatial, inputs, Channels(spec.num_classes)))
        return costs

    costs = []
    if spec.arch is ModelArch.resnet18:
        stem = Channels(spec.widths[0])
        costs.append(LayerCost("stem", k2, spec.image_size**2, Channels(spec.in_channels), stem))
    per_stage = spec.blocks_per_stage
    gated = spec.gated_convs_per_block
    for gate, (c_in, width, stride, side) in enumerate(resnet_blocks(spec)):
        name = f"s{gate // per_stage + 1}b{gate % per_stage + 1}"
        positions = (-(-side // stride)) ** 2
        inputs = Channels(c_in)
        for conv in range(gated + 1):
            last = conv == gated
            outputs = Channels(width) if last else Channels(width, gate, conv * width)
            costs.append(LayerCost(f"{name}.conv{conv + 1}", k2, positions, inputs, outputs))
            inputs = outputs
        if has_projection(spec, c_in, width, stride):
            costs.append(
                LayerCost(f"{name}.shortcut", 1, positions, Channels(c_in), Channels(width))
            )
    costs.append(LayerCost("head", 1, 1, Channels(spec.widths[-1]), Channels(spec.num_classes)))
    return costs


def norm_channels(spec: ModelSpec) -> list[int]:
    """The channels of every norm layer, by statistics index (forward order): one per conv but
    the head's. This is the shape of ``GatedOutput.statistics`` and of frozen statistics."""
    return [cost.out_channels for cost in layer_costs(spec)[:-1]]
