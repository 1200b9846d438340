"""fedmeta of the widest uniformly narrower network within ``gating.target_ratio`` of the
configured network's MACs: the plain network a gated one at that budget must beat."""

from gating.federated.strategies import GATE_KEYS, LOCAL_KEYS, Strategy
from gating.federated.updates import meta_gradient_update

GATING_BUT_THE_BUDGET = tuple(
    f"gating.{key}"
    for key in (
        "lambda",
        "warmup_rounds",
        "lambda_lr",
        "where",
        "temperature",
        "train_gates",
        "cost",
        "shaping",
        "shaping_rounds",
    )
)

STRATEGY = Strategy(
    name="fedmeta_narrow",
    update=meta_gradient_update,
    narrow=True,
    fixes={"adapt.learn_step_sizes": False},  # the baseline is plain fedmeta
    unread=GATING_BUT_THE_BUDGET + tuple(k for k in GATE_KEYS if k != "gating.") + LOCAL_KEYS,
)
