"""From a run's configuration to the plain objects the algorithm takes.

Clients, the server, the exporter and the benchmarks build their model, inner-loop settings and
task shape here, so that they cannot disagree.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from omegaconf import DictConfig

from conf.choices import ModelArch
from gating.data import DatasetError, NodeTask, TaskSpec
from gating.federated.strategies import strategy_of
from gating.meta import STEP, MetaConfig, with_step_sizes
from gating.model import (
    BACKBONE,
    GATE,
    GatedModel,
    ModelSpec,
    build_model,
    narrowed,
    parse_widths,
)

Params = dict[str, torch.Tensor]


def task_spec(cfg: DictConfig) -> TaskSpec:
    holdout = cfg.task.holdout_classes
    return TaskSpec(
        ways=cfg.task.ways,
        shots=cfg.task.shots,
        queries=cfg.task.queries,
        train_pool=cfg.task.train_pool,
        target_nodes=cfg.federation.target_nodes,
        holdout_samples=cfg.task.holdout_samples,
        holdout_classes=holdout if holdout == "auto" else float(holdout),
    )


def model_spec(cfg: DictConfig, task: NodeTask, narrow: bool = True) -> ModelSpec:
    channels, height, width = task.images.shape[1:]
    if height != width:
        raise DatasetError(
            f"the models take square images, the data has {height}x{width}: crop or pad them, "
            "or set dataset.image_size to resize them"
        )
    return spec_for(cfg, int(channels), int(height), narrow)


def spec_for(cfg: DictConfig, channels: int, image_size: int, narrow: bool = True) -> ModelSpec:
    """The model every node and the server build for this run and this image shape.

    ``model.arch`` picks Conv-N (``model.width``, ``model.depth``) or a ResNet
    (``model.widths``, a string such as ``"32,64,128,256"``; empty: the architecture's default).
    The strategy's name decides the gates' kind, and narrows the network for ``fedmeta_narrow``
    (to ``gating.target_ratio`` of the configured network's MACs; ``narrow=False``: the
    configured network, which its MAC ratio is relative to).
    """
    arch = ModelArch(cfg.model.get("arch", ModelArch.conv))
    widths = cfg.model.get("widths") or ""
    strategy = strategy_of(cfg)
    # Conv-N keeps its own keys; the ResNets' width and depth fields stay at their (unused)
    # defaults, so that equal networks have equal specs (model_for caches by spec).
    conv = {"width": cfg.model.width, "depth": cfg.model.depth} if arch is ModelArch.conv else {}
    try:
        spec = ModelSpec(
            in_channels=channels,
            image_size=image_size,
            num_classes=cfg.task.ways,
            gate_hidden=cfg.model.gate_hidden,
            gate_bias=cfg.model.gate_bias,
            arch=arch,
            widths=parse_widths(widths),
            gates=strategy.gates,
            **conv,
        )
    except ValueError as error:
        raise ValueError(f"model.arch={arch.value} model.widths={widths!r}: {error}") from error
    return narrowed(spec, cfg.gating.target_ratio) if strategy.narrow and narrow else spec


@lru_cache(maxsize=16)
def model_for(spec: ModelSpec) -> GatedModel:
    """A module used only as a function of given parameters (its own weights are never read)."""
    return build_model(spec)


def initial_parameters(spec: ModelSpec, seed: int) -> Params:
    """The meta-initialization of round 1: a seeded fresh model, the caller's RNG untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(spec)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def run_parameters(cfg: DictConfig, spec: ModelSpec) -> Params:
    """The run's parameters in round 1: the network's, and with ``adapt.learn_step_sizes``
    Meta-SGD's step sizes (``step.*``, starting at α and γ)."""
    params = initial_parameters(spec, cfg.seed)
    if cfg.adapt.learn_step_sizes:
        params = with_step_sizes(params, meta_config(cfg, 0.0))
    return params


def learned_groups(cfg: DictConfig) -> tuple[str, ...]:
    """The parameter groups the run's strategy learns (the dense ones leave the gates alone)."""
    groups = (BACKBONE, GATE) if strategy_of(cfg).gated else (BACKBONE,)
    return (*groups, STEP) if cfg.adapt.learn_step_sizes else groups


def shaping_weight(cfg: DictConfig, server_round: int) -> float:
    """The batch-shaping weight of round ``server_round``: ``gating.shaping``, decaying linearly
    to 0 over the first ``gating.shaping_rounds`` rounds (0: constant)."""
    weight, rounds = float(cfg.gating.shaping), int(cfg.gating.shaping_rounds)
    if rounds <= 0:
        return weight
    return weight * max(0.0, 1.0 - (server_round - 1) / rounds)


def meta_config(cfg: DictConfig, reg_weight: float, server_round: int = 0) -> MetaConfig:
    """The inner loop's settings for a round (λ and the batch-shaping weight are per round)."""
    return MetaConfig(
        order=cfg.adapt.order,
        backbone_lr=cfg.adapt.backbone_lr,
        gate_lr=cfg.adapt.gate_lr,
        inner_steps=cfg.adapt.inner_steps,
        zero_head=cfg.adapt.zero_head,
        first_order=cfg.meta.first_order,
        gating=strategy_of(cfg).gated,
        target_ratio=cfg.gating.target_ratio,
        reg_weight=reg_weight,
        shaping=shaping_weight(cfg, server_round),
        reg_where=cfg.gating.where,
        temperature=cfg.gating.temperature,
        train_gates=cfg.gating.train_gates,
        cost=cfg.gating.cost,
        norm=cfg.model.norm,
    )


def resolve_device(setting: str) -> torch.device:
    """``device``: auto is CUDA where torch sees a GPU (inside a Ray actor: the one Ray gave
    it), else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"config key device={setting}: torch sees no CUDA device here "
            f"(torch {torch.__version__}); use device=cpu or device=auto"
        )
    return device


def seed_torch(*keys: int) -> None:
    """Seed torch (gate noise) from (seed, partition, round, ...): any node's round is
    reproducible on its own, which makes interrupted-and-resumed runs equal uninterrupted ones."""
    torch.manual_seed(int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0]))


def episode_rng(*keys: int) -> np.random.Generator:
    """The episode draws of a node's round, from the same keys as :func:`seed_torch`."""
    return np.random.default_rng([int(k) for k in keys])
