"""Conditional channel-gated ResNets: ResNet-12 (the few-shot standard) and CIFAR-style ResNet-18.

Gating follows Bejnordi, Blankevoort and Welling, "Batch-shaping for learning conditional
channel gated networks" (ICLR 2020, arXiv 1907.06627): one gate per residual block reads the
block's input (global average pool, then the same MLP as Conv-N's :class:`ChannelGate`) and opens
or closes the output channels of the block's inner convs; the residual path (the block's last
conv, its shortcut and the sum) stays whole. A gate multiplies its channels after norm+ReLU, as
in Conv-N, so a closed channel removes an output of one conv and an input of the next, and the
sliced engine (:mod:`gating.deploy.sliced_resnet`) never computes it. MetaGater (Lin et al.,
arXiv 2011.12511) meta-learns backbone and gates; the two-stage ``Adapt`` only sees the
``backbone.*`` and ``gate.*`` parameters and the common forward signature.

- ResNet-12 (Oreshkin et al. 2018, Lee et al. 2019, the few-shot standard): four stages, each one
  block of three 3x3 conv-norm layers (ReLU after the first two) plus a 1x1 conv + norm shortcut,
  sum, ReLU, 2x2 max-pool (ceil mode, so 8x8 digits survive); the gate controls the outputs of the
  first two convs (its logits: the first conv's channels, then the second's).
- ResNet-18, CIFAR form (He et al. 2016): a 3x3 stem conv-norm-ReLU, four stages of two basic
  blocks (two 3x3 conv-norm layers), stride 2 at the first block of stages 2-4 with a 1x1 strided
  conv + norm shortcut where the shape changes; the gate controls the first conv's outputs.

Both end in global average pooling and the (ungated) linear head. Every norm is a
:class:`StatNorm` with its own statistics index, in the order of
:func:`gating.model.layout.norm_channels`; the forward pass returns the statistics every norm used
in :attr:`GatedOutput.statistics`. Convs carry no bias: the norm's mean subtraction removes it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from conf.choices import ModelArch
from gating.model.gates import GateMode, gate_values, make_gate
from gating.model.layout import gate_shapes, has_projection, resnet_blocks
from gating.model.norm import BATCH, NormStats, StatNorm
from gating.model.spec import GatedOutput, LayerTrace, ModelSpec

Statistics = list[tuple[Tensor, Tensor]]


class ConvNorm(nn.Module):
    """conv (same padding, no bias) -> per-channel norm; the statistics index is the number of
    norms that ran before it in the pass (``len(statistics)``), which it then appends to."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False
        )
        self.norm = StatNorm(out_channels)

    def forward(self, x: Tensor, stats: NormStats, statistics: Statistics) -> Tensor:
        normed, mean, var = self.norm(self.conv(x), stats, len(statistics))
        statistics.append((mean, var))
        return normed


class ResidualBlock(nn.Module):
    """``convs`` conv-norm layers (ReLU and the gate's mask after all but the last), a shortcut
    (1x1 conv + norm, or the identity), sum, ReLU, and optionally a 2x2 max-pool (ceil mode)."""

    def __init__(
        self,
        in_channels: int,
        width: int,
        convs: int,
        kernel: int,
        stride: int,
        projection: bool,
        pool: bool,
    ) -> None:
        super().__init__()
        self.width = width
        self.pool = pool
        self.convs = nn.ModuleList(
            ConvNorm(in_channels if j == 0 else width, width, kernel, stride if j == 0 else 1)
            for j in range(convs)
        )
        self.shortcut = ConvNorm(in_channels, width, 1, stride) if projection else None

    def forward(
        self, x: Tensor, mask: Tensor | None, stats: NormStats, statistics: Statistics
    ) -> Tensor:
        """``mask`` (B, (convs - 1) * width): the gate's values for the inner convs' outputs,
        the first conv's channels first; None runs every channel."""
        h = x
        last = len(self.convs) - 1
        for j, layer in enumerate(self.convs):
            h = layer(h, stats, statistics)
            if j < last:
                h = F.relu(h)
                if mask is not None:
                    h = h * mask[:, j * self.width : (j + 1) * self.width, None, None]
        shortcut = x if self.shortcut is None else self.shortcut(x, stats, statistics)
        out = F.relu(h + shortcut)
        return F.max_pool2d(out, 2, ceil_mode=True) if self.pool else out


class ResNetBackbone(nn.Module):
    """The ResNet backbone's parameters: ``stem`` (ResNet-18 only), ``blocks`` and ``head``."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        k = spec.kernel_size
        resnet12 = spec.arch is ModelArch.resnet12
        self.stem = None if resnet12 else ConvNorm(spec.in_channels, spec.widths[0], k)
        self.blocks = nn.ModuleList(
            ResidualBlock(
                c_in,
                width,
                spec.gated_convs_per_block + 1,
                k,
                stride,
                has_projection(spec, c_in, width, stride),
                pool=resnet12,
            )
            for c_in, width, stride, _ in resnet_blocks(spec)
        )
        self.head = nn.Linear(spec.head_features, spec.num_classes)


class GatedResNet(nn.Module):
    """A ResNet-12 or ResNet-18 backbone with one channel gate per residual block.

    Parameters
    ----------
    spec
        A :class:`ModelSpec` with ``arch`` ``resnet12`` or ``resnet18`` and four stage
        ``widths``; ``kernel_size`` is the inner convs' side, ``gate_hidden`` and ``gate_bias``
        shape the gates as in Conv-N.

    Notes
    -----
    Parameters: ``backbone.stem.*`` (ResNet-18), ``backbone.blocks.{b}.convs.{j}.{conv,norm}.*``,
    ``backbone.blocks.{b}.shortcut.*``, ``backbone.head.*``, and ``gate.{b}.fc{1,2}.*``.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if not spec.is_resnet:
            raise ValueError(f"GatedResNet builds the ResNets, not {spec.describe()}")
        self.spec = spec
        self.backbone = ResNetBackbone(spec)
        self.gate = nn.ModuleList(
            make_gate(
                spec.gates, shape.in_channels, shape.out_channels, spec.gate_hidden, spec.gate_bias
            )
            for shape in gate_shapes(spec)
        )

    def forward(
        self,
        x: Tensor,
        mode: GateMode | str = GateMode.HARD,
        temperature: float = 2 / 3,
        masks: list[Tensor] | None = None,
        stats: NormStats = BATCH,
    ) -> GatedOutput:
        """As :meth:`GatedConvNet.forward`: ``masks`` (one (B, C) or (C,) tensor per gate, C the
        channels it controls) overrides the gates' decisions while their MLPs still run;
        ``stats`` says where the norms take their statistics from (default: the batch)."""
        mode = GateMode(mode)
        trace: list[LayerTrace] = []
        statistics: Statistics = []
        if self.backbone.stem is not None:
            x = F.relu(self.backbone.stem(x, stats, statistics))
        for index, (block, gate) in enumerate(zip(self.backbone.blocks, self.gate, strict=True)):
            if mode is GateMode.OFF:
                mask = None
                trace.append(LayerTrace(mask=None, prob=None))
            else:
                logits = gate(x)
                mask = gate_values(logits, mode, temperature)
                if masks is not None:
                    mask = masks[index].to(x.dtype).expand_as(mask)
                trace.append(LayerTrace(mask, logits.sigmoid()))
            x = block(x, mask, stats, statistics)
        logits = self.backbone.head(x.mean(dim=(2, 3)))
        return GatedOutput(logits=logits, trace=trace, statistics=statistics)


def conv_norm_names(spec: ModelSpec) -> list[str]:
    """The module names of every conv-norm pair, by statistics index (the order the forward
    pass runs them: the stem, then per block its convs and its shortcut)."""
    names = [] if spec.arch is ModelArch.resnet12 else ["backbone.stem"]
    convs = spec.gated_convs_per_block + 1
    for index, (c_in, width, stride, _) in enumerate(resnet_blocks(spec)):
        names += [f"backbone.blocks.{index}.convs.{j}" for j in range(convs)]
        if has_projection(spec, c_in, width, stride):
            names.append(f"backbone.blocks.{index}.shortcut")
    return names
