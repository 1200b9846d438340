"""The conditional channel-gated networks: shape, gates, norm, Conv-N, ResNets, MAC accounting."""

from gating.model.convnet import GatedConvNet
from gating.model.factory import GatedModel, build_model
from gating.model.gates import GateMode
from gating.model.layout import Channels, LayerCost, gate_shapes, norm_channels
from gating.model.macs import (
    active_channel_ratios,
    dense_macs,
    deployed_flops_ratio,
    expected_mac_ratio,
    flops_ratio,
    gate_macs,
    gate_regularizer,
    layer_costs,
    macs_of_masks,
    narrowed,
    realized_macs,
)
from gating.model.norm import NormStats
from gating.model.resnet import GatedResNet
from gating.model.spec import (
    BACKBONE,
    GATE,
    GatedOutput,
    LayerTrace,
    ModelSpec,
    group_of,
    parameter_groups,
    parse_widths,
)

__all__ = [
    "BACKBONE",
    "GATE",
    "Channels",
    "GateMode",
    "GatedConvNet",
    "GatedModel",
    "GatedOutput",
    "GatedResNet",
    "LayerCost",
    "LayerTrace",
    "ModelSpec",
    "NormStats",
    "active_channel_ratios",
    "build_model",
    "dense_macs",
    "deployed_flops_ratio",
    "expected_mac_ratio",
    "flops_ratio",
    "gate_macs",
    "gate_regularizer",
    "gate_shapes",
    "group_of",
    "layer_costs",
    "macs_of_masks",
    "narrowed",
    "norm_channels",
    "parameter_groups",
    "parse_widths",
    "realized_macs",
]
