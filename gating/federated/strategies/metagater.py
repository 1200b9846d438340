"""MetaGater: federated meta-learning of the backbone and its conditional gates, second order."""

from gating.federated.strategies import Strategy
from gating.federated.updates import meta_gradient_update

STRATEGY = Strategy(name="metagater", update=meta_gradient_update, gated=True)
