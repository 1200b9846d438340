"""The conditional channel-gated Conv-N network.

Parameters live in two named groups so meta-learning code can differentiate with respect to
either one: everything under ``backbone.`` (convs, norms, head) and everything under ``gate.``
(one small MLP per conv layer). Use :func:`torch.func.functional_call` with a dict of both groups.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BACKBONE = "backbone"
GATE = "gate"


class GateMode(StrEnum):
    """How gates act in a forward pass."""

    OFF = "off"  # dense backbone; gates are not evaluated (dense baselines, reference runs)
    HARD = "hard"  # training: logistic noise, temperature, hard 0/1 forward, straight-through grad
    SOFT = "soft"  # relaxed gates sigmoid((logit + noise) / tau): smooth, for gradient checks
    EVAL = "eval"  # deterministic: open where logit > 0


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a gated Conv-N network; everything a MAC count needs besides the masks."""

    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 5
    width: int = 32
    depth: int = 4
    gate_hidden: int = 16
    gate_bias: float = 3.0
    kernel_size: int = 3

    def __post_init__(self) -> None:
        for name in ("in_channels", "image_size", "num_classes", "width", "depth", "gate_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"model {name} must be >= 1, got {getattr(self, name)}")
        if self.kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (same padding), got {self.kernel_size}")

    def layer_sizes(self) -> list[int]:
        """Spatial side length at the input of each conv layer, then of the head's input.

        Pooling uses ``ceil_mode`` so tiny images (8x8 digits) survive four 2x2 pools: 8-4-2-1-1.
        """
        sizes = [self.image_size]
        for _ in range(self.depth):
            sizes.append(math.ceil(sizes[-1] / 2))
        return sizes

    @property
    def head_features(self) -> int:
        side = self.layer_sizes()[-1]
        return self.width * side * side


@dataclass
class LayerTrace:
    """What one gated layer did for a batch: enough for MAC accounting and the regularizer."""

    mask: Tensor | None  # (B, C_out) realized 0/1 (or relaxed) gate values; None when gating is off
    prob: Tensor | None  # (B, C_out) open probability sigmoid(logit); None when gating is off


@dataclass
class GatedOutput:
    logits: Tensor
    trace: list[LayerTrace]


class BatchStatNorm(nn.Module):
    """BatchNorm with batch statistics and no running statistics (nothing to average).

    Written from primitives on purpose: torch's fused batch-norm kernel has inexact higher-order
    derivatives when a gate stage follows a backbone stage (about 1e-3 relative error against
    finite differences, see tests/test_meta.py); these ops differentiate exactly at any order.
    It normalises each channel on its own, so closing a channel never changes another
    channel's output: the sliced (active-channels-only) network computes the same thing.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        scale = self.weight[None, :, None, None] * torch.rsqrt(var + self.eps)
        return (x - mean) * scale + self.bias[None, :, None, None]


class ConvBlock(nn.Module):
    """conv -> BatchStatNorm -> ReLU; pooling is done outside."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.norm = BatchStatNorm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.norm(self.conv(x)))


class Backbone(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        channels = [spec.in_channels] + [spec.width] * spec.depth
        self.blocks = nn.ModuleList(
            ConvBlock(c_in, c_out, spec.kernel_size) for c_in, c_out in itertools.pairwise(channels)
        )
        self.head = nn.Linear(spec.head_features, spec.num_classes)


class ChannelGate(nn.Module):
    """GAP(layer input) -> Linear(C_in, hidden) -> ReLU -> Linear(hidden, C_out): one logit per
    output channel. The last bias starts at +gate_bias so a fresh model is the plain backbone."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, bias: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, out_channels)
        nn.init.constant_(self.fc2.bias, bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3)))))


def gate_values(logits: Tensor, mode: GateMode, temperature: float) -> Tensor:
    """Turn gate logits into the per-channel multipliers for one forward pass."""
    if mode is GateMode.EVAL:
        return (logits > 0).to(logits.dtype)
    uniform = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    noise = torch.log(uniform) - torch.log1p(-uniform)  # logistic(0, 1)
    soft = torch.sigmoid((logits + noise) / temperature)
    if mode is GateMode.SOFT:
        return soft
    hard = (soft > 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())  # forward: exactly hard; backward: d soft


class GatedConvNet(nn.Module):
    """Conv-N backbone with one channel gate per conv layer; the head is not gated.

    A gate multiplies its layer's channels after norm+ReLU, so a closed channel is also a
    missing input channel of the next conv (and of the head).
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = Backbone(spec)
        channels = [spec.in_channels] + [spec.width] * spec.depth
        self.gate = nn.ModuleList(
            ChannelGate(c_in, c_out, spec.gate_hidden, spec.gate_bias)
            for c_in, c_out in itertools.pairwise(channels)
        )

    def forward(
        self,
        x: Tensor,
        mode: GateMode | str = GateMode.HARD,
        temperature: float = 2 / 3,
        masks: list[Tensor] | None = None,
    ) -> GatedOutput:
        """``masks`` (one (B, C_out) or (C_out,) tensor per layer) overrides the gates' decisions,
        e.g. to close chosen channels; the gate MLPs still run so their cost is still paid."""
        mode = GateMode(mode)
        trace: list[LayerTrace] = []
        for index, (block, gate) in enumerate(zip(self.backbone.blocks, self.gate, strict=True)):
            features = block(x)
            if mode is GateMode.OFF:
                trace.append(LayerTrace(mask=None, prob=None))
            else:
                logits = gate(x)
                mask = gate_values(logits, mode, temperature)
                if masks is not None:
                    mask = masks[index].to(features.dtype).expand_as(mask)
                features = features * mask[:, :, None, None]
                trace.append(LayerTrace(mask=mask, prob=torch.sigmoid(logits)))
            x = F.max_pool2d(features, 2, ceil_mode=True)
        return GatedOutput(logits=self.backbone.head(x.flatten(1)), trace=trace)


def parameter_groups(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """Split named parameters into the ``backbone`` and ``gate`` groups (full names kept)."""
    groups: dict[str, dict[str, Tensor]] = {BACKBONE: {}, GATE: {}}
    for name, param in model.named_parameters():
        group = name.split(".", 1)[0]
        if group not in groups:
            raise KeyError(f"parameter {name!r} belongs to neither group {tuple(groups)}")
        groups[group][name] = param
    return groups
