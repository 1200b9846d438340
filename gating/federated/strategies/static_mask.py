"""A learned static mask: MetaGater whose gates see no input (one logit per channel)."""

from conf.choices import GateKind
from gating.federated.strategies import Strategy
from gating.federated.updates import meta_gradient_update

STRATEGY = Strategy(
    name="static_mask",
    update=meta_gradient_update,
    gated=True,
    gates=GateKind.static,
    # a static gate has one value per batch: nothing for batch-shaping to shape
    fixes={"gating.shaping": 0.0},
)
