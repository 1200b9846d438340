"""Conditional channel-gated CNN: backbone, gates and MAC accounting (plain PyTorch)."""

from gating.macs import (
    active_channel_ratios,
    dense_macs,
    expected_mac_ratio,
    flops_ratio,
    gate_macs,
    gate_regularizer,
    layer_costs,
    realized_macs,
)
from gating.network import (
    BACKBONE,
    GATE,
    GatedConvNet,
    GatedOutput,
    GateMode,
    LayerTrace,
    ModelSpec,
    parameter_groups,
)

__all__ = [
    "BACKBONE",
    "GATE",
    "GateMode",
    "GatedConvNet",
    "GatedOutput",
    "LayerTrace",
    "ModelSpec",
    "active_channel_ratios",
    "dense_macs",
    "expected_mac_ratio",
    "flops_ratio",
    "gate_macs",
    "gate_regularizer",
    "layer_costs",
    "parameter_groups",
    "realized_macs",
]
