"""Normalization of a gated layer's channels.

:class:`BatchStatNorm` is BatchNorm with batch statistics and no running statistics (nothing
to average). Written from primitives on purpose: torch's fused batch-norm kernel has inexact
higher-order derivatives when a gate stage follows a backbone stage (about 1e-3 relative error
against finite differences, see tests/test_meta.py); these ops differentiate exactly at any
order. It normalises each channel on its own, so closing a channel never changes another
channel's output: the sliced (active-channels-only) network computes the same thing.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

EPS = 1e-5


class BatchStatNorm(nn.Module):
    def __init__(self, channels: int, eps: float = EPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        scale = self.weight[None, :, None, None] * torch.rsqrt(var + self.eps)
        return (x - mean) * scale + self.bias[None, :, None, None]
