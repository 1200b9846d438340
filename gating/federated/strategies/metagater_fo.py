"""First-order MetaGater: the inner gradients count as constants (every task from a zero head by
its YAML's default: BENCHMARKS.md, "Fidelity")."""

from gating.federated.strategies import Strategy
from gating.federated.updates import meta_gradient_update

STRATEGY = Strategy(
    name="metagater_fo",
    update=meta_gradient_update,
    gated=True,
    # a first-order meta-gradient gives learned step sizes none
    fixes={"meta.first_order": True, "adapt.learn_step_sizes": False},
)
