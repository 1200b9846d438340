"""The server's half of a round: average the clients' update directions, step the optimizers.

Every strategy shares it. A client sends a direction per learned parameter (a meta-gradient, or
``θ - θ_local`` for the local-training baselines); the server takes their example-weighted mean
as the gradient of one optimizer per parameter group (backbone, gate), with its own learning
rate and its state kept across rounds. Plain SGD with learning rate 1 on ``θ - θ_local`` is
exactly FedAvg's model average.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from conf.choices import ServerOptimizer
from gating.model import BACKBONE, GATE, group_of

GROUPS = (BACKBONE, GATE)
Params = dict[str, Tensor]


def make_optimizer(kind: ServerOptimizer | str, params: list[Tensor], lr: float):
    kind = ServerOptimizer(kind)
    if kind is ServerOptimizer.adam:
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


class ServerStep:
    """Parameters, which of them are learned, and one optimizer per learned group.

    Parameters
    ----------
    params : mapping of name to tensor
        The initial parameters (``backbone.*`` and ``gate.*``); copied.
    learned_groups : sequence of str
        The groups clients send directions for (``("backbone",)`` for the dense strategies).
    optimizer : ServerOptimizer
        The kind of every group's optimizer.
    lrs : mapping of group to float
        Each group's learning rate.
    """

    def __init__(
        self,
        params: Mapping[str, Tensor],
        learned_groups: Sequence[str],
        optimizer: ServerOptimizer | str,
        lrs: Mapping[str, float],
    ) -> None:
        self._leaves = {n: torch.nn.Parameter(t.detach().clone()) for n, t in params.items()}
        self.learned = [n for n in self._leaves if group_of(n) in learned_groups]
        self.optimizers = {
            group: make_optimizer(optimizer, members, lrs[group])
            for group in GROUPS
            if (members := [self._leaves[n] for n in self.learned if group_of(n) == group])
        }

    @property
    def params(self) -> Params:
        """The current parameters (detached views: copy before changing them)."""
        return {n: p.detach() for n, p in self._leaves.items()}

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """What every client update must hold: each learned parameter's name and shape."""
        return {n: tuple(self._leaves[n].shape) for n in self.learned}

    def apply(self, updates: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> Params:
        """Step with the ``weights``-weighted mean of ``updates`` (summed in the given order,
        which callers fix, so that a resumed run adds in the same order)."""
        if not updates or len(updates) != len(weights):
            raise ValueError(f"{len(updates)} updates and {len(weights)} weights")
        weight = torch.tensor([float(w) for w in weights])
        weight = weight / weight.sum()
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        for name in self.learned:
            leaf = self._leaves[name]
            stacked = torch.stack([u[name].to(leaf.dtype) for u in updates])
            leaf.grad = torch.tensordot(weight.to(stacked.dtype), stacked, dims=1)
        for optimizer in self.optimizers.values():
            optimizer.step()
        return self.params

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "params": {n: p.detach().clone() for n, p in self._leaves.items()},
            "optimizers": {g: opt.state_dict() for g, opt in self.optimizers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            for name, value in state["params"].items():
                self._leaves[name].copy_(value)
        for group, opt_state in state["optimizers"].items():
            self.optimizers[group].load_state_dict(opt_state)
