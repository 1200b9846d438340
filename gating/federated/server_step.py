"""The server's half of a round: aggregate the clients' update directions, step the optimizers.

Every strategy shares it. A client sends a direction per learned parameter (a meta-gradient, or
``θ - θ_local`` for the local-training baselines); the server aggregates them
(``gating.federated.aggregation``: norm bounds, then the weighted mean or a robust rule) into
the gradient of one optimizer per parameter group (backbone, gate), with its own learning rate
and its state kept across rounds. Plain SGD with learning rate 1 on the mean of
``θ - θ_local`` is exactly FedAvg's model average. A step that would leave a non-finite
parameter or optimizer state is undone and the round fails: no broken model is ever kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from conf.choices import Aggregation, ServerOptimizer
from gating.federated.aggregation import (
    AggregationReport,
    AggregationRule,
    RoundFailed,
    aggregate,
    budget_ratio,
)
from gating.meta import STEP
from gating.model import BACKBONE, GATE, group_of

GROUPS = (BACKBONE, GATE, STEP)
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
        The initial parameters (``backbone.*``, ``gate.*``, Meta-SGD's ``step.*``); copied.
    learned_groups : sequence of str
        The groups clients send directions for (``("backbone",)`` for the dense strategies).
    optimizer : ServerOptimizer
        The kind of every group's optimizer.
    lrs : mapping of group to float
        Each group's learning rate.
    rule : AggregationRule
        Norm bounds and the aggregation rule (default: adaptive clipping, weighted mean).
    seed : int
        Seeds the differential-privacy noise, per round (a resumed run draws the same).
    """

    def __init__(
        self,
        params: Mapping[str, Tensor],
        learned_groups: Sequence[str],
        optimizer: ServerOptimizer | str,
        lrs: Mapping[str, float],
        rule: AggregationRule | None = None,
        seed: int = 0,
    ) -> None:
        self.rule = AggregationRule() if rule is None else rule
        self.seed = seed
        self._leaves = {n: torch.nn.Parameter(t.detach().clone()) for n, t in params.items()}
        # the previous round's direction, which centered clipping starts from
        self.center: Params | None = None
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

    def apply(
        self,
        updates: Sequence[Mapping[str, Tensor]],
        weights: Sequence[float],
        server_round: int = 0,
        ratios: Sequence[float] | None = None,
    ) -> AggregationReport:
        """Step with the aggregate of ``updates`` (in the given order, which callers fix, so
        that a resumed run adds in the same order); with ``ratios`` (each update's deployed MAC
        ratio) the report carries the round's ratio for λ (:func:`budget_ratio`: private under
        DP). Raises :class:`RoundFailed`, with nothing changed, when the result would not be
        finite."""
        generator = None
        if self.rule.private:
            generator = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + server_round)
        direction, report = aggregate(updates, weights, self.rule, generator, self.center)
        if ratios is not None:
            report.ratio = budget_ratio(weights, ratios, self.rule, generator)
        before = self.state_dict()  # to undo a step that breaks the model
        problem = None
        try:
            for optimizer in self.optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            for name in self.learned:
                leaf = self._leaves[name]
                leaf.grad = direction[name].to(leaf.dtype)
            for optimizer in self.optimizers.values():
                optimizer.step()
        except (RuntimeError, FloatingPointError) as error:  # e.g. an overflowing step size
            problem = f"the optimizer step failed ({error})"
        if problem is None and not self._finite():
            problem = "the aggregated update made the model or its optimizer state non-finite"
        if problem is not None:
            self.load_state_dict(before)
            norms = [f"{n:.3g}" for n in report.norms]
            raise RoundFailed(
                f"round {server_round}: {problem} (update norms {norms}); the step was undone"
            )
        if self.rule.aggregation is Aggregation.centered_clipping:
            self.center = {n: d.detach().clone() for n, d in direction.items()}
        return report

    def _finite(self) -> bool:
        tensors = list(self._leaves.values())
        for optimizer in self.optimizers.values():
            for state in optimizer.state.values():
                tensors += [v for v in state.values() if torch.is_tensor(v)]
        return all(bool(torch.isfinite(t).all()) for t in tensors)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """A copy (the optimizers' own state_dict shares their live tensors)."""
        state = {
            "params": {n: p.detach().clone() for n, p in self._leaves.items()},
            "optimizers": {g: _copied(o.state_dict()) for g, o in self.optimizers.items()},
        }
        if self.center is not None:
            state["center"] = _copied(self.center)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; names and shapes must match exactly."""
        params = state["params"]
        if set(params) != set(self._leaves):
            missing, extra = set(self._leaves) - set(params), set(params) - set(self._leaves)
            raise ValueError(
                f"saved parameters do not match the model: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(extra)[:3]}"
            )
        for name, value in params.items():
            leaf = self._leaves[name]
            if tuple(value.shape) != tuple(leaf.shape) or not value.is_floating_point():
                raise ValueError(
                    f"saved parameter {name} is {tuple(value.shape)} {value.dtype}, the model "
                    f"needs {tuple(leaf.shape)} floats"
                )
        with torch.no_grad():
            for name, value in params.items():
                self._leaves[name].copy_(value)
        if set(state["optimizers"]) != set(self.optimizers):
            raise ValueError(
                f"saved optimizers {sorted(state['optimizers'])} do not match "
                f"{sorted(self.optimizers)}"
            )
        for group, opt_state in state["optimizers"].items():
            self.optimizers[group].load_state_dict(opt_state)
        self.center = _copied(state["center"]) if "center" in state else None


def _copied(tree: Any) -> Any:
    """A copy of nested dicts and lists whose tensors are cloned: ``copy.deepcopy`` does the
    same but costs several times more per tensor (a noticeable share of a small model's round)."""
    if torch.is_tensor(tree):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _copied(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_copied(v) for v in tree)
    return tree
