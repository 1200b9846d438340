"""The gated network a :class:`ModelSpec` describes: Conv-N or one of the ResNets, by ``arch``.

Everything above the model (``Adapt``, meta-gradients, the federation) calls :func:`build_model`
and then only uses what both classes share: the ``backbone.*`` and ``gate.*`` parameter groups,
``spec``, and ``forward(x, mode, temperature, masks, stats) -> GatedOutput``.
"""

from __future__ import annotations

from gating.model.convnet import GatedConvNet
from gating.model.resnet import GatedResNet
from gating.model.spec import ModelSpec

#: Either gated network; both take and return the same things.
GatedModel = GatedConvNet | GatedResNet


def build_model(spec: ModelSpec) -> GatedModel:
    """A fresh gated network of ``spec.arch`` (initialized from torch's global RNG)."""
    return GatedResNet(spec) if spec.is_resnet else GatedConvNet(spec)
