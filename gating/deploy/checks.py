"""What a sliced engine checks before it accepts a model: its parameters and frozen statistics
must be exactly those of the gated network of its spec (a wrong file fails here, by name, not as
a shape error deep inside a kernel)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from gating.model import ModelSpec, build_model
from gating.model.layout import norm_channels

Params = Mapping[str, Tensor]
#: A ``metabn`` node's frozen (mean, var) per norm layer, in forward order.
Statistics = Sequence[tuple[Tensor, Tensor]]


def check_params(spec: ModelSpec, params: Params) -> None:
    """Names and shapes exactly as ``build_model(spec).named_parameters()``, values finite."""
    with torch.device("meta"):  # shapes only: no memory, no draw from torch's RNG
        reference = build_model(spec)
    expected = {n: tuple(t.shape) for n, t in reference.named_parameters()}
    given = {n: tuple(t.shape) for n, t in params.items()}
    missing = sorted(set(expected) - set(given))
    unknown = sorted(set(given) - set(expected))
    wrong = sorted(n for n in set(expected) & set(given) if expected[n] != given[n])
    if missing or unknown or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
            for what, names in (("missing", missing), ("unknown", unknown), ("shape", wrong))
            if names
        )
        raise ValueError(f"parameters do not match the model spec {spec} ({detail})")
    broken = sorted(n for n, t in params.items() if not bool(torch.isfinite(t).all()))
    if broken:  # it would predict one class for every input, without a word
        raise ValueError(f"parameters are not finite: {', '.join(broken[:4])}")


def checked_statistics(spec: ModelSpec, statistics: Statistics) -> list[tuple[Tensor, Tensor]]:
    """The statistics as flat float32 tensors, one (mean, var) pair per norm layer."""
    checked = [
        (mean.detach().to(torch.float32).flatten(), var.detach().to(torch.float32).flatten())
        for mean, var in statistics
    ]
    expected = [((c,), (c,)) for c in norm_channels(spec)]
    shapes = [(tuple(m.shape), tuple(v.shape)) for m, v in checked]
    if shapes != expected:
        raise ValueError(
            f"statistics must be (mean, var) per norm layer of {spec.describe()}, channels "
            f"{norm_channels(spec)}, got shapes {shapes}"
        )
    if not all(torch.isfinite(m).all() and (v >= 0).all() for m, v in checked):
        raise ValueError("statistics must be finite, with non-negative variances")
    return checked
