"""MAC accounting for the gated networks (1 MAC = one multiply-add).

No library sees data-dependent channel masks, so the count is written here from the masks each
input actually realized. With every gate open it equals ``FlopCounterMode`` total / 2 (tested).
Only convolutions and linear layers are counted, as ``FlopCounterMode`` does; norm, ReLU,
pooling, the residual sums, the gates' average pool and the mask multiply are elementwise and
left out.

Every figure comes from one description of the network, :func:`gating.model.layout.layer_costs`
(kernel area, output positions, and where each layer's active input and output channel counts
come from), so Conv-N and the ResNets share the dense count, the realized count per input, the
differentiable expected ratio of the regularizer and ``flops_ratio``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from conf.choices import GateKind
from gating.model.layout import Channels, LayerCost, gate_shapes, layer_costs
from gating.model.spec import LayerTrace, ModelSpec

__all__ = [
    "LayerCost",
    "active_channel_ratios",
    "active_counts",
    "dense_macs",
    "expected_mac_ratio",
    "flops_ratio",
    "gate_macs",
    "gate_regularizer",
    "layer_costs",
    "macs_of_masks",
    "macs_per_layer",
    "narrowed",
    "realized_macs",
]

#: Per cost layer, the active ``(input, output)`` channel counts of every input, shape (B,).
Counts = list[tuple[Tensor, Tensor]]


def dense_macs(spec: ModelSpec) -> int:
    """MACs of the plain backbone for one input: the denominator of ``flops_ratio``."""
    return sum(cost.dense_macs for cost in layer_costs(spec))


def narrowed(spec: ModelSpec, share: float) -> ModelSpec:
    """The widest uniformly narrower copy of ``spec`` whose dense MACs are at most ``share`` of
    its own: the plain network a gated one at MAC ratio ``share`` must beat. Conv-N narrows its
    one width; a ResNet scales every stage width by the same factor (rounded)."""
    budget = share * dense_macs(spec)
    if spec.is_resnet:
        first = spec.widths[0]
        candidates = [
            replace(spec, widths=tuple(max(1, round(w * k / first)) for w in spec.widths))
            for k in range(first, 0, -1)
        ]
    else:
        candidates = [replace(spec, width=w) for w in range(spec.width, 0, -1)]
    for candidate in candidates:
        if dense_macs(candidate) <= budget:
            return candidate
    raise ValueError(f"no narrower {spec.describe()} has at most {share} of its MACs")


def gate_macs(spec: ModelSpec) -> int:
    """The gate MLPs' own cost per input (always paid in full when gating is on); a static
    mask has no MLP and costs nothing."""
    if spec.gates is GateKind.static:
        return 0
    return sum(spec.gate_hidden * (g.in_channels + g.out_channels) for g in gate_shapes(spec))


def _counts(spec: ModelSpec, columns: Sequence[Tensor | None], batch: int, device, dtype) -> Counts:
    """Active channel counts per layer from each gate's per-input column values (0/1 masks for
    the realized count, open probabilities for the expected one); None: that gate is off."""
    cache: dict[Channels, Tensor] = {}

    def active(source: Channels) -> Tensor:
        if source not in cache:
            values = None if source.gate is None else columns[source.gate]
            if values is None:
                count = torch.full((batch,), float(source.count), device=device, dtype=dtype)
            else:
                if source.offset != 0 or source.count != values.shape[1]:
                    values = values[:, source.offset : source.stop]
                count = values.to(dtype).sum(dim=1)
            cache[source] = count
        return cache[source]

    return [(active(cost.inputs), active(cost.outputs)) for cost in layer_costs(spec)]


def active_counts(spec: ModelSpec, trace: list[LayerTrace], batch: int, device, dtype) -> Counts:
    """Per layer (as :func:`layer_costs`), the per-input numbers of open input and output
    channels the masks of ``trace`` realized (all of them where gating is off)."""
    masks = [None if layer.mask is None else layer.mask.detach() for layer in trace]
    return _counts(spec, masks, batch, device, dtype)


def macs_per_layer(spec: ModelSpec, counts: Counts) -> list[Tensor]:
    """Layer l costs ``kernel_area * spatial * active_in * active_out`` (per input): a conv
    ``k*k*H_out*W_out*active_in*active_out``, Conv-N's head ``active_in * S * classes``."""
    return [
        cost.factor * active_in * active_out
        for cost, (active_in, active_out) in zip(layer_costs(spec), counts, strict=True)
    ]


def _macs_from_counts(spec: ModelSpec, counts: Counts) -> Tensor:
    return torch.stack(macs_per_layer(spec, counts)).sum(dim=0)


def macs_of_masks(spec: ModelSpec, masks: Sequence[Tensor | None]) -> Tensor:
    """MACs per input, gates included, of per-gate 0/1 masks (B, channels of the gate): what
    a sliced engine reports from the channels it opened. ``None`` for a gate: all open."""
    reference = next((m for m in masks if m is not None), None)
    if reference is None:
        raise ValueError("macs_of_masks needs the mask of at least one gate")
    counts = _counts(spec, masks, reference.shape[0], reference.device, torch.float64)
    return _macs_from_counts(spec, counts) + gate_macs(spec)


def realized_macs(spec: ModelSpec, trace: list[LayerTrace]) -> Tensor:
    """MACs each input of the batch actually needs, gates included: shape (B,)."""
    reference = next((layer.mask for layer in trace if layer.mask is not None), None)
    if reference is None:  # gating off: every input pays the dense price, no gate cost
        raise ValueError("realized_macs needs a gated forward pass (mode != 'off')")
    counts = active_counts(spec, trace, reference.shape[0], reference.device, torch.float64)
    return _macs_from_counts(spec, counts) + gate_macs(spec)


def _deployed(prob: Tensor) -> Tensor:
    """The channel a deterministic gate opens (``logit > 0``), with the gradient of its
    open probability (straight through)."""
    return (prob > 0.5).to(prob.dtype) + (prob - prob.detach())


def expected_mac_ratio(spec: ModelSpec, trace: list[LayerTrace], deployed: bool = False) -> Tensor:
    """Differentiable MAC ratio, batch mean: expected from the gates' open probabilities
    (channels independent, so E[active_in * active_out] = E[in] * E[out]), or, with
    ``deployed``, the ratio the deterministic gates of a deployed node realize, differentiated
    through the probabilities (straight-through).
    """
    probs = [layer.prob for layer in trace]
    if any(p is None for p in probs):
        raise ValueError("expected_mac_ratio needs a gated forward pass (mode != 'off')")
    if deployed:
        probs = [_deployed(p) for p in probs]
    first = probs[0]
    counts = _counts(spec, probs, first.shape[0], first.device, first.dtype)
    expected = _macs_from_counts(spec, counts) + gate_macs(spec)
    return expected.mean() / dense_macs(spec)


def gate_regularizer(
    spec: ModelSpec, trace: list[LayerTrace], target_ratio: float, deployed: bool = False
) -> Tensor:
    """R = (MAC ratio - target)_+^2 (see :func:`expected_mac_ratio`): pushes compute down to
    the target, never below."""
    return torch.relu(expected_mac_ratio(spec, trace, deployed) - target_ratio) ** 2


def active_channel_ratios(trace: list[LayerTrace]) -> list[float]:
    """Mean fraction of open channels per gate (1.0 for an ungated pass)."""
    return [1.0 if layer.mask is None else float(layer.mask.detach().mean()) for layer in trace]


def deployed_flops_ratio(spec: ModelSpec, trace: list[LayerTrace]) -> float:
    """The MAC ratio a deployed node's deterministic gates (``logit > 0``) would realize on
    the pass's inputs, whatever gates the pass itself ran: what the budget is about."""
    with torch.no_grad():
        return float(expected_mac_ratio(spec, trace, deployed=True))


def flops_ratio(spec: ModelSpec, trace: list[LayerTrace]) -> float:
    """Realized MACs / dense backbone MACs, averaged over the batch (1.0 when gating is off)."""
    if all(layer.mask is None for layer in trace):
        return 1.0
    return float(realized_macs(spec, trace).mean()) / dense_macs(spec)
