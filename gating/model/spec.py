"""What every part of the algorithm agrees on about a model: its shape and its parameter names.

Parameters live in two named groups so meta-learning code can differentiate with respect to
either one: everything under ``backbone.`` (convs, norms, head) and everything under ``gate.``
(one small MLP per gate). Use :func:`torch.func.functional_call` with a dict of both.

Two families share this contract: Conv-N (``arch="conv"``, the few-shot standard of MAML) and
the gated ResNets (``resnet12``, ``resnet18``), whose gates sit one per residual block as in
Bejnordi et al., "Batch-shaping for learning conditional channel gated networks" (ICLR 2020).
Adapt and the meta-gradient see only the two groups and ``forward(x, mode, temperature, masks,
stats) -> GatedOutput``, so they run unchanged on either.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from torch import Tensor, nn

from conf.choices import GateKind, ModelArch

BACKBONE = "backbone"
GATE = "gate"


def group_of(name: str) -> str:
    """``backbone`` or ``gate``: the group of a parameter name."""
    return name.split(".", 1)[0]


#: Stage widths of the ResNets when none are given: narrow enough to meta-train on 2 CPU cores
#: (the usual 64-160-320-640 of ResNet-12 and 64-128-256-512 of ResNet-18 are far too slow there).
DEFAULT_WIDTHS: dict[ModelArch, tuple[int, ...]] = {
    ModelArch.resnet12: (32, 64, 128, 256),
    ModelArch.resnet18: (16, 32, 64, 128),
}
#: Residual stages of both ResNets.
RESNET_STAGES = 4


def parse_widths(text: str | Any) -> tuple[int, ...]:
    """``"32,64,128,256"`` (or ``32-64-128-256``, or a sequence of ints) as a tuple of ints;
    ``""`` is the empty tuple (the architecture's default). Flower run configs have no lists,
    and Hydra reads a bare comma list on the command line as a sweep, hence the string form."""
    if isinstance(text, str):
        if not text.strip():
            return ()
        parts = re.split(r"\s*[,\-]\s*|\s+", text.strip())
        if not all(part.isdigit() for part in parts):
            raise ValueError(
                f"widths must be positive integers separated by commas, e.g. '32,64,128,256', "
                f"got {text!r}"
            )
        return tuple(int(part) for part in parts)
    return tuple(int(w) for w in text)


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a gated network; everything a MAC count needs besides the masks.

    Parameters
    ----------
    in_channels, image_size, num_classes
        The input images (square) and the head's outputs.
    width, depth
        Conv-N only: filters per conv layer and number of conv blocks.
    gate_hidden, gate_bias
        The gate MLP's hidden units and the initial bias of its last layer (open gates).
    kernel_size
        Side of the (odd, same-padded) convolutions: every conv of Conv-N, the inner convs of
        the ResNets (their shortcuts are 1x1).
    arch
        ``conv`` (Conv-N), ``resnet12`` or ``resnet18`` (:class:`conf.choices.ModelArch`).
    widths
        ResNets only: the channels of the four residual stages; empty means
        :data:`DEFAULT_WIDTHS` of the architecture. Conv-N takes ``width`` and ``depth``.
    gates
        ``conditional`` (an MLP per gate on its pooled input: a decision per input) or
        ``static`` (the same MLP fed a constant: one decision for every input, a learned mask).
    """

    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 5
    width: int = 32
    depth: int = 4
    gate_hidden: int = 16
    gate_bias: float = 3.0
    kernel_size: int = 3
    arch: ModelArch = ModelArch.conv
    widths: tuple[int, ...] = field(default=())
    gates: GateKind = GateKind.conditional

    def __post_init__(self) -> None:
        for name in ("in_channels", "image_size", "num_classes", "width", "depth", "gate_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"model {name} must be >= 1, got {getattr(self, name)}")
        if self.kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (same padding), got {self.kernel_size}")
        try:
            arch = ModelArch(self.arch)
        except ValueError:
            valid = ", ".join(a.value for a in ModelArch)
            raise ValueError(f"model arch must be one of {valid}, got {self.arch!r}") from None
        widths = parse_widths(self.widths)
        if arch is ModelArch.conv:
            if widths:
                raise ValueError(
                    f"widths {widths} are for the ResNets; Conv-N takes width and depth"
                )
        else:
            widths = widths or DEFAULT_WIDTHS[arch]
            if len(widths) != RESNET_STAGES or min(widths) < 1:
                raise ValueError(
                    f"{arch.value} needs {RESNET_STAGES} stage widths >= 1, got {widths}"
                )
        object.__setattr__(self, "arch", arch)  # normalized, so equal specs hash alike
        object.__setattr__(self, "gates", GateKind(self.gates))
        object.__setattr__(self, "widths", widths)

    @property
    def is_resnet(self) -> bool:
        return self.arch is not ModelArch.conv

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only (a ``weights_only`` torch file can hold them). A Conv-N
        spec leaves ``arch`` and ``widths`` out, conditional gates ``gates``: its dict is the one
        written before the ResNets and static gates existed, which older readers still load."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.gates is GateKind.static:
            out["gates"] = self.gates.value
        else:  # as written before static gates existed
            del out["gates"]
        if self.is_resnet:
            out["arch"] = self.arch.value
            out["widths"] = list(self.widths)
        else:
            del out["arch"], out["widths"]
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelSpec:
        """The inverse of :meth:`to_dict`; a dict without ``arch`` is a Conv-N spec."""
        values = dict(values)
        if "widths" in values:
            values["widths"] = tuple(values["widths"])
        return cls(**values)

    def describe(self) -> str:
        """A short name of the network, e.g. ``Conv-4 width 32`` or ``ResNet-12 32-64-128-256``."""
        if not self.is_resnet:
            return f"Conv-{self.depth} width {self.width}"
        name = {ModelArch.resnet12: "ResNet-12", ModelArch.resnet18: "ResNet-18"}[self.arch]
        return f"{name} {'-'.join(str(w) for w in self.widths)}"

    def layer_sizes(self) -> list[int]:
        """Spatial side length at the input of each conv layer (Conv-N) or residual stage
        (ResNets), then of the final feature map.

        Pooling uses ``ceil_mode`` so tiny images (8x8 digits) survive four 2x2 pools: 8-4-2-1-1;
        ResNet-18's stride-2 convs halve the side the same way (ceil), after its first stage.
        """
        sizes = [self.image_size]
        if self.arch is ModelArch.resnet18:
            sizes.append(self.image_size)  # stage 1 keeps the stem's resolution
            for _ in range(RESNET_STAGES - 1):
                sizes.append(math.ceil(sizes[-1] / 2))
            return sizes
        for _ in range(RESNET_STAGES if self.is_resnet else self.depth):
            sizes.append(math.ceil(sizes[-1] / 2))
        return sizes

    @property
    def blocks_per_stage(self) -> int:
        """Residual blocks in each stage (ResNets): one for ResNet-12, two for ResNet-18."""
        return 2 if self.arch is ModelArch.resnet18 else 1

    @property
    def gated_convs_per_block(self) -> int:
        """Inner convs whose output channels a block's gate opens or closes (ResNets)."""
        return 2 if self.arch is ModelArch.resnet12 else 1

    @property
    def gated_layers(self) -> int:
        """The number of gates: one per conv (Conv-N), one per residual block (ResNets)."""
        return RESNET_STAGES * self.blocks_per_stage if self.is_resnet else self.depth

    @property
    def head_features(self) -> int:
        """Inputs of the linear head: the flattened last map (Conv-N) or the globally
        average-pooled last stage (ResNets)."""
        if self.is_resnet:
            return self.widths[-1]
        side = self.layer_sizes()[-1]
        return self.width * side * side


@dataclass
class LayerTrace:
    """What one gate did for a batch: enough for MAC accounting and the regularizer.

    ``mask`` and ``prob`` have one column per channel the gate controls (a ResNet-12 block's
    gate: the outputs of its first conv, then of its second). ``mean`` and ``var`` are the
    statistics of a Conv-N layer's norm (None for the ResNets, whose blocks have several norms):
    :attr:`GatedOutput.statistics` is the complete list for every architecture.
    """

    mask: Tensor | None  # (B, C) realized 0/1 (or relaxed) gate values; None when gating is off
    prob: Tensor | None  # (B, C) open probability sigmoid(logit); None when gating is off
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
    """A gated forward pass: the logits, one :class:`LayerTrace` per gate, and per norm layer
    (in the order of its statistics index) the ``(mean, var)`` it normalized with, which is
    what a ``metabn`` node freezes after ``Adapt``."""

    logits: Tensor
    trace: list[LayerTrace]
    statistics: list[tuple[Tensor, Tensor]] = field(default_factory=list)


def parameter_groups(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """Split named parameters into the ``backbone`` and ``gate`` groups (full names kept)."""
    groups: dict[str, dict[str, Tensor]] = {BACKBONE: {}, GATE: {}}
    for name, param in model.named_parameters():
        group = group_of(name)
        if group not in groups:
            raise KeyError(f"parameter {name!r} belongs to neither group {tuple(groups)}")
        groups[group][name] = param
    return groups
