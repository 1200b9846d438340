"""The deployment file of an adapted node: one torch file a node loads without running code.

It holds the format tag, the model spec as a dict of plain values (``arch`` included: Conv-N or
a gated ResNet; a dict without it is Conv-N), the parameters, the norms' frozen statistics
(``metabn``: the node's support statistics, one pair per norm layer; absent when each input
uses its own) and plain metadata (where the model came from, its accuracy, ...).
:func:`load_model` reads it with ``weights_only=True``, so loading runs no code, and builds the
sliced class of the spec's architecture.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from gating.deploy.factory import SlicedModel, sliced_model
from gating.model import ModelSpec

FORMAT = "metagater-sliced/2"


def save_model(model: SlicedModel, path: str | os.PathLike[str], **metadata: Any) -> None:
    """Write ``model`` (a sliced Conv-N or ResNet) and plain ``metadata`` to ``path``."""
    torch.save(
        {
            "format": FORMAT,
            "spec": model.spec.to_dict(),
            "params": model.params,
            "statistics": None if model.statistics is None else [list(s) for s in model.statistics],
            "metadata": dict(metadata),
        },
        path,
    )


def load_model(path: str | os.PathLike[str], backend: str = "auto") -> SlicedModel:
    """Read a file :func:`save_model` wrote, as the sliced class of its architecture."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated, foreign or pickled-code file
        raise ValueError(f"{path} is not a readable exported sliced model: {error}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not an exported sliced model ({FORMAT})")
    statistics = state.get("statistics")
    model = sliced_model(
        ModelSpec.from_dict(state["spec"]),
        state["params"],
        backend=backend,
        statistics=None if statistics is None else [tuple(s) for s in statistics],
    )
    model.metadata = dict(state.get("metadata", {}))
    return model
