"""Structured configs: the typed schema every run is checked against.

A mistyped key or a wrong type is an error that names the key, both for Hydra (``simulate.py``)
and for a flat Flower run config (``flwr run .``, deployments), which is merged onto the same
schema by :func:`settings_from_flat`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import DictConfig, OmegaConf

from conf.choices import (
    AdaptOrder,
    Aggregation,
    Clipping,
    DatasetName,
    GateCost,
    ModelArch,
    NormKind,
    Objective,
    RegularizerWhere,
    ServerOptimizer,
    StrategyName,
    TrackingBackend,
    TrainGates,
    Weighting,
)
from conf.validation import validate as _validate

__all__ = [
    "LEGACY_VALUES",
    "RUN_ONLY_KEYS",
    "RunConfig",
    "SimulateConfig",
    "changed_settings",
    "default_config",
    "legacy_flat",
    "saved_flat",
    "settings_from_flat",
    "to_flat",
    "validate",
]


@dataclass
class DatasetConfig:
    name: DatasetName = DatasetName.digits
    path: str | None = None  # folder or file; None uses the dataset's default location
    image_size: int | None = None  # resize target for image folders (omniglot); None = default


@dataclass
class TaskConfig:
    ways: int = 5
    shots: int = 5
    queries: int = 15
    train_pool: int = 40  # samples per class held by each training node
    holdout_samples: float = 0.3  # fraction of each class's samples reserved for target nodes
    holdout_classes: str = "auto"  # "auto" or a fraction of classes reserved for target nodes
    tasks_per_client: int = 1  # episodes a training node meta-learns on per round
    batched: bool = False  # a client's episodes as one vmapped computation (faster on a GPU)


@dataclass
class ModelConfig:
    # conv: Conv-N (width, depth); resnet12 / resnet18: gated ResNets (widths), one gate per
    # residual block (conf/model/resnet12.yaml, resnet18.yaml).
    arch: ModelArch = ModelArch.conv
    # metabn: statistics from the node's support set, frozen for its queries (deployable, one
    # image at a time); batch: the statistics of the batch being classified (transductive).
    norm: NormKind = NormKind.metabn
    width: int = 32  # Conv-N: filters per conv layer
    depth: int = 4  # Conv-N: conv blocks
    # ResNets: the four stage widths as one string (Flower run configs have no lists), e.g.
    # "32,64,128,256" or 32-64-128-256 on the command line; "" = the architecture's default.
    widths: str = ""
    gate_hidden: int = 16
    gate_bias: float = 3.0


def _keyword_field(cls: type, name: str, type_: type, default: Any) -> type:
    """Add a field whose name is a Python keyword (``gating.lambda`` is part of the CLI contract).

    ``dataclass`` cannot write an ``__init__`` for it, so the class gets none; OmegaConf only
    needs the fields and their defaults.
    """
    cls.__annotations__ = {**cls.__annotations__, name: type_}
    setattr(cls, name, default)
    return dataclass(init=False, repr=False, eq=False)(cls)


class GatingConfig:
    target_ratio: float = 0.5  # rho: the MAC ratio the regularizer aims for
    warmup_rounds: int = 20  # lambda rises linearly to its value over these rounds
    # after the warm-up, lambda += lambda_lr x (deployed MAC ratio - target_ratio) each round
    # (dual ascent: the gates meet the budget on any data); 0 keeps lambda fixed
    lambda_lr: float = 0.5
    where: RegularizerWhere = RegularizerWhere.both  # where the regularizer enters the loss
    temperature: float = 2 / 3
    # Relaxed gates in training, R on the deployed gates' ratio, λ by dual ascent, no
    # batch-shaping: the best configuration measured (BENCHMARKS.md, "Fidelity" and
    # "Conditional gates").
    train_gates: TrainGates = TrainGates.soft
    cost: GateCost = GateCost.deployed  # the MAC ratio R holds to ρ
    # weight of the batch-shaping term in the query loss, which keeps each gate input-dependent
    # (gating/model/shaping.py); 0: off
    shaping: float = 0.0
    shaping_rounds: int = 0  # the weight decays linearly to 0 over these rounds; 0: constant


GatingConfig = _keyword_field(GatingConfig, "lambda", float, 1.0)


@dataclass
class AdaptConfig:
    order: AdaptOrder = AdaptOrder.backbone_first
    # α = γ: the best of a search for fedmeta and MetaGater alike (BENCHMARKS.md, "Fidelity");
    # MAML's 0.4 was for Omniglot.
    backbone_lr: float = 0.1
    gate_lr: float = 0.1
    inner_steps: int = 1
    zero_head: bool = False  # every task's adaptation starts from a zero head
    # Meta-SGD: per-coordinate step sizes, starting at α (γ for the gates), meta-learned with the
    # weights (the server's step: meta.backbone_lr) and used by every node's Adapt
    learn_step_sizes: bool = False


@dataclass
class MetaOptConfig:
    first_order: bool = False
    optimizer: ServerOptimizer = ServerOptimizer.adam  # one per parameter group
    backbone_lr: float = 1e-3
    # 10x the backbone's: the gates must follow λ as it rises, or they stay open for tens of
    # rounds, λ winds up and then shuts half the channels at once (BENCHMARKS.md, "Fidelity")
    gate_lr: float = 1e-2


@dataclass
class LocalConfig:
    """Local training of the dense baselines (fedavg, perfedavg) on each sampled node."""

    steps: int = 4  # local steps per round, each on a fresh episode of the node's data
    lr: float = 0.05  # fedavg's SGD step; perfedavg's outer step beta (alpha is adapt.backbone_lr)
    # perfedavg's Hessian-vector product: 0 = exact (double backward), > 0 = the paper's central
    # difference with this step
    hessian_delta: float = 0.0


@dataclass
class RobustConfig:
    """How far the server trusts a reply (see README, Trust and privacy)."""

    weighting: Weighting = Weighting.expected
    clip: Clipping = Clipping.adaptive
    clip_factor: float = 3.0  # adaptive bound: this x the round's median update norm
    clip_norm: float = 1.0  # fixed bound (robust.clip=fixed)
    aggregation: Aggregation = Aggregation.mean
    trim_fraction: float = 0.2  # trimmed_mean: share cut at each end, per coordinate
    # krum, multi_krum, bulyan and nnm: the liars a round's replies are assumed to hold (f)
    byzantine: int = 1
    # nearest-neighbour mixing before the rule (Allouah et al. 2023): each update replaced by
    # the mean of its n - f nearest (itself included)
    nnm: bool = False
    # centered_clipping: the radius of each update's difference to the previous aggregate
    # (0: the round's median difference)
    cc_radius: float = 0.0


@dataclass
class PrivacyConfig:
    """Client-level differential privacy (DP-FedAvg, McMahan et al. 2018): each update clipped
    to ``clip_norm``, Gaussian noise of ``noise_multiplier x clip_norm`` on their sum."""

    noise_multiplier: float = 0.0  # 0: off
    clip_norm: float = 1.0
    delta: float = 1e-5


@dataclass
class StrategyConfig:
    name: StrategyName = StrategyName.metagater


@dataclass
class FederationConfig:
    train_nodes: int = 20
    target_nodes: int = 20
    clients_per_round: int = 5
    rounds: int = 300
    eval_every: int = 50
    eval_nodes: int = 0  # target nodes per intermediate evaluation; 0 = all (final: always all)
    min_train_replies: int = 0  # valid replies a round needs; 0 = clients_per_round // 2 + 1
    timeout: float = 600.0  # seconds to wait for replies in one round


@dataclass
class RayConfig:
    num_cpus: int = 2  # CPUs Ray may use on this machine (ignored when attaching to a cluster)
    client_cpus: float = 1.0  # CPUs per ClientApp actor: 2 cores -> 2 actors
    address: str | None = None  # attach to an existing Ray cluster (e.g. "127.0.0.1:6379")
    # GPU share each ClientApp actor reserves (0.25: four actors per GPU); None: when the run's
    # device is CUDA, one GPU shared by all actors of this machine, else 0.
    client_gpus: float | None = None
    num_gpus: int | None = None  # GPUs Ray may use; None: every visible one for a CUDA device


@dataclass
class TrackingConfig:
    """Experiment tracking (server/tracking.py); the group file picks the backend."""

    backend: TrackingBackend = TrackingBackend.tensorboard
    uri: str | None = None  # MLflow: default sqlite:///<run folder>/../mlruns/mlflow.db
    experiment: str = "MetaGater"  # MLflow experiment name


@dataclass
class OutputConfig:
    dir: str = "outputs/{run_id}"  # where a ServerApp started by `flwr run` writes its results
    plots: bool = True


@dataclass
class RunConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    gating: GatingConfig = field(default_factory=GatingConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    meta: MetaOptConfig = field(default_factory=MetaOptConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # Where clients compute: auto (CUDA when torch sees a GPU, else CPU), cpu, cuda, cuda:N.
    # Payloads travel as CPU arrays; the server aggregates on the CPU.
    device: str = "auto"
    seed: int = 0
    resume: bool = False


@dataclass
class SweepConfig:
    """What ``simulate.py`` returns to a sweeper (Optuna maximizes it); see simulate.objective."""

    objective: Objective = Objective.accuracy
    penalty: float = 1.0  # budgeted_accuracy = accuracy - penalty * max(0, flops_ratio - rho)


@dataclass
class SimulateConfig(RunConfig):
    """``python simulate.py``'s config: the run's settings plus how a sweep scores the run.

    ``sweep`` is not a setting of the federation, so it stays out of the flat run config
    (``flwr run``, client messages, checkpoints).
    """

    sweep: SweepConfig = field(default_factory=SweepConfig)


#: Settings that say how a run is carried out, not what it computes: a resumed run may change
#: them, and the report does not tell runs apart by them.
RUN_ONLY_KEYS = frozenset(
    {
        "resume",
        "output.dir",
        "output.plots",
        "federation.timeout",
        "device",
        "ray.num_cpus",
        "ray.client_cpus",
        "ray.address",
        "ray.client_gpus",
        "ray.num_gpus",
        "tracking.backend",
        "tracking.uri",
        "tracking.experiment",
    }
)

#: Where ``flwr run .``'s defaults (pyproject.toml's ``[tool.flwr.app.config]``, which must list
#: every key) differ from these: a 4 + 2 node demo federation that finishes in seconds. Every
#: other value there is this schema's default (tests/test_flwr_run.py holds them equal).
FLWR_RUN_DEMO = {
    "federation.train_nodes": 4,
    "federation.target_nodes": 2,
    "federation.clients_per_round": 2,
    "federation.rounds": 3,
    "federation.eval_every": 2,
}

#: What a run written before a setting existed did, where that is not the setting's default
#: now: the norm took batch statistics, the server trusted claims and norms.
LEGACY_VALUES = {
    "gating.lambda_lr": 0.0,
    "model.norm": "batch",
    "robust.weighting": "claimed",
    "robust.clip": "off",
}


def validate(cfg: DictConfig) -> DictConfig:
    """``conf.validation.validate`` against this schema: ``simulate.py``'s config (with
    ``sweep``) or a run's settings."""
    return _validate(cfg, SimulateConfig if "sweep" in cfg else RunConfig)


#: Settings that no longer exist, and what says the same now.
REMOVED_KEYS = {"gating.enabled": "strategy.name implies it (gating.federated.strategies)"}


def legacy_flat(flat: dict[str, Any]) -> dict[str, Any]:
    """A flat config of an older run, with the settings it lacks as that run had them (and
    without those it had that no longer exist)."""
    kept = {k: v for k, v in flat.items() if k not in REMOVED_KEYS}
    return {**{k: v for k, v in LEGACY_VALUES.items() if k not in flat}, **kept}


def changed_settings(
    saved: dict[str, Any], current: dict[str, Any], ignore: frozenset[str] = RUN_ONLY_KEYS
) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` for every setting (``ignore`` aside) in which two
    flat configs differ; a setting the older ``saved`` lacks counts as what runs then did
    (:data:`LEGACY_VALUES`), else its default."""
    saved = {**to_flat(default_config()), **legacy_flat(dict(saved))}
    return [
        (key, saved.get(key), current.get(key))
        for key in sorted(set(saved) | set(current))
        if key not in ignore and saved.get(key) != current.get(key)
    ]


def default_config() -> DictConfig:
    cfg = OmegaConf.structured(RunConfig)
    OmegaConf.set_struct(cfg, True)
    return cfg


def settings_from_flat(flat: dict[str, Any]) -> DictConfig:
    """Merge a flat ``{"federation.rounds": 5, ...}`` run config onto the schema.

    Unknown keys raise an error that names them; values are converted to the schema's types.
    """
    cfg = default_config()
    for key, value in flat.items():
        if key in REMOVED_KEYS:
            raise KeyError(f"config key {key!r} was removed: {REMOVED_KEYS[key]}")
        if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise KeyError(f"unknown config key {key!r} (valid keys: {', '.join(flat_keys())})")
        OmegaConf.update(cfg, key, None if value == "" and _is_optional_leaf(cfg, key) else value)
    return validate(cfg)


_MISSING = object()


def _is_optional_leaf(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node and node[leaf] is None


def flat_keys() -> list[str]:
    def walk(node: Any, prefix: str) -> list[str]:
        if isinstance(node, DictConfig):
            return [k for name in node for k in walk(node[name], f"{prefix}{name}.")]
        return [prefix[:-1]]

    return walk(default_config(), "")


def saved_flat(cfg: DictConfig) -> dict[str, Any]:
    """A saved run's config.yaml as flat settings, as that run had them: the settings newer
    than the file are absent from it (not ""), so :func:`legacy_flat` fills them."""
    absent = object()
    written = {
        key: value
        for key, value in to_flat(cfg).items()
        if OmegaConf.select(cfg, key, default=absent) is not absent
    }
    return legacy_flat(written)


def to_flat(cfg: DictConfig) -> dict[str, Any]:
    """The inverse of :func:`settings_from_flat` (None becomes "", Flower configs have no null;
    enum members become their plain string values)."""
    out: dict[str, Any] = {}
    for key in flat_keys():
        value = OmegaConf.select(cfg, key)
        if value is None:
            value = ""
        elif isinstance(value, Enum):
            value = value.value
        out[key] = value
    return out
