"""Per-channel normalization whose statistics a deployed node can actually have.

Batch statistics over the test batch (the MAML convention) make a node's prediction for an image
depend on the other images it is classified with, and a node that classifies one image at a time
has only that image's own statistics (on a 1x1 map: none; the layer then outputs its bias for
every input). Following the MetaBN of Bronskill et al., "TaskNorm: Rethinking Batch
Normalization for Meta-Learning" (ICML 2020, arXiv 2003.03284), the default takes each
channel's statistics from the node's support set during ``Adapt`` and freezes them for its
queries and every later input; meta-training uses the same rule, so what is optimized is what
is deployed. :class:`NormStats` says where a forward pass takes its statistics from.

Written from primitives on purpose: torch's fused batch-norm kernel has inexact higher-order
derivatives when a gate stage follows a backbone stage (about 1e-3 relative error against
finite differences, see tests/test_meta.py); these ops differentiate exactly at any order. Each
channel is normalised on its own, so closing a channel never changes another channel's output,
and frozen statistics are a per-channel affine map that folds into the conv: the sliced
(open-channels-only) network computes the same function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

EPS = 1e-5


@dataclass(frozen=True)
class NormStats:
    """Where a forward pass takes each channel's mean and variance from.

    Default: the whole batch. ``rows=n``: the first ``n`` inputs (a node's support set placed
    before its queries), applied to every input. ``per_input``: each input's own statistics
    over its positions (what a batch-statistics model gets at batch size 1). ``frozen``: given
    ``(mean, var)`` per layer, e.g. recorded from the support set after ``Adapt``.
    """

    rows: int | None = None
    per_input: bool = False
    frozen: Sequence[tuple[Tensor, Tensor]] | None = None

    def of(self, x: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """``(mean, var)`` of layer ``layer``'s input ``x`` (B, C, H, W), shaped to broadcast."""
        if self.frozen is not None:
            mean, var = self.frozen[layer]
            return mean[None, :, None, None], var[None, :, None, None]
        if self.per_input:
            dims: tuple[int, ...] = (2, 3)
        else:
            dims = (0, 2, 3)
            if self.rows is not None:
                x = x[: self.rows]
        return x.mean(dim=dims, keepdim=True), x.var(dim=dims, unbiased=False, keepdim=True)


BATCH = NormStats()


class StatNorm(nn.Module):
    """Normalize each channel with the statistics :class:`NormStats` picks; learned affine."""

    def __init__(self, channels: int, eps: float = EPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(
        self, x: Tensor, stats: NormStats = BATCH, layer: int = 0
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The normalized ``x`` and the per-channel ``(mean, var)`` it used."""
        mean, var = stats.of(x, layer)
        scale = self.weight[None, :, None, None] * torch.rsqrt(var + self.eps)
        return (x - mean) * scale + self.bias[None, :, None, None], mean, var
