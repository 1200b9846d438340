"""The two-stage ``Adapt`` and the losses it and the meta-gradient take (plain PyTorch).

``Adapt(theta, phi; S)`` with ``order="backbone_first"``:
    theta' = theta - alpha * d/dtheta L(theta, phi; S)
    phi'   = phi   - gamma * d/dphi   L(theta', phi; S)
(``gate_first`` swaps the stages); with Meta-SGD's learned step sizes (``step.*``) alpha and
gamma are per coordinate. ``gating.meta.meta_gradient`` differentiates the query loss through it.

Norm statistics follow ``MetaConfig.norm`` (see ``gating.model.norm``): with ``metabn`` every
loss and prediction on queries normalizes with the statistics of the node's support set, in
training exactly as at a deployed node; the inner steps see the support set itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from conf.choices import AdaptOrder, GateCost, NormKind, RegularizerWhere, TrainGates
from gating.model import (
    BACKBONE,
    GATE,
    GatedModel,
    GatedOutput,
    GateMode,
    active_channel_ratios,
    flops_ratio,
    gate_regularizer,
    group_of,
    realized_macs,
)
from gating.model.conditionality import open_frequencies
from gating.model.norm import BATCH, NormStats
from gating.model.shaping import batch_shaping_loss

Params = dict[str, Tensor]


@dataclass(frozen=True)
class MetaConfig:
    """Everything the inner loop and the meta-gradient need; sent by the server every round."""

    order: AdaptOrder = AdaptOrder.backbone_first
    backbone_lr: float = 0.1  # alpha, inner step size of the backbone stage
    gate_lr: float = 0.1  # gamma, inner step size of the gate stage
    inner_steps: int = 1  # gradient steps per stage
    first_order: bool = False
    gating: bool = True  # False: the dense backbone only (fedmeta, fedavg)
    target_ratio: float = 0.5  # rho
    reg_weight: float = 0.0  # lambda for this round (the server applies the warm-up)
    shaping: float = 0.0  # weight of the batch-shaping term in the query loss (0: off)
    reg_where: RegularizerWhere = RegularizerWhere.both
    temperature: float = 2 / 3
    train_gates: TrainGates = TrainGates.soft  # during adaptation and the query loss
    norm: NormKind = NormKind.metabn  # where query predictions take norm statistics from
    cost: GateCost = GateCost.deployed  # the MAC ratio the regularizer holds to ρ
    # Every task starts from a zero head: labels are node-local, in a node-specific order, so
    # no head initialization suits every task; first order cannot meta-learn one anyway.
    zero_head: bool = False

    def __post_init__(self) -> None:
        """Plain strings (e.g. from an untyped config) become the enums the code compares."""
        for name, kind in (
            ("order", AdaptOrder),
            ("reg_where", RegularizerWhere),
            ("train_gates", TrainGates),
            ("norm", NormKind),
            ("cost", GateCost),
        ):
            object.__setattr__(self, name, kind(getattr(self, name)))

    @property
    def train_mode(self) -> GateMode:
        return GateMode(self.train_gates) if self.gating else GateMode.OFF

    @property
    def eval_mode(self) -> GateMode:
        return GateMode.EVAL if self.gating else GateMode.OFF

    @property
    def inner_regularized(self) -> bool:
        return self.reg_where in (RegularizerWhere.inner, RegularizerWhere.both)

    @property
    def outer_regularized(self) -> bool:
        return self.reg_where in (RegularizerWhere.outer, RegularizerWhere.both)


@dataclass(frozen=True)
class Batch:
    x: Tensor
    y: Tensor


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """The share of correct predictions, as an exact fraction (not a float32 mean)."""
    return int((logits.argmax(1) == labels).sum()) / len(labels)


def forward(
    model: GatedModel,
    params: Params,
    x: Tensor,
    mode: GateMode,
    cfg: MetaConfig,
    stats: NormStats = BATCH,
) -> GatedOutput:
    kwargs = {"mode": mode, "temperature": cfg.temperature, "stats": stats}
    return functional_call(model, network_params(params), (x,), kwargs)


def query_forward(
    model: GatedModel,
    params: Params,
    x: Tensor,
    mode: GateMode,
    cfg: MetaConfig,
    support_x: Tensor | None,
) -> GatedOutput:
    """Predictions on queries ``x``: with ``metabn`` and a support set, the support set runs
    first in the same pass and the norms take its statistics (the queries do not see each
    other); otherwise the norms use the batch ``x`` itself."""
    if support_x is None or cfg.norm is NormKind.batch:
        return forward(model, params, x, mode, cfg)
    n = len(support_x)
    out = forward(model, params, torch.cat([support_x, x]), mode, cfg, NormStats(rows=n))
    return GatedOutput(out.logits[n:], [layer.rows(n) for layer in out.trace])


def task_loss(
    model: GatedModel,
    params: Params,
    batch: Batch,
    cfg: MetaConfig,
    regularize: bool,
    support: Batch | None = None,
    shape: bool = False,
) -> tuple[Tensor, GatedOutput]:
    """L = CE + lambda * R, R from the soft gate probabilities (only where gating is on), plus
    with ``shape`` the batch-shaping term on the batch's gate probabilities (the query loss).
    ``support``: the node's support set, whose statistics the norms take (``metabn``)."""
    support_x = None if support is None else support.x
    out = query_forward(model, params, batch.x, cfg.train_mode, cfg, support_x)
    loss = F.cross_entropy(out.logits, batch.y)
    if cfg.gating and regularize and cfg.reg_weight > 0:
        deployed = cfg.cost is GateCost.deployed
        penalty = gate_regularizer(model.spec, out.trace, cfg.target_ratio, deployed)
        loss = loss + cfg.reg_weight * penalty
    if cfg.gating and shape and cfg.shaping > 0:
        loss = loss + cfg.shaping * batch_shaping_loss(out.trace)
    return loss, out


#: The group of Meta-SGD's learned inner step sizes: ``step.<name>`` is the per-coordinate step
#: of parameter ``<name>`` (Li et al. 2017). A parameter without one steps by its stage's scalar.
STEP = "step"


def step_size_name(name: str) -> str:
    return f"{STEP}.{name}"


def owner_group(name: str) -> str:
    """The group a parameter, or the step size of one, belongs to (``backbone`` or ``gate``)."""
    return group_of(name.removeprefix(f"{STEP}."))


def network_params(params: Params) -> Params:
    """The network's own parameters, without Meta-SGD's step sizes."""
    return {name: p for name, p in params.items() if group_of(name) != STEP}


def with_step_sizes(params: Params, cfg: MetaConfig) -> Params:
    """``params`` and, per learned parameter, a step size of its shape filled with its stage's
    step (α or γ): Meta-SGD's starting point, at which its ``Adapt`` is the plain one."""
    sizes = {BACKBONE: cfg.backbone_lr, GATE: cfg.gate_lr}
    steps = {
        step_size_name(name): torch.full_like(p, sizes[group_of(name)])
        for name, p in params.items()
        if group_of(name) == BACKBONE or (cfg.gating and group_of(name) == GATE)
    }
    return {**params, **steps}


def _stage(
    model: GatedModel, params: Params, group: str, lr: float, support: Batch, cfg: MetaConfig
) -> Params:
    """``inner_steps`` gradient steps on one group, the other group held as given.

    ``torch.func.grad`` over the group alone gives the *partial* gradient the spec writes: after
    a backbone stage theta' depends on phi, and the gate step is d/dphi L(theta', phi) at fixed
    theta', exactly what a target node runs. An enclosing ``torch.func.grad`` (or autograd, when
    ``params`` require grad) still differentiates through the step: that is the second-order
    meta-gradient. A parameter with a learned step size (``step.<name>``) steps by it.
    """
    regularize = cfg.inner_regularized
    names = [name for name in params if group_of(name) == group]
    for _ in range(cfg.inner_steps):

        def loss(sub: Params, params: Params = params) -> Tensor:
            return task_loss(model, {**params, **sub}, support, cfg, regularize)[0]

        grads = torch.func.grad(loss)({name: params[name] for name in names})
        params = {
            **params,
            **{n: params[n] - params.get(step_size_name(n), lr) * grads[n] for n in names},
        }
    return params


def stages(cfg: MetaConfig) -> list[tuple[str, float]]:
    """(group, inner step size) in the configured order; no gate stage when gating is off."""
    order = [(BACKBONE, cfg.backbone_lr), (GATE, cfg.gate_lr)]
    if cfg.order == AdaptOrder.gate_first:
        order.reverse()
    return [(group, lr) for group, lr in order if group != GATE or cfg.gating]


HEAD = ("backbone.head.weight", "backbone.head.bias")


def start_of_task(params: Params, cfg: MetaConfig) -> Params:
    """The parameters a task's adaptation starts from: the meta-initialization, with the head
    zeroed under ``zero_head`` (then the head's meta-gradient is zero: nothing to learn)."""
    if not cfg.zero_head:
        return params
    return {n: torch.zeros_like(p) if n in HEAD else p for n, p in params.items()}


def adapt(model: GatedModel, params: Params, support: Batch, cfg: MetaConfig) -> Params:
    """The two-stage adaptation: the one ``Adapt`` of training, evaluation and deployment.

    A pure function of ``params``: differentiable through ``torch.func`` transforms (the
    meta-gradient, vmapped over tasks or not) and through autograd when ``params`` require grad.
    """
    params = start_of_task(params, cfg)
    for group, lr in stages(cfg):
        params = _stage(model, params, group, lr, support, cfg)
    return params


@torch.no_grad()
def support_statistics(
    model: GatedModel, params: Params, support_x: Tensor, cfg: MetaConfig
) -> list[tuple[Tensor, Tensor]]:
    """Per norm layer (by statistics index), the ``(mean, var)`` of each channel over the
    support set, deterministic gates: what a ``metabn`` node freezes after ``Adapt`` for all its
    later inputs. Conv-N has one norm per conv layer, the ResNets one per conv (shortcuts
    included), see ``gating.model.layout.norm_channels``."""
    out = forward(model, params, support_x, cfg.eval_mode, cfg)
    return [(mean.flatten(), var.flatten()) for mean, var in out.statistics]


def deployed_stats(
    model: GatedModel, params: Params, support_x: Tensor, cfg: MetaConfig
) -> NormStats:
    """The statistics a deployed node classifies with, one input at a time: the frozen support
    statistics (``metabn``), or each input's own (``batch``, the MAML norm at batch size 1)."""
    if cfg.norm is NormKind.batch:
        return NormStats(per_input=True)
    return NormStats(frozen=support_statistics(model, params, support_x, cfg))


@torch.no_grad()
def query_metrics(
    model: GatedModel,
    params: Params,
    support: Batch,
    query: Batch,
    cfg: MetaConfig,
    stats: NormStats | None = None,
) -> dict[str, object]:
    """Query metrics of ``params`` as a deployed node gets them (one input at a time, norm
    statistics ``stats``, by default :func:`deployed_stats` of the support set), and the
    transductive accuracy (norm statistics of the whole query batch) beside it for the
    literature."""
    if stats is None:
        stats = deployed_stats(model, params, support.x, cfg)
    out = forward(model, params, query.x, cfg.eval_mode, cfg, stats)
    batch = forward(model, params, query.x, cfg.eval_mode, cfg)
    metrics: dict[str, object] = {
        "accuracy": accuracy(out.logits, query.y),
        "accuracy_transductive": accuracy(batch.logits, query.y),
        "loss": float(F.cross_entropy(out.logits, query.y)),
        "flops_ratio": flops_ratio(model.spec, out.trace),
        "layer_active": active_channel_ratios(out.trace),
    }
    if cfg.gating:
        metrics["macs"] = float(realized_macs(model.spec, out.trace).mean())
        metrics["open_frequency"] = open_frequencies(out.trace).tolist()
    return metrics
