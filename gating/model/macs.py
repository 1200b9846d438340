"""MAC accounting for the gated network (1 MAC = one multiply-add).

No library sees data-dependent channel masks, so the count is written here from the masks each
input actually realized. With every gate open it equals ``FlopCounterMode`` total / 2 (tested).
Only convolutions and linear layers are counted, as ``FlopCounterMode`` does; norm, ReLU,
pooling, the gates' average pool and the mask multiply are elementwise and left out.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from gating.model.spec import LayerTrace, ModelSpec


@dataclass(frozen=True)
class LayerCost:
    name: str
    dense_macs: int
    in_channels: int
    out_channels: int
    spatial: int  # output positions of the layer (H_out * W_out)


def layer_costs(spec: ModelSpec) -> list[LayerCost]:
    """Dense cost of every backbone layer: the convs, then the (ungated) head."""
    sizes = spec.layer_sizes()
    k2 = spec.kernel_size**2
    costs = []
    channels = [spec.in_channels] + [spec.width] * spec.depth
    for index in range(spec.depth):
        spatial = sizes[index] ** 2
        c_in, c_out = channels[index], channels[index + 1]
        costs.append(
            LayerCost(f"conv{index + 1}", k2 * spatial * c_in * c_out, c_in, c_out, spatial)
        )
    head_spatial = sizes[-1] ** 2
    costs.append(
        LayerCost(
            "head",
            spec.head_features * spec.num_classes,
            spec.width,
            spec.num_classes,
            head_spatial,
        )
    )
    return costs


def dense_macs(spec: ModelSpec) -> int:
    """MACs of the plain backbone for one input: the denominator of ``flops_ratio``."""
    return sum(cost.dense_macs for cost in layer_costs(spec))


def gate_macs(spec: ModelSpec) -> int:
    """The gate MLPs' own cost per input (always paid in full when gating is on)."""
    channels = [spec.in_channels] + [spec.width] * spec.depth
    return sum(spec.gate_hidden * (c_in + c_out) for c_in, c_out in itertools.pairwise(channels))


def active_counts(
    spec: ModelSpec, trace: list[LayerTrace], batch: int, device, dtype
) -> list[Tensor]:
    """Per-input number of open channels entering each layer (input image first)."""
    counts = [torch.full((batch,), float(spec.in_channels), device=device, dtype=dtype)]
    for layer in trace:
        if layer.mask is None:
            counts.append(torch.full((batch,), float(spec.width), device=device, dtype=dtype))
        else:
            counts.append(layer.mask.detach().to(dtype).sum(dim=1))
    return counts


def macs_per_layer(spec: ModelSpec, counts: list[Tensor]) -> list[Tensor]:
    """Conv l costs k*k*H*W*active_in*active_out; the head costs active_in_features*classes.

    ``counts[l]`` is the number of open channels entering layer l (``counts[0]``: the image's).
    """
    costs = layer_costs(spec)
    k2 = spec.kernel_size**2
    per_layer = [
        k2 * cost.spatial * counts[index] * counts[index + 1]
        for index, cost in enumerate(costs[:-1])
    ]
    return [*per_layer, counts[-1] * costs[-1].spatial * spec.num_classes]


def _macs_from_counts(spec: ModelSpec, counts: list[Tensor]) -> Tensor:
    return torch.stack(macs_per_layer(spec, counts)).sum(dim=0)


def realized_macs(spec: ModelSpec, trace: list[LayerTrace]) -> Tensor:
    """MACs each input of the batch actually needs, gates included: shape (B,)."""
    reference = next((layer.mask for layer in trace if layer.mask is not None), None)
    if reference is None:  # gating off: every input pays the dense price, no gate cost
        raise ValueError("realized_macs needs a gated forward pass (mode != 'off')")
    counts = active_counts(spec, trace, reference.shape[0], reference.device, torch.float64)
    return _macs_from_counts(spec, counts) + gate_macs(spec)


def expected_mac_ratio(spec: ModelSpec, trace: list[LayerTrace]) -> Tensor:
    """Differentiable expected MAC ratio from the gates' open probabilities, batch mean.

    Channels are treated as independent, so E[active_in * active_out] = E[in] * E[out].
    """
    probs = [layer.prob for layer in trace]
    if any(p is None for p in probs):
        raise ValueError("expected_mac_ratio needs a gated forward pass (mode != 'off')")
    first = probs[0]
    counts = [
        torch.full(
            (first.shape[0],), float(spec.in_channels), device=first.device, dtype=first.dtype
        )
    ]
    counts += [p.sum(dim=1) for p in probs]
    expected = _macs_from_counts(spec, counts) + gate_macs(spec)
    return expected.mean() / dense_macs(spec)


def gate_regularizer(spec: ModelSpec, trace: list[LayerTrace], target_ratio: float) -> Tensor:
    """R = (expected MAC ratio - target)_+^2: pushes compute down to the target, never below."""
    return torch.relu(expected_mac_ratio(spec, trace) - target_ratio) ** 2


def active_channel_ratios(trace: list[LayerTrace]) -> list[float]:
    """Mean fraction of open channels per gated layer (1.0 for an ungated pass)."""
    return [1.0 if layer.mask is None else float(layer.mask.detach().mean()) for layer in trace]


def flops_ratio(spec: ModelSpec, trace: list[LayerTrace]) -> float:
    """Realized MACs / dense backbone MACs, averaged over the batch (1.0 when gating is off)."""
    if all(layer.mask is None for layer in trace):
        return 1.0
    return float(realized_macs(spec, trace).mean()) / dense_macs(spec)
