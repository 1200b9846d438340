"""Deployment of an adapted node: sliced inference over the open channels, and its file."""

from gating.deploy.factory import SlicedModel, sliced_model
from gating.deploy.model_file import load_model, save_model
from gating.deploy.native import native_available
from gating.deploy.sliced import BACKENDS, SlicedGatedNet
from gating.deploy.sliced_resnet import SlicedGatedResNet

__all__ = [
    "BACKENDS",
    "SlicedGatedNet",
    "SlicedGatedResNet",
    "SlicedModel",
    "load_model",
    "native_available",
    "save_model",
    "sliced_model",
]
