"""The sliced deployment form of an adapted network, picked by its architecture.

Conv-N runs in :class:`gating.deploy.SlicedGatedNet` (C++ engine or PyTorch ops), the gated
ResNets in :class:`gating.deploy.SlicedGatedResNet` (PyTorch ops); both take
``(spec, params, backend, statistics)`` and offer ``forward``, ``forward_with_open``,
``forward_dense``, ``macs``, ``flops_ratio``, ``spec``, ``params``, ``statistics``, ``backend``
and ``metadata``, which is all the exporter and the model file use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from torch import Tensor

from conf.choices import GateKind
from gating.deploy.sliced import SlicedGatedNet
from gating.deploy.sliced_resnet import SlicedGatedResNet
from gating.model import ModelSpec, gate_shapes

#: Either sliced network.
SlicedModel = SlicedGatedNet | SlicedGatedResNet


def as_conditional(
    spec: ModelSpec, params: Mapping[str, Tensor]
) -> tuple[ModelSpec, dict[str, Tensor]]:
    """A static mask's gates (the gate MLP fed the constant 1) as conditional gates that give
    the same logits for every input: fc1's weights on the pooled input are zero and its bias
    takes the constant's weight. The engines then run them unchanged (and count the gate MLPs'
    few MACs, which a fixed mask would not need)."""
    out = dict(params)
    for index, shape in enumerate(gate_shapes(spec)):
        weight = params[f"gate.{index}.fc1.weight"]  # (hidden, 1): the constant's weight
        out[f"gate.{index}.fc1.weight"] = weight.new_zeros(weight.shape[0], shape.in_channels)
        out[f"gate.{index}.fc1.bias"] = params[f"gate.{index}.fc1.bias"] + weight[:, 0]
    return replace(spec, gates=GateKind.conditional), out


def sliced_model(
    spec: ModelSpec,
    params: Mapping[str, Tensor],
    backend: str = "auto",
    statistics: Sequence[tuple[Tensor, Tensor]] | None = None,
) -> SlicedModel:
    """The sliced network of ``spec.arch`` with these parameters and frozen norm statistics
    (None: each input's own). A ResNet with ``backend="auto"`` runs the PyTorch ops quietly
    (there is no C++ engine for it to fall back from). A static mask runs as the conditional
    gate it equals (:func:`as_conditional`)."""
    if spec.gates is GateKind.static:
        spec, params = as_conditional(spec, params)
    if spec.is_resnet:
        return SlicedGatedResNet(spec, params, backend=backend, statistics=statistics)
    return SlicedGatedNet(spec, params, backend=backend, statistics=statistics)
