"""Fixtures the test files share, written once here instead of copied from file to file.

- ``subprocess_env``: the environment of the processes the end-to-end tests start (private
  Flower home in ``tmp_path``, no telemetry, no stray Ray cluster, this venv's tools on PATH).
- ``free_port``: a callable returning a free TCP port on 127.0.0.1.
- ``processes``: starts named processes with their log files, remembers everything they spawn,
  kills one process tree on demand and stops them all at teardown, last started first.
- ``digits``, ``digits_episodes``, ``tiny_model``: the real data and the small float64 network
  the math tests check against independent references.

Plain helpers (no fixtures) stay in tests/support.py.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests import support

if TYPE_CHECKING:
    import torch

    from gating.data import ImageDataset
    from gating.meta import Batch
    from gating.model import GatedConvNet


# ------------------------------------------------------------------ processes


@pytest.fixture
def subprocess_env(tmp_path: Path) -> dict[str, str]:
    """``tests.support.subprocess_env(tmp_path)``."""
    return support.subprocess_env(tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> Callable[[], int]:
    """Call it for a TCP port on 127.0.0.1 that is free now (bound, then released)."""
    return _free_port


@pytest.fixture
def processes() -> Iterator[support.ProcessTree]:
    """Processes started through it, with all they spawn, are stopped when the test ends
    (SIGTERM, then SIGKILL; the last started first); a survivor fails the test."""
    tree = support.ProcessTree()
    try:
        yield tree
    finally:
        tree.stop_all()


# ------------------------------------------------------------------ digits for the math tests

EPISODE_CLASSES = ((3, 7, 1), (0, 5, 8), (2, 9, 4))


@pytest.fixture(scope="session")
def digits() -> ImageDataset:
    """The bundled scikit-learn digits: 1797 real 8x8 images, read-only arrays."""
    from gating.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits_episodes(digits: ImageDataset) -> list[tuple[Batch, Batch]]:
    """Three 3-way tasks on digits (float64), each with its own classes and samples: task t
    takes, per class, the 2 support and 4 query images from the class's (10 t)-th image on."""
    import torch

    from gating.meta import Batch

    labels = torch.from_numpy(digits.labels.copy())
    images = torch.from_numpy(digits.images.copy()).double()

    def stack(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> Batch:
        return Batch(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))

    out = []
    for task, classes in enumerate(EPISODE_CLASSES):
        support_parts, query_parts = [], []
        for local, cls in enumerate(classes):
            idx = torch.nonzero(labels == cls).flatten()[task * 10 :]
            support_parts.append((images[idx[:2]], torch.full((2,), local)))
            query_parts.append((images[idx[2:6]], torch.full((4,), local)))
        out.append((stack(support_parts), stack(query_parts)))
    return out


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., tuple[GatedConvNet, dict[str, torch.Tensor]]]:
    """``tiny_model(seed=0, gate_bias=3.0)``: a float64 GatedConvNet for 3-way 8x8 gray tasks
    (width 4, depth 2, gate MLPs of 3 hidden units) initialized after ``torch.manual_seed(seed)``,
    and a detached copy of its parameters by full name (backbone first, then gates)."""
    import torch

    from gating.model import GatedConvNet, ModelSpec, parameter_groups

    def make(
        seed: int = 0, gate_bias: float = ModelSpec.gate_bias
    ) -> tuple[GatedConvNet, dict[str, torch.Tensor]]:
        torch.manual_seed(seed)
        spec = ModelSpec(
            in_channels=1,
            image_size=8,
            num_classes=3,
            width=4,
            depth=2,
            gate_hidden=3,
            gate_bias=gate_bias,
        )
        model = GatedConvNet(spec).double()
        groups = parameter_groups(model).values()
        params = {k: v.detach().clone() for g in groups for k, v in g.items()}
        return model, params

    return make
