"""Sliced execution of an adapted gated network: compute only the channels the gates open.

``GatedConvNet`` multiplies closed channels by zero, which costs as much as the dense network.
Here each input runs its gate first (deterministic ``logit > 0``, as ``GateMode.EVAL``) and the
conv then uses only ``weight[open_out][:, open_in]``; norm, ReLU and pooling touch only the open
channels, and the head only the features of the last layer's open channels. This is the
deployment form of an adapted model (:mod:`gating.deploy.model_file` writes and reads it).

Exactness. The norm treats each channel on its own, so dropping a closed channel changes no
other channel. With the node's frozen support statistics (``model.norm=metabn``) the norm and
the conv bias are one per-channel affine map (:func:`norm_affine`); with each input's own
statistics (``batch`` at batch size 1) the bias is a per-channel constant that the mean
subtraction removes, so it is left out. ReLU and max-pooling commute with a monotone map, so
pooling runs on the raw conv output. The outputs equal the masked dense network's with the same
statistics to float rounding (tests/test_sliced.py).

Two backends compute the same thing: ``native`` (default where it builds), the C++ engine of
:mod:`gating.deploy.native`, and ``torch``, the same algorithm in PyTorch ops (``index_select``
of packed per-channel rows, ``conv2d``, ``group_norm`` with one group per channel, strided
max-pool): the fallback without a compiler, and a second independent implementation for the
tests.

A ``SlicedGatedNet`` runs one input at a time and keeps its work buffers between calls; calls on
one instance are serialized by a lock (use one instance per thread for parallel inference).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gating.deploy.checks import Params, Statistics, check_params, checked_statistics
from gating.deploy.native import NativeNet, native_library
from gating.model import ModelSpec, dense_macs, gate_macs, layer_costs
from gating.model.norm import EPS as NORM_EPS

BACKENDS = ("auto", "native", "torch")


# --------------------------------------------------------------------------- torch backend


@dataclass(frozen=True)
class _Layer:
    """One gated conv layer, laid out for gathering by open output channel."""

    # (C_out, C_in*k*k + 2 + E): per output channel its conv weight row, norm gamma, norm beta,
    # then E extra values indexed by this channel: the next gate's fc1 column (hidden values)
    # or, for the last layer, the head weights of this channel's features (S x classes).
    # With frozen statistics gamma and beta are the whole norm's scale and shift instead.
    rows: Tensor
    weight: Tensor  # (C_out, C_in, k, k) contiguous, for the dense path
    gamma: Tensor  # (C_out,)
    beta: Tensor  # (C_out,)
    frozen: bool  # gamma, beta are the norm's affine map (frozen statistics, conv bias folded)
    w1t: Tensor  # (C_in, hidden): this gate's fc1, transposed (the first layer's and dense use)
    b1: Tensor  # (hidden,)
    w2t: Tensor  # (hidden, C_out): this gate's fc2, transposed
    b2: Tensor  # (C_out,)
    in_channels: int
    width: int  # C_in * k * k: where gamma sits in a row
    kernel: int
    even: bool  # even input side: the 2x2 ceil-mode pool needs no padding


def _pool(x: Tensor, even: bool) -> Tensor:
    """2x2 max-pool, ceil mode (as network.py). On even sides two strided maxima, which are
    about 3x faster than ``max_pool2d`` on NCHW at batch size 1 and give the same values."""
    if even:
        rows = torch.maximum(x[:, :, 0::2], x[:, :, 1::2])
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])
    return F.max_pool2d(x, 2, ceil_mode=True)


def _norm(y: Tensor, gamma: Tensor, beta: Tensor, frozen: bool) -> Tensor:
    """The norm of conv outputs ``y`` (1, C, H, W): the frozen affine map, or each channel's
    own statistics (``group_norm`` with one group per channel)."""
    if frozen:
        return torch.addcmul(beta[:, None, None], y, gamma[:, None, None])
    return torch.group_norm(y, y.shape[1], gamma, beta, NORM_EPS)


def norm_affine(spec: ModelSpec, p: Params, statistics: Statistics) -> list[tuple[Tensor, Tensor]]:
    """Per layer the ``(scale, shift)`` that frozen statistics make of norm and conv bias:
    ``norm(conv(x) + b) = conv(x) * scale + shift`` (the engines leave the conv bias out)."""
    affine = []
    for i, (mean, var) in enumerate(statistics):
        gamma = p[f"backbone.blocks.{i}.norm.weight"]
        scale = gamma * torch.rsqrt(var.to(gamma.dtype) + NORM_EPS)
        bias = p[f"backbone.blocks.{i}.conv.bias"]
        shift = p[f"backbone.blocks.{i}.norm.bias"] + (bias - mean.to(gamma.dtype)) * scale
        affine.append((scale, shift))
    return affine


def _torch_layers(
    spec: ModelSpec, p: Params, affine: list[tuple[Tensor, Tensor]] | None
) -> list[_Layer]:
    k = spec.kernel_size
    side = spec.layer_sizes()
    head_spatial = side[-1] ** 2
    channels = [spec.in_channels] + [spec.width] * spec.depth
    # Head weights per last-layer channel c: (S, classes), in the order flatten(1) gives features.
    head = p["backbone.head.weight"].view(spec.num_classes, spec.width, head_spatial)
    head_rows = head.permute(1, 2, 0).reshape(spec.width, head_spatial * spec.num_classes)
    layers = []
    for i in range(spec.depth):
        conv = p[f"backbone.blocks.{i}.conv.weight"]
        if affine is None:
            gamma, beta = p[f"backbone.blocks.{i}.norm.weight"], p[f"backbone.blocks.{i}.norm.bias"]
        else:
            gamma, beta = affine[i]
        extra = p[f"gate.{i + 1}.fc1.weight"].t() if i + 1 < spec.depth else head_rows
        rows = torch.cat([conv.reshape(spec.width, -1), gamma[:, None], beta[:, None], extra], 1)
        layers.append(
            _Layer(
                rows=rows.contiguous(),
                weight=conv.contiguous(),
                gamma=gamma.contiguous(),
                beta=beta.contiguous(),
                frozen=affine is not None,
                w1t=p[f"gate.{i}.fc1.weight"].t().contiguous(),
                b1=p[f"gate.{i}.fc1.bias"].contiguous(),
                w2t=p[f"gate.{i}.fc2.weight"].t().contiguous(),
                b2=p[f"gate.{i}.fc2.bias"].contiguous(),
                in_channels=channels[i],
                width=channels[i] * k * k,
                kernel=k,
                even=side[i] % 2 == 0,
            )
        )
    return layers


# --------------------------------------------------------------------------- the model


class SlicedGatedNet:
    """An adapted gated Conv-N network that runs only its open channels, one input at a time.

    ``forward(x)`` takes one input ``(1, C, H, W)`` and returns its logits ``(1, classes)``;
    :meth:`forward_with_open` also returns the open channel indices of every layer.
    :meth:`forward_dense` runs the plain backbone (no gates, every channel) with the same
    kernels: the fair dense baseline for latency comparisons.

    ``statistics``: the norms' frozen per-channel ``(mean, var)`` per layer (a ``metabn``
    node's support statistics); None normalizes each input with its own statistics.
    ``backend``: ``"native"`` (the C++ engine; an error if it cannot be built), ``"torch"``,
    or ``"auto"`` (native where it builds, else torch with a warning).
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
        if spec.is_resnet:
            raise ValueError(f"SlicedGatedNet runs Conv-N, not {spec.describe()}: use sliced_model")
        self.spec = spec
        self.params = {name: t.detach().to(torch.float32).clone() for name, t in params.items()}
        check_params(spec, self.params)
        self.statistics = None if statistics is None else checked_statistics(spec, statistics)
        affine = (
            None if self.statistics is None else norm_affine(spec, self.params, self.statistics)
        )
        self.metadata: dict[str, object] = {}  # what save() stored alongside, if loaded
        self._input_shape = (1, spec.in_channels, spec.image_size, spec.image_size)
        self._pad = spec.kernel_size // 2
        self._native: NativeNet | None = None
        if backend != "torch":
            lib, reason = native_library()
            if lib is not None:
                self._native = NativeNet(lib, spec, self.params, affine)
            elif backend == "native":
                raise RuntimeError(f"the native backend is unavailable: {reason}")
            else:
                warnings.warn(
                    f"SlicedGatedNet falls back to the (slower) torch backend: {reason}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self.backend = "native" if self._native is not None else "torch"
        self._layers = _torch_layers(spec, self.params, affine)
        self._head_bias = self.params["backbone.head.bias"][None].clone()
        self._head_weight_t = self.params["backbone.head.weight"].t().contiguous()

    # ------------------------------------------------------------------ inference
    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(1, classes)`` of one input ``(1, C, H, W)``, open channels only."""
        self._check_input(x)
        if self._native is not None:
            return self._native.run(x, True, False)[0]
        return self._torch_forward(x)[0]

    def forward_with_open(self, x: Tensor) -> tuple[Tensor, list[np.ndarray]]:
        """Logits and, per gated layer, the sorted indices of the channels its gate opened."""
        self._check_input(x)
        if self._native is not None:
            return self._native.run(x, True, True)
        return self._torch_forward(x)

    def forward_dense(self, x: Tensor) -> Tensor:
        """The plain backbone (gates not evaluated, every channel computed) with the same
        kernels: the dense reference for latency. Equals ``GatedConvNet`` in ``GateMode.OFF``."""
        self._check_input(x)
        if self._native is not None:
            return self._native.run(x, False, False)[0]
        return self._torch_dense(x)

    def _check_input(self, x: Tensor) -> None:
        if x.shape != self._input_shape:
            raise ValueError(
                f"SlicedGatedNet runs one input of shape {self._input_shape}, got {tuple(x.shape)}"
            )

    @torch.inference_mode()
    def _torch_forward(self, x: Tensor) -> tuple[Tensor, list[np.ndarray]]:
        layers = self._layers
        opened: list[np.ndarray] = []
        w1t = layers[0].w1t  # fc1 columns of the open input channels (all image channels)
        in_idx: Tensor | None = None  # None: every input channel is open
        x = x.to(torch.float32)
        for layer in layers:
            gap = x.mean((2, 3))
            hidden = torch.addmm(layer.b1, gap, w1t).relu_()
            logits = torch.addmm(layer.b2, hidden, layer.w2t)
            open_np = np.flatnonzero(logits.numpy()[0] > 0)
            opened.append(open_np)
            out_idx = torch.from_numpy(open_np)
            sub = layer.rows.index_select(0, out_idx)
            width = layer.width
            gamma, beta = sub[:, width], sub[:, width + 1]
            if open_np.size == 0 or x.shape[1] == 0:  # rare; keeps the common path short
                side = (x.shape[2] + 1) // 2
                # No open input: the conv output is a constant per channel, which the norm maps to
                # beta (own statistics: zero variance), or to the frozen map's shift.
                x = beta.relu()[None, :, None, None].expand(1, -1, side, side).contiguous()
            else:
                weight = sub[:, :width].view(-1, layer.in_channels, layer.kernel, layer.kernel)
                if in_idx is not None:
                    weight = weight.index_select(1, in_idx)
                y = _norm(F.conv2d(x, weight, None, 1, self._pad), gamma, beta, layer.frozen)
                x = _pool(y, layer.even).relu_()
            w1t = sub[:, width + 2 :]
            in_idx = out_idx
        # The last layer's rows end with the head weights of its channels: (open * S, classes).
        head = w1t.reshape(-1, self.spec.num_classes)
        return torch.addmm(self._head_bias, x.reshape(1, -1), head), opened

    @torch.inference_mode()
    def _torch_dense(self, x: Tensor) -> Tensor:
        x = x.to(torch.float32)
        for layer in self._layers:
            y = F.conv2d(x, layer.weight, None, 1, self._pad)
            x = _pool(_norm(y, layer.gamma, layer.beta, layer.frozen), layer.even).relu_()
        return torch.addmm(self._head_bias, x.reshape(1, -1), self._head_weight_t)

    def stage_times(self, x: Tensor, dense: bool = False) -> dict[str, float]:
        """Diagnostics (native backend): microseconds one forward spends per stage, keys
        ``input``, ``L{i}.gate`` (gate MLP + weight gather), ``L{i}.conv``, ``L{i}.norm_pool``
        (norm, ReLU, pool), ``head``. ``dense=True`` times :meth:`forward_dense`."""
        if self._native is None:
            raise RuntimeError("stage_times needs the native backend")
        self._check_input(x)
        times = self._native.stage_times(x, gated=not dense) / 1e3
        names = ["input"]
        for i in range(self.spec.depth):
            names += [f"L{i}.gate", f"L{i}.conv", f"L{i}.norm_pool"]
        return dict(zip([*names, "head"], times.tolist(), strict=True))

    # ------------------------------------------------------------------ accounting
    def macs(self, opened: list[np.ndarray]) -> int:
        """MACs of one input with these open channels, counted as gating/model/macs.py does:
        ``k*k*H_out*W_out*active_in*active_out`` per conv, active features x classes for the
        head, plus the gate MLPs in full."""
        costs = layer_costs(self.spec)
        k2 = self.spec.kernel_size**2
        counts = [self.spec.in_channels] + [len(o) for o in opened]
        total = sum(
            k2 * cost.spatial * counts[i] * counts[i + 1] for i, cost in enumerate(costs[:-1])
        )
        total += counts[-1] * costs[-1].spatial * self.spec.num_classes
        return total + gate_macs(self.spec)

    def flops_ratio(self, opened: list[np.ndarray]) -> float:
        """Realized MACs / dense backbone MACs for one input (the project's ``flops_ratio``)."""
        return self.macs(opened) / dense_macs(self.spec)
