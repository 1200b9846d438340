"""Deployment of an adapted node: sliced inference over the open channels, and its file."""

from gating.deploy.model_file import load_model, save_model
from gating.deploy.native import native_available
from gating.deploy.sliced import BACKENDS, SlicedGatedNet

__all__ = ["BACKENDS", "SlicedGatedNet", "load_model", "native_available", "save_model"]
