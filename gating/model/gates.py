"""Conditional channel gates: a small MLP per layer decides which output channels run.

After Bejnordi, Blankevoort and Welling, "Batch-shaping for learning conditional channel gated
networks" (ICLR 2020, arXiv 1907.06627): the gate reads the layer's input, global-average-pools
it, and yields one logit per output channel; training samples logistic noise with a hard 0/1
forward and a straight-through gradient, evaluation opens the channels whose logit is positive.
"""

from __future__ import annotations

from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conf.choices import GateKind


class GateMode(StrEnum):
    """How gates act in a forward pass."""

    OFF = "off"  # dense backbone; gates are not evaluated (dense baselines, reference runs)
    HARD = "hard"  # training: logistic noise, temperature, hard 0/1 forward, straight-through grad
    SOFT = "soft"  # relaxed gates sigmoid((logit + noise) / tau): smooth, for gradient checks
    EVAL = "eval"  # deterministic: open where logit > 0


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


class StaticGate(nn.Module):
    """A learned static mask: the gate MLP of :class:`ChannelGate` fed a constant instead of
    the layer's input, so every input gets the same decision. The baseline that isolates what
    input-conditional gates add: same parameters per channel (an fc2 row and bias over a
    learned hidden code), same initialization, meta-learned and adapted as they are.

    At a deployed node it is a fixed mask (its cost: nothing per input); it folds into a
    :class:`ChannelGate` with zero fc1 weights (``gating.deploy.factory.as_conditional``)."""

    def __init__(self, out_channels: int, hidden: int, bias: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(1, hidden)
        self.fc2 = nn.Linear(hidden, out_channels)
        nn.init.constant_(self.fc2.bias, bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x.new_ones(x.shape[0], 1))))


def make_gate(
    kind: GateKind, in_channels: int, out_channels: int, hidden: int, bias: float
) -> nn.Module:
    """The gate of ``kind`` for a layer (block) with these channels."""
    if GateKind(kind) is GateKind.static:
        return StaticGate(out_channels, hidden, bias)
    return ChannelGate(in_channels, out_channels, hidden, bias)


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
