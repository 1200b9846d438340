"""What every part of the algorithm agrees on about a model: its shape and its parameter names.

Parameters live in two named groups so meta-learning code can differentiate with respect to
either one: everything under ``backbone.`` (convs, norms, head) and everything under ``gate.``
(one small MLP per gated layer). Use :func:`torch.func.functional_call` with a dict of both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

BACKBONE = "backbone"
GATE = "gate"


def group_of(name: str) -> str:
    """``backbone`` or ``gate``: the group of a parameter name."""
    return name.split(".", 1)[0]


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
    def gated_layers(self) -> int:
        return self.depth

    @property
    def head_features(self) -> int:
        side = self.layer_sizes()[-1]
        return self.width * side * side


@dataclass
class LayerTrace:
    """What one gated layer did for a batch: enough for MAC accounting, the regularizer, and
    freezing the norm's statistics."""

    mask: Tensor | None  # (B, C_out) realized 0/1 (or relaxed) gate values; None when gating is off
    prob: Tensor | None  # (B, C_out) open probability sigmoid(logit); None when gating is off
    mean: Tensor | None = None  # the norm's per-channel statistics, broadcastable to (B, C, H, W)
    var: Tensor | None = None

    def rows(self, start: int) -> LayerTrace:
        """The trace of inputs ``start:`` (the queries of a support-then-queries batch)."""
        return LayerTrace(
            None if self.mask is None else self.mask[start:],
            None if self.prob is None else self.prob[start:],
            self.mean,
            self.var,
        )


@dataclass
class GatedOutput:
    logits: Tensor
    trace: list[LayerTrace]


def parameter_groups(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """Split named parameters into the ``backbone`` and ``gate`` groups (full names kept)."""
    groups: dict[str, dict[str, Tensor]] = {BACKBONE: {}, GATE: {}}
    for name, param in model.named_parameters():
        group = group_of(name)
        if group not in groups:
            raise KeyError(f"parameter {name!r} belongs to neither group {tuple(groups)}")
        groups[group][name] = param
    return groups
