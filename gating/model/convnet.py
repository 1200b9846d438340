"""The conditional channel-gated Conv-N network (Conv-4 by default, the few-shot standard)."""

from __future__ import annotations

import itertools

import torch.nn.functional as F
from torch import Tensor, nn

from gating.model.gates import GateMode, gate_values, make_gate
from gating.model.norm import BATCH, NormStats, StatNorm
from gating.model.spec import GatedOutput, LayerTrace, ModelSpec


class ConvBlock(nn.Module):
    """conv -> norm -> ReLU; pooling is done outside."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.norm = StatNorm(out_channels)

    def forward(
        self, x: Tensor, stats: NormStats = BATCH, layer: int = 0
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Features and the ``(mean, var)`` the norm used."""
        normed, mean, var = self.norm(self.conv(x), stats, layer)
        return F.relu(normed), mean, var


class Backbone(nn.Module):
    """The Conv-N backbone's parameters: ``blocks`` (conv, norm) and the linear ``head``."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        channels = [spec.in_channels] + [spec.width] * spec.depth
        self.blocks = nn.ModuleList(
            ConvBlock(c_in, c_out, spec.kernel_size) for c_in, c_out in itertools.pairwise(channels)
        )
        self.head = nn.Linear(spec.head_features, spec.num_classes)


class GatedConvNet(nn.Module):
    """Conv-N backbone with one channel gate per conv layer; the head is not gated.

    A gate multiplies its layer's channels after norm+ReLU, so a closed channel is also a
    missing input channel of the next conv (and of the head).
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if spec.is_resnet:
            raise ValueError(f"GatedConvNet builds Conv-N, not {spec.describe()}: use build_model")
        self.spec = spec
        self.backbone = Backbone(spec)
        channels = [spec.in_channels] + [spec.width] * spec.depth
        self.gate = nn.ModuleList(
            make_gate(spec.gates, c_in, c_out, spec.gate_hidden, spec.gate_bias)
            for c_in, c_out in itertools.pairwise(channels)
        )

    def forward(
        self,
        x: Tensor,
        mode: GateMode | str = GateMode.HARD,
        temperature: float = 2 / 3,
        masks: list[Tensor] | None = None,
        stats: NormStats = BATCH,
    ) -> GatedOutput:
        """``masks`` (one (B, C_out) or (C_out,) tensor per layer) overrides the gates' decisions,
        e.g. to close chosen channels; the gate MLPs still run so their cost is still paid.
        ``stats`` says where the norms take their statistics from (default: the batch); the
        norm of conv layer l has statistics index l."""
        mode = GateMode(mode)
        trace: list[LayerTrace] = []
        statistics: list[tuple[Tensor, Tensor]] = []
        for index, (block, gate) in enumerate(zip(self.backbone.blocks, self.gate, strict=True)):
            features, mean, var = block(x, stats, index)
            statistics.append((mean, var))
            if mode is GateMode.OFF:
                trace.append(LayerTrace(mask=None, prob=None, mean=mean, var=var))
            else:
                logits = gate(x)
                mask = gate_values(logits, mode, temperature)
                if masks is not None:
                    mask = masks[index].to(features.dtype).expand_as(mask)
                features = features * mask[:, :, None, None]
                trace.append(LayerTrace(mask, logits.sigmoid(), mean, var))
            x = F.max_pool2d(features, 2, ceil_mode=True)
        logits = self.backbone.head(x.flatten(1))
        return GatedOutput(logits=logits, trace=trace, statistics=statistics)
