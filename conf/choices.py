"""Every choice a setting offers, as an enum: the one place each name is spelled.

OmegaConf types the structured config with these, so a bad value fails where the config is read
(naming the key and the valid values). Member names equal their values because OmegaConf parses
a string by member name; ``StrEnum`` members compare equal to their strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class GateKind(StrEnum):
    """What a gate decides from."""

    conditional = "conditional"  # an MLP on the pooled layer input: per input (MetaGater)
    static = "static"  # one learned logit per channel, no input: a learned static mask


class StrategyName(StrEnum):
    """The federated strategies; what each client computes is registered in
    ``gating.federated.updates``, what the names imply for the config in :data:`TRAITS`."""

    metagater = "metagater"
    metagater_fo = "metagater_fo"
    static_mask = "static_mask"
    fedmeta = "fedmeta"
    fedmeta_narrow = "fedmeta_narrow"
    metasgd = "metasgd"
    reptile = "reptile"
    fedavg = "fedavg"
    perfedavg = "perfedavg"


class UpdateKind(StrEnum):
    """What a sampled client sends back."""

    meta_gradient = "meta_gradient"  # d L(Adapt(θ, φ; S); Q) / d(θ, φ)
    local_sgd = "local_sgd"  # θ - θ_local after local SGD (FedAvg)
    perfedavg_steps = "perfedavg_steps"  # θ - θ_local after local Per-FedAvg steps
    reptile = "reptile"  # θ - Adapt(θ; support and query), the mean over the node's episodes


@dataclass(frozen=True)
class StrategyTraits:
    gated: bool  # learns gates (gating.enabled must match)
    update: UpdateKind
    first_order: bool | None = None  # a value the name fixes (meta.first_order), None if free
    gates: GateKind = GateKind.conditional  # what the gates (if any) decide from
    # a dense network narrowed uniformly until its MACs are at most gating.target_ratio of the
    # configured network's: the static baseline at MetaGater's budget
    narrow: bool = False
    # Meta-SGD's learned per-coordinate inner step sizes (adapt.learn_step_sizes), None if free
    step_sizes: bool | None = False

    @property
    def reads_local(self) -> bool:
        """Whether the strategy's clients read ``local.*``."""
        return self.update in (UpdateKind.local_sgd, UpdateKind.perfedavg_steps)

    @property
    def meta_learns_head(self) -> bool:
        """Whether a meta-gradient could learn the head's start (``adapt.zero_head`` applies):
        the strategies that send ``θ - θ_local`` need the head they trained."""
        return self.update is UpdateKind.meta_gradient


TRAITS: dict[StrategyName, StrategyTraits] = {
    StrategyName.metagater: StrategyTraits(True, UpdateKind.meta_gradient, step_sizes=None),
    StrategyName.metagater_fo: StrategyTraits(True, UpdateKind.meta_gradient, first_order=True),
    StrategyName.static_mask: StrategyTraits(
        True, UpdateKind.meta_gradient, gates=GateKind.static, step_sizes=None
    ),
    StrategyName.fedmeta: StrategyTraits(False, UpdateKind.meta_gradient),
    StrategyName.fedmeta_narrow: StrategyTraits(False, UpdateKind.meta_gradient, narrow=True),
    # Meta-SGD (Li et al. 2017): fedmeta whose inner step sizes are learned per coordinate
    StrategyName.metasgd: StrategyTraits(
        False, UpdateKind.meta_gradient, first_order=False, step_sizes=True
    ),
    # Reptile (Nichol et al. 2018): first order by construction (meta.first_order is not read)
    StrategyName.reptile: StrategyTraits(False, UpdateKind.reptile),
    StrategyName.fedavg: StrategyTraits(False, UpdateKind.local_sgd),
    StrategyName.perfedavg: StrategyTraits(False, UpdateKind.perfedavg_steps),
}


class DatasetName(StrEnum):
    digits = "digits"  # scikit-learn's bundled 8x8 digits
    fashion_mnist = "fashion_mnist"  # MNIST-format IDX files (Debian: dataset-fashion-mnist)
    mnist = "mnist"  # MNIST-format IDX files in a given folder
    omniglot = "omniglot"  # alphabet/character/*.png
    npz = "npz"  # x (N,H,W[,C]) and y (N,)
    imagefolder = "imagefolder"  # root/<class>/*.png|jpg|jpeg, one folder per class


class ModelArch(StrEnum):
    """The gated backbone."""

    conv = "conv"  # Conv-N: N blocks of 3x3 conv, norm, ReLU, 2x2 max-pool; a gate per conv
    resnet12 = "resnet12"  # four residual stages of three 3x3 convs (the few-shot standard)
    resnet18 = "resnet18"  # CIFAR-style ResNet-18: four stages of two basic blocks


class NormKind(StrEnum):
    """Where the network's norms take their statistics from at a node."""

    metabn = "metabn"  # the node's support set, frozen after Adapt (TaskNorm's MetaBN)
    batch = "batch"  # the batch being classified: transductive (the MAML convention)


class AdaptOrder(StrEnum):
    backbone_first = "backbone_first"
    gate_first = "gate_first"


class RegularizerWhere(StrEnum):
    inner = "inner"
    outer = "outer"
    both = "both"


class TrainGates(StrEnum):
    hard = "hard"  # logistic noise, hard 0/1 forward, straight-through gradient
    soft = "soft"  # relaxed sigmoid((logit + noise) / τ)


class Weighting(StrEnum):
    """What weights a client's update in the server's mean."""

    expected = "expected"  # what the server knows the node's task holds (claims bounded by it)
    claimed = "claimed"  # the client's own num-examples, unchecked


class Clipping(StrEnum):
    """How the server bounds each client update's norm before aggregating."""

    off = "off"
    adaptive = "adaptive"  # robust.clip_factor x the round's median update norm
    fixed = "fixed"  # robust.clip_norm


class Aggregation(StrEnum):
    mean = "mean"  # weighted mean (FedAvg's rule)
    median = "median"  # coordinate-wise median (Yin et al. 2018)
    trimmed_mean = "trimmed_mean"  # coordinate-wise, robust.trim_fraction cut at each end
    # the rules that assume at most robust.byzantine liars per round:
    krum = "krum"  # the one update closest to its n - f - 2 nearest (Blanchard et al. 2017)
    multi_krum = "multi_krum"  # the weighted mean of the n - f best-scored by Krum
    bulyan = "bulyan"  # Krum picks n - 2f, then per coordinate the mean of the n - 4f nearest
    # the median (El Mhamdi et al. 2018); needs n >= 4f + 3


class GateCost(StrEnum):
    """Which MAC ratio the regularizer R = (ratio - ρ)+² holds to the target."""

    expected = "expected"  # from the gates' open probabilities (the training-time expectation)
    deployed = "deployed"  # what deterministic gates realize at a node (straight-through)


class ServerOptimizer(StrEnum):
    adam = "adam"
    sgd = "sgd"


class TrackingBackend(StrEnum):
    none = "none"
    tensorboard = "tensorboard"  # event files in the run folder
    mlflow = "mlflow"  # a local MLflow store (tracking.uri)


class Objective(StrEnum):
    accuracy = "accuracy"
    budgeted_accuracy = "budgeted_accuracy"
