"""Are the gates conditional? Two figures that a static mask cannot fake.

A per-layer open ratio cannot tell a conditional gate from a static mask: a layer with half its
channels open for every input and a layer whose channels each open for half the inputs both
report 0.5. What tells them apart is each gated channel's *open frequency* f over a node's
inputs under the deterministic gates a deployed node runs (``logit > 0``):

- **input-dependent share**: the fraction of gated channels with 0 < f < 1 at a node (the gate
  decides differently for different inputs of the same node), averaged over nodes;
- **node-dependent share**: the fraction of gated channels whose f differs between nodes (after
  each node's own ``Adapt``, the channel serves one node's inputs more often than another's).

Both are 0 for a static mask; a static mask adapted per node (the gate stage of ``Adapt`` moving
input-free logits) can be node-dependent but never input-dependent.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from gating.model.spec import LayerTrace


def open_frequencies(trace: list[LayerTrace]) -> Tensor:
    """Per gated channel (gates in order, channels in order), the share of the batch's inputs
    for which it is open: ``trace`` must come from a deterministic (``eval``) pass."""
    masks = [layer.mask.detach() for layer in trace if layer.mask is not None]
    if not masks:
        raise ValueError("open_frequencies needs a gated forward pass (mode != 'off')")
    return torch.cat([mask.to(torch.float64).mean(dim=0) for mask in masks])


def input_dependent_share(frequencies: Sequence[Sequence[float]]) -> float:
    """Mean over nodes of the fraction of channels that open for some inputs and not others."""
    f = _stack(frequencies)
    return float(np.mean((f > 0) & (f < 1)))


def node_dependent_share(frequencies: Sequence[Sequence[float]]) -> float:
    """The fraction of channels whose open frequency is not the same at every node."""
    f = _stack(frequencies)
    return float(np.mean(f.max(axis=0) > f.min(axis=0)))


def _stack(frequencies: Sequence[Sequence[float]]) -> np.ndarray:
    f = np.asarray(frequencies, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] == 0 or f.shape[1] == 0:
        raise ValueError(f"need one frequency list per node, all of one length; got {f.shape}")
    return f
