"""The C++ sliced engine (``engine.cpp``): built on first use, called through ctypes.

``torch.utils.cpp_extension.load`` compiles it as a plain shared library (no Python binding:
a C ABI is all ctypes needs), caches the build under ``$TORCH_EXTENSIONS_DIR`` and rebuilds when
the source or the flags change. ``-march=native`` ties a build to a CPU, so the CPU is part of
the extension's name.

Why a hand-written engine at all: at batch size 1 every PyTorch op costs microseconds of
dispatch and allocation, as much as a whole small conv here, and a sliced pass needs about 20
of them per layer: in PyTorch ops the sliced network is *slower* than the dense one (see
BENCHMARKS.md). The engine runs the gate MLP, then a register-blocked vector conv straight from
zero-padded planes (no im2col) that reads ``weight[open_out][:, open_in]`` through the open
indices, then norm, ReLU and pooling fused in one pass that writes the next layer's input.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import platform
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gating.model import ModelSpec

SOURCE = Path(__file__).with_name("engine.cpp")
CFLAGS = ["-O3", "-march=native", "-fno-math-errno"]


def _cpu_key() -> str:
    """What ``-march=native`` depends on: a library built for one CPU may not run on another."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:12]


@functools.cache
def native_library() -> tuple[ctypes.CDLL | None, str]:
    """The loaded engine, or ``(None, reason)`` where it cannot be built here."""
    try:
        from torch.utils.cpp_extension import load

        path = load(
            name=f"metagater_sliced_{_cpu_key()}",
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            is_python_module=False,
            verbose=False,
        )
        lib = ctypes.CDLL(str(path))
    except Exception as error:  # no compiler, no ninja, a failed build: the torch backend runs
        return None, f"building the C++ engine failed: {str(error).strip()[-500:]}"
    lib.net_new.restype = ctypes.c_void_p
    lib.net_new.argtypes = [ctypes.c_int] * 8 + [ctypes.c_void_p] * 3
    lib.net_forward.restype = ctypes.c_int
    lib.net_forward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.net_free.restype = None
    lib.net_free.argtypes = [ctypes.c_void_p]
    lib.net_set_timing.restype = None
    lib.net_set_timing.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    return lib, ""


def native_available() -> tuple[bool, str]:
    """Whether the native backend can be used here, and if not, why."""
    lib, reason = native_library()
    return lib is not None, reason


class NativeNet:
    """The engine's view of one network: owns the weight arrays the engine points into."""

    def __init__(
        self,
        lib: ctypes.CDLL,
        spec: ModelSpec,
        params: Mapping[str, Tensor],
        affine: list[tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        """``affine``: per layer the frozen norm's ``(scale, shift)``; None: each input's own
        statistics (then gamma and beta go in their place)."""
        self._lib = lib
        self._keep: list[np.ndarray] = []
        pointers: list[int] = []

        def add(array: np.ndarray) -> None:
            array = np.ascontiguousarray(array, dtype=np.float32)
            self._keep.append(array)
            pointers.append(array.ctypes.data)

        for i in range(spec.depth):
            add(params[f"backbone.blocks.{i}.conv.weight"].numpy().reshape(spec.width, -1))
            if affine is None:
                add(params[f"backbone.blocks.{i}.norm.weight"].numpy())
                add(params[f"backbone.blocks.{i}.norm.bias"].numpy())
            else:
                add(affine[i][0].numpy())
                add(affine[i][1].numpy())
            add(params[f"gate.{i}.fc1.weight"].numpy().T)  # (C_in, hidden)
            add(params[f"gate.{i}.fc1.bias"].numpy())
            add(params[f"gate.{i}.fc2.weight"].numpy().T)  # (hidden, C_out)
            add(params[f"gate.{i}.fc2.bias"].numpy())
        add(params["backbone.head.weight"].numpy())
        add(params["backbone.head.bias"].numpy())
        self.opened = np.zeros((spec.depth, spec.width), dtype=np.int32)
        self.counts = np.zeros(spec.depth, dtype=np.int32)
        table = (ctypes.c_void_p * len(pointers))(*pointers)
        handle = lib.net_new(
            spec.depth,
            spec.width,
            spec.in_channels,
            spec.image_size,
            spec.num_classes,
            spec.gate_hidden,
            spec.kernel_size,
            int(affine is not None),
            table,
            self.opened.ctypes.data,
            self.counts.ctypes.data,
        )
        if not handle:
            raise MemoryError("the C++ engine could not allocate its work buffers")
        self._handle = handle
        self._finalizer = weakref.finalize(self, lib.net_free, handle)
        self._lock = threading.Lock()
        self._classes = spec.num_classes
        self._forward = lib.net_forward

    def run(self, x: Tensor, gated: bool, want_open: bool) -> tuple[Tensor, list[np.ndarray]]:
        """Kept lean: at batch size 1 a few microseconds of Python are a visible share."""
        if not (x.is_cpu and x.dtype is torch.float32 and x.is_contiguous()):
            x = x.to("cpu", torch.float32).contiguous()
        logits = torch.empty(1, self._classes)
        with self._lock:
            self._forward(self._handle, x.data_ptr(), logits.data_ptr(), gated)
            if not want_open:
                return logits, []
            return logits, [self.opened[i, :c].copy() for i, c in enumerate(self.counts)]

    def stage_times(self, x: Tensor, gated: bool) -> np.ndarray:
        """Nanoseconds of one forward per stage (see ``net_set_timing`` in the source)."""
        times = np.zeros(2 + 3 * len(self.counts), dtype=np.float64)
        x = x.to("cpu", torch.float32).contiguous()
        logits = torch.empty(1, self._classes)
        with self._lock:
            self._lib.net_set_timing(self._handle, times.ctypes.data)
            try:
                self._forward(self._handle, x.data_ptr(), logits.data_ptr(), int(gated))
            finally:
                self._lib.net_set_timing(self._handle, None)
        return times
