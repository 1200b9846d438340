"""Meta-SGD (Li et al. 2017): fedmeta whose inner step is learned, one size per coordinate.

The step sizes (``step.*``, starting at α) are meta-learned with the weights by the
second-order meta-gradient and used by every node's ``Adapt``, target nodes' included;
``gating.meta.adapt`` holds the math (``adapt.learn_step_sizes`` gives MetaGater the same).
"""

from gating.federated.strategies import GATE_KEYS, LOCAL_KEYS, Strategy
from gating.federated.updates import meta_gradient_update

STRATEGY = Strategy(
    name="metasgd",
    update=meta_gradient_update,
    # a first-order meta-gradient gives step sizes none
    fixes={"adapt.learn_step_sizes": True, "meta.first_order": False},
    unread=GATE_KEYS + LOCAL_KEYS,
)
