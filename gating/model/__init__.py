"""The conditional channel-gated network: shape, gates, norm, Conv-N, MAC accounting."""

from gating.model.convnet import GatedConvNet
from gating.model.gates import GateMode
from gating.model.macs import (
    active_channel_ratios,
    dense_macs,
    expected_mac_ratio,
    flops_ratio,
    gate_macs,
    gate_regularizer,
    layer_costs,
    realized_macs,
)
from gating.model.norm import NormStats
from gating.model.spec import (
    BACKBONE,
    GATE,
    GatedOutput,
    LayerTrace,
    ModelSpec,
    group_of,
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
    "NormStats",
    "active_channel_ratios",
    "dense_macs",
    "expected_mac_ratio",
    "flops_ratio",
    "gate_macs",
    "gate_regularizer",
    "group_of",
    "layer_costs",
    "parameter_groups",
    "realized_macs",
]
