"""The sliced deployment form of an adapted network, picked by its architecture.

Conv-N runs in :class:`gating.deploy.SlicedGatedNet` (C++ engine or PyTorch ops), the gated
ResNets in :class:`gating.deploy.SlicedGatedResNet` (PyTorch ops); both take
``(spec, params, backend, statistics)`` and offer ``forward``, ``forward_with_open``,
``forward_dense``, ``macs``, ``flops_ratio``, ``spec``, ``params``, ``statistics``, ``backend``
and ``metadata``, which is all the exporter and the model file use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from gating.deploy.sliced import SlicedGatedNet
from gating.deploy.sliced_resnet import SlicedGatedResNet
from gating.model import ModelSpec

#: Either sliced network.
SlicedModel = SlicedGatedNet | SlicedGatedResNet


def sliced_model(
    spec: ModelSpec,
    params: Mapping[str, Tensor],
    backend: str = "auto",
    statistics: Sequence[tuple[Tensor, Tensor]] | None = None,
) -> SlicedModel:
    """The sliced network of ``spec.arch`` with these parameters and frozen norm statistics
    (None: each input's own). A ResNet with ``backend="auto"`` runs the PyTorch ops quietly
    (there is no C++ engine for it to fall back from)."""
    if spec.is_resnet:
        return SlicedGatedResNet(spec, params, backend=backend, statistics=statistics)
    return SlicedGatedNet(spec, params, backend=backend, statistics=statistics)
