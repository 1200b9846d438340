"""λ, the weight of the compute regularizer, round by round: a warm-up, then dual ascent.

A fixed λ trades accuracy against compute at a rate that depends on the data: on digits the
gates reach the budget ρ within 150 rounds, on class-disjoint emoji they stay open for 250
and end above it. Treating ``deployed MAC ratio <= ρ`` as a constraint and λ as its Lagrange
multiplier removes that dependence: after every round the server raises λ by
``gating.lambda_lr x (ratio - ρ)`` (lowers it when the gates are under budget, never below 0),
so λ grows until the gates meet the budget on any data, and no further (Gallego-Posada et al.,
"Controlled Sparsity via Constrained Optimization", NeurIPS 2022). The ratio is the one the
round's clients measured for the deterministic gates a deployed node runs, after adaptation.
The gates follow λ only as fast as the server's optimizer moves them: with their Adam step at
the backbone's they stay open long after the warm-up while λ winds up, then shut half the
channels at once, which costs 1-shot tasks points; hence ``meta.gate_lr`` at 10x the
backbone's (figures: BENCHMARKS.md, "Fidelity").
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from gating.federated.strategies import strategy_of

#: Where a run's checkpoint keeps :meth:`RegularizerWeight.state_dict`.
CHECKPOINT_KEY = "regularizer"


class RegularizerWeight:
    """λ for each round; ``observe`` each round's deployed MAC ratio, in round order."""

    def __init__(self, cfg: DictConfig) -> None:
        gating = cfg.gating
        self.enabled = strategy_of(cfg).gated
        self.initial = float(gating["lambda"])
        self.warmup = max(int(gating.warmup_rounds), 0)
        self.lr = float(gating.lambda_lr)
        self.target = float(gating.target_ratio)
        self.value = self.initial  # the multiplier once the warm-up is over

    def __call__(self, server_round: int) -> float:
        """λ of round ``server_round``: rising linearly to ``gating.lambda`` over the warm-up
        (the gates first learn the task), then the multiplier."""
        if not self.enabled:
            return 0.0
        if server_round < self.warmup:
            return self.initial * server_round / self.warmup
        return self.value

    def observe(self, server_round: int, deployed_ratio: float) -> None:
        """One dual-ascent step on the round's ratio (none during the warm-up)."""
        if self.enabled and self.lr > 0 and server_round >= self.warmup:
            self.value = max(0.0, self.value + self.lr * (deployed_ratio - self.target))

    def state_dict(self) -> dict[str, Any]:
        return {"lambda": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["lambda"])

    @classmethod
    def from_checkpoint(cls, cfg: DictConfig, state: dict[str, Any]) -> RegularizerWeight:
        """λ as a run's checkpoint left it (checkpoints before dual ascent: the fixed λ)."""
        weight = cls(cfg)
        if CHECKPOINT_KEY in state:
            weight.load_state_dict(state[CHECKPOINT_KEY])
        return weight
