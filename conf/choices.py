"""Every choice a setting offers, as an enum: the one place each name is spelled.

OmegaConf types the structured config with these, so a bad value fails where the config is read
(naming the key and the valid values). Member names equal their values because OmegaConf parses
a string by member name; ``StrEnum`` members compare equal to their strings.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path


class GateKind(StrEnum):
    """What a gate decides from."""

    conditional = "conditional"  # an MLP on the pooled layer input: per input (MetaGater)
    static = "static"  # one learned logit per channel, no input: a learned static mask


#: The federated strategies: one per YAML in ``conf/strategy/`` (the command line's
#: ``strategy=<name>``), each with its record in ``gating/federated/strategies/<name>.py``.
_STRATEGY_YAMLS = sorted((Path(__file__).parent / "strategy").glob("*.yaml"))
if not _STRATEGY_YAMLS:  # e.g. an app bundle built without them (pyproject.toml's fab-include)
    raise ImportError(f"no strategy YAML in {Path(__file__).parent / 'strategy'}: they name them")
StrategyName = StrEnum("StrategyName", {path.stem: path.stem for path in _STRATEGY_YAMLS})


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
    # the previous round's aggregate plus the weighted mean of each update's difference to it,
    # clipped at robust.cc_radius (Karimireddy et al. 2021)
    centered_clipping = "centered_clipping"


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
