"""FedMeta (Chen et al. 2018): federated MAML of the dense backbone, MetaGater without gates."""

from gating.federated.strategies import GATE_KEYS, LOCAL_KEYS, Strategy
from gating.federated.updates import meta_gradient_update

STRATEGY = Strategy(
    name="fedmeta",
    update=meta_gradient_update,
    fixes={"adapt.learn_step_sizes": False},  # that is strategy=metasgd
    unread=GATE_KEYS + LOCAL_KEYS,
)
