"""Sliced execution of an adapted gated ResNet: compute only the channels the gates open.

The ResNet counterpart of :mod:`gating.deploy.sliced` (Conv-N), in PyTorch ops. Each input runs
every residual block's gate first (deterministic ``logit > 0``, as ``GateMode.EVAL``); the
block's inner convs then use only ``weight[open_out][:, open_in]`` (the first conv reads the
whole block input; the last conv computes every output channel from the open channels of the one
before), and the residual path (last conv, shortcut, sum, ReLU, pool) runs whole, as in
:class:`gating.model.GatedResNet` (gates per residual block after Bejnordi et al., ICLR 2020).

Exactness. :class:`gating.model.norm.StatNorm` normalises each channel on its own, so leaving a
closed channel out changes no other channel. With frozen statistics (a ``metabn`` node's support
statistics) every norm is the per-channel affine map ``y * scale + shift`` of
:func:`resnet_norm_affine`; without, each input is normalised with its own statistics over (H, W)
(``group_norm`` with one group per channel), what a batch-statistics model gets at batch size 1.
The outputs equal the masked dense network's to float rounding (tests/test_resnet.py).

Only the ``torch`` backend exists here: the C++ engine (:mod:`gating.deploy.native`) runs Conv-N.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from conf.choices import ModelArch
from gating.deploy.checks import Params, Statistics, check_params, checked_statistics
from gating.model import ModelSpec, dense_macs, macs_of_masks
from gating.model.layout import gate_shapes, has_projection, resnet_blocks
from gating.model.norm import EPS as NORM_EPS
from gating.model.resnet import conv_norm_names

BACKENDS = ("auto", "native", "torch")


@dataclass(frozen=True)
class _ConvNorm:
    """A conv and its norm, gathered by output channel: ``gamma``, ``beta`` are the norm's
    weight and bias (own statistics) or its frozen affine map (``frozen``)."""

    weight: Tensor  # (C_out, C_in, k, k)
    gamma: Tensor  # (C_out,)
    beta: Tensor  # (C_out,)
    stride: int
    frozen: bool

    def run(self, x: Tensor, out_idx: Tensor | None = None, in_idx: Tensor | None = None) -> Tensor:
        """conv -> norm of one input ``x`` (1, C_in', H, W), whose channels are ``in_idx`` of
        the conv's inputs (None: all), for output channels ``out_idx`` (None: all)."""
        weight, gamma, beta = self.weight, self.gamma, self.beta
        if out_idx is not None:
            weight = weight.index_select(0, out_idx)
            gamma, beta = gamma.index_select(0, out_idx), beta.index_select(0, out_idx)
        if in_idx is not None:
            weight = weight.index_select(1, in_idx)
        side = -(-x.shape[2] // self.stride), -(-x.shape[3] // self.stride)
        if weight.shape[0] == 0:  # every output closed: nothing to compute
            return x.new_zeros(1, 0, *side)
        if weight.shape[1] == 0:  # every input closed: the conv output is 0 (no bias)
            y = x.new_zeros(1, weight.shape[0], *side)
        else:
            y = F.conv2d(x, weight, None, self.stride, weight.shape[-1] // 2)
        if self.frozen:
            return torch.addcmul(beta[:, None, None], y, gamma[:, None, None])
        return torch.group_norm(y, y.shape[1], gamma, beta, NORM_EPS)


@dataclass(frozen=True)
class _Block:
    convs: list[_ConvNorm]  # the inner convs (gated outputs), then the last one
    shortcut: _ConvNorm | None  # None: the identity
    pool: bool
    width: int
    w1t: Tensor  # (C_in, hidden): the gate's fc1, transposed
    b1: Tensor
    w2t: Tensor  # (hidden, gated channels): the gate's fc2, transposed
    b2: Tensor


def resnet_norm_affine(
    spec: ModelSpec, params: Params, statistics: Statistics
) -> list[tuple[Tensor, Tensor]]:
    """Per norm layer the ``(scale, shift)`` that frozen statistics make of it:
    ``norm(y) = y * scale + shift`` (the convs have no bias)."""
    affine = []
    for name, (mean, var) in zip(conv_norm_names(spec), statistics, strict=True):
        gamma = params[f"{name}.norm.weight"]
        scale = gamma * torch.rsqrt(var.to(gamma.dtype) + NORM_EPS)
        affine.append((scale, params[f"{name}.norm.bias"] - mean.to(gamma.dtype) * scale))
    return affine


class SlicedGatedResNet:
    """An adapted gated ResNet-12 / ResNet-18 that runs only its open channels, one input at a
    time (the interface of :class:`gating.deploy.SlicedGatedNet`).

    Parameters
    ----------
    spec
        The network (``arch`` resnet12 or resnet18).
    params
        Its parameters by name, as ``GatedResNet(spec).named_parameters()``.
    backend
        ``"torch"`` or ``"auto"`` (the same here); ``"native"`` is refused: the C++ engine
        runs Conv-N only.
    statistics
        The norms' frozen per-channel ``(mean, var)`` by statistics index (a ``metabn`` node's
        support statistics); None normalizes each input with its own statistics.

    Notes
    -----
    ``forward(x)`` takes one input ``(1, C, H, W)`` and returns its logits ``(1, classes)``;
    :meth:`forward_with_open` also returns, per gate, the sorted indices of the channels it
    opened (columns of the gate's output: a ResNet-12 block's first conv, then its second).
    """

    def __init__(
        self,
        spec: ModelSpec,
        params: Params,
        backend: str = "auto",
        statistics: Statistics | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "native":
            raise RuntimeError(
                f"the native backend runs Conv-N only, not {spec.describe()}: use backend torch"
            )
        if not spec.is_resnet:
            raise ValueError(f"SlicedGatedResNet runs the ResNets, not {spec.describe()}")
        self.spec = spec
        self.backend = "torch"
        self.params = {name: t.detach().to(torch.float32).clone() for name, t in params.items()}
        check_params(spec, self.params)
        self.statistics = None if statistics is None else checked_statistics(spec, statistics)
        self.metadata: dict[str, object] = {}  # what save() stored alongside, if loaded
        self._input_shape = (1, spec.in_channels, spec.image_size, spec.image_size)
        self._stem, self._blocks = self._layers()
        self._head_bias = self.params["backbone.head.bias"][None].clone()
        self._head_weight_t = self.params["backbone.head.weight"].t().contiguous()

    def _layers(self) -> tuple[_ConvNorm | None, list[_Block]]:
        spec, p = self.spec, self.params
        names = conv_norm_names(spec)
        frozen = self.statistics is not None
        if frozen:
            affine = resnet_norm_affine(spec, p, self.statistics)
        else:
            affine = [(p[f"{n}.norm.weight"], p[f"{n}.norm.bias"]) for n in names]
        layers = iter(zip(names, affine, strict=True))

        def conv_norm(stride: int) -> _ConvNorm:
            name, (gamma, beta) = next(layers)
            weight = p[f"{name}.conv.weight"].contiguous()
            return _ConvNorm(weight, gamma.contiguous(), beta.contiguous(), stride, frozen)

        stem = None if spec.arch is ModelArch.resnet12 else conv_norm(1)
        blocks = []
        convs = spec.gated_convs_per_block + 1
        for index, (c_in, width, stride, _) in enumerate(resnet_blocks(spec)):
            inner = [conv_norm(stride if j == 0 else 1) for j in range(convs)]
            projection = has_projection(spec, c_in, width, stride)
            gate = f"gate.{index}"
            blocks.append(
                _Block(
                    convs=inner,
                    shortcut=conv_norm(stride) if projection else None,
                    pool=spec.arch is ModelArch.resnet12,
                    width=width,
                    w1t=p[f"{gate}.fc1.weight"].t().contiguous(),
                    b1=p[f"{gate}.fc1.bias"].contiguous(),
                    w2t=p[f"{gate}.fc2.weight"].t().contiguous(),
                    b2=p[f"{gate}.fc2.bias"].contiguous(),
                )
            )
        return stem, blocks

    # ------------------------------------------------------------------ inference
    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(1, classes)`` of one input ``(1, C, H, W)``, open channels only."""
        return self.forward_with_open(x)[0]

    def forward_with_open(self, x: Tensor) -> tuple[Tensor, list[np.ndarray]]:
        """Logits and, per gate, the sorted indices of the channels it opened."""
        self._check_input(x)
        return self._run(x, gated=True)

    def forward_dense(self, x: Tensor) -> Tensor:
        """The plain backbone (gates not evaluated, every channel computed) with the same ops:
        the dense reference. Equals ``GatedResNet`` in ``GateMode.OFF``."""
        self._check_input(x)
        return self._run(x, gated=False)[0]

    def _check_input(self, x: Tensor) -> None:
        if x.shape != self._input_shape:
            raise ValueError(
                f"SlicedGatedResNet runs one input of shape {self._input_shape}, "
                f"got {tuple(x.shape)}"
            )

    @torch.inference_mode()
    def _run(self, x: Tensor, gated: bool) -> tuple[Tensor, list[np.ndarray]]:
        x = x.to(torch.float32)
        if self._stem is not None:
            x = self._stem.run(x).relu_()
        opened: list[np.ndarray] = []
        for block in self._blocks:
            h, in_idx = x, None
            if gated:
                hidden = torch.addmm(block.b1, x.mean((2, 3)), block.w1t).relu_()
                logits = torch.addmm(block.b2, hidden, block.w2t)
                open_np = np.flatnonzero(logits.numpy()[0] > 0)
                opened.append(open_np)
            for j, conv in enumerate(block.convs[:-1]):
                out_idx = None
                if gated:
                    start = j * block.width
                    chosen = open_np[(open_np >= start) & (open_np < start + block.width)]
                    out_idx = torch.from_numpy(chosen - start)
                h = conv.run(h, out_idx, in_idx).relu_()
                in_idx = out_idx
            h = block.convs[-1].run(h, None, in_idx)
            shortcut = x if block.shortcut is None else block.shortcut.run(x)
            x = (h + shortcut).relu_()
            if block.pool:
                x = F.max_pool2d(x, 2, ceil_mode=True)
        logits = torch.addmm(self._head_bias, x.mean((2, 3)), self._head_weight_t)
        return logits, opened

    # ------------------------------------------------------------------ accounting
    def macs(self, opened: list[np.ndarray]) -> int:
        """MACs of one input with these open channels, counted as ``gating.model.macs`` does
        (from the same layer description): inner convs from their open input and output
        channels, the residual path and the head in full, plus the gate MLPs in full."""
        masks = []
        for shape, indices in zip(gate_shapes(self.spec), opened, strict=True):
            mask = torch.zeros(1, shape.out_channels, dtype=torch.float64)
            mask[0, torch.as_tensor(np.asarray(indices), dtype=torch.long)] = 1.0
            masks.append(mask)
        return int(macs_of_masks(self.spec, masks)[0])

    def flops_ratio(self, opened: list[np.ndarray]) -> float:
        """Realized MACs / dense backbone MACs for one input (the project's ``flops_ratio``)."""
        return self.macs(opened) / dense_macs(self.spec)
