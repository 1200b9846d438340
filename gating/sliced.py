"""Sliced execution of an adapted gated network: compute only the channels the gates open.

``GatedConvNet`` multiplies closed channels by zero, which costs as much as the dense network.
Here each input runs its gate first (deterministic ``logit > 0``, as ``GateMode.EVAL``) and the
conv then uses only ``weight[open_out][:, open_in]``; norm, ReLU and pooling touch only the open
channels, and the head only the features of the last layer's open channels. This is the
deployment form of an adapted model: :meth:`SlicedGatedNet.save` writes one torch file (the spec
as a dict plus the parameters), :meth:`SlicedGatedNet.load` reads it back.

Exactness. ``BatchStatNorm`` normalises each channel on its own; at batch size 1 its statistics
are the sample's own mean and variance over (H, W), so dropping a closed channel changes no other
channel. The conv bias is a per-channel constant that the norm's mean subtraction removes, so it
is left out. ReLU and max-pooling commute (both monotone), so ReLU runs after the pool. The
outputs equal the masked dense network's to float rounding (tests/test_sliced.py).

Two backends compute the same thing:

- ``native`` (default where a C compiler is found): the whole forward pass is one call into a
  small C engine, compiled on first use with ``cc -O3 -march=native`` and cached. At batch size 1
  every PyTorch op costs microseconds of dispatch and allocation, as much as a whole small conv
  here, and a sliced pass needs about 20 of them per layer (gate MLP, index, gathers, conv, norm,
  pool): in PyTorch it is *slower* than the dense network (see BENCHMARKS.md). The engine runs the
  gate MLP, then a register-blocked vector conv straight from zero-padded planes (no im2col) that
  reads ``weight[open_out][:, open_in]`` through the open indices (nothing is copied), then norm,
  ReLU and pooling fused in one pass that writes the next layer's padded input. Its dense mode
  (:meth:`SlicedGatedNet.forward_dense`) runs the same kernels over every channel: the fair dense
  reference.
- ``torch``: the same algorithm in PyTorch ops (``index_select`` of packed per-channel rows,
  ``conv2d``, ``group_norm`` with one group per channel, strided max-pool); the fallback without a
  compiler, and a second independent implementation for the tests.

A ``SlicedGatedNet`` runs one input at a time and keeps its work buffers between calls; calls on
one instance are serialized by a lock (use one instance per thread for parallel inference).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gating.macs import dense_macs, gate_macs, layer_costs
from gating.network import BatchStatNorm, GatedConvNet, ModelSpec

FORMAT = "metagater-sliced/1"
NORM_EPS = BatchStatNorm(1).eps  # the network's norm epsilon (its parameters do not hold it)
BACKENDS = ("auto", "native", "torch")

Params = Mapping[str, Tensor]


# --------------------------------------------------------------------------- native engine

_C_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define VEC 16   /* floats per vector */
#define COLS 32  /* output positions per micro-kernel block (2 vectors) */
#define SLACK 96 /* floats after the last padded plane: the kernel may read past it */

typedef float vf __attribute__((vector_size(VEC * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VEC * sizeof(int32_t))));

/* GCC folds loads into FMA operands and then reloads each input vector once per output row;
 * an empty asm that claims to modify the register keeps one load per vector (x86 only). */
#if defined(__x86_64__) || defined(__i386__)
#define KEEP_IN_REGISTER(x) __asm__("" : "+v"(x))
#else
#define KEEP_IN_REGISTER(x) ((void)0)
#endif

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline int round_up(int x, int m) { return (x + m - 1) / m * m; }
static inline vf vmax(vf a, vf b) {
    const vi m = a > b;
    return (vf)((m & (vi)a) | (~m & (vi)b));
}
static inline float hsum(vf v) {
    float t = 0.f;
    for (int i = 0; i < VEC; i++) t += v[i];
    return t;
}

typedef struct {
    int depth, width, in_channels, image, classes, hidden, kk;
    const float **conv;   /* per layer (width, c_in*kk*kk) */
    const float **gamma, **beta;
    const float **w1t;    /* per layer (c_in, hidden): gate fc1 transposed */
    const float **b1;
    const float **w2t;    /* per layer (hidden, width): gate fc2 transposed */
    const float **b2;
    const float *head_w, *head_b;
    int *side;            /* input side of each layer, then the head's */
    int *cin;
    float **xp;           /* per layer: padded input planes, only open channels, compact */
    float **valid;        /* per layer: 1 on the valid columns of the padded grid, 0 on junk */
    float *out, *feat, *gap, *hid, *logit, *tmp;
    int ldo;
    int32_t *opened;      /* (depth, width) open channel indices, caller-owned */
    int32_t *counts;      /* (depth,) */
    int32_t *all;         /* 0..max_channels-1 */
    double *timing;       /* optional stage times (ns), see net_set_timing */
} Net;

/* Diagnostics: when `timing` is not NULL, each forward writes the nanoseconds it spent in each
 * stage: [input, then per layer (gate, conv, norm + pool + ReLU), then head]. */
void net_set_timing(Net *n, double *timing) { n->timing = timing; }

static inline double clock_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}
#define STAGE(i)                                                                                \
    do {                                                                                        \
        if (n->timing) {                                                                        \
            const double now = clock_ns();                                                      \
            n->timing[(i)] = now - mark;                                                        \
            mark = now;                                                                         \
        }                                                                                       \
    } while (0)

void net_free(Net *n) {
    if (!n) return;
    for (int l = 0; n->xp && l < n->depth; l++) free(n->xp[l]);
    for (int l = 0; n->valid && l < n->depth; l++) free(n->valid[l]);
    free(n->xp); free(n->valid); free(n->conv); free(n->gamma); free(n->beta); free(n->w1t);
    free(n->b1); free(n->w2t); free(n->b2); free(n->side); free(n->cin); free(n->out);
    free(n->feat); free(n->gap); free(n->hid); free(n->logit); free(n->tmp); free(n->all);
    free(n);
}

/* ptrs per layer: conv, gamma, beta, w1t, b1, w2t, b2; then head_w, head_b. The arrays stay
 * owned by the caller and must outlive the Net. */
Net *net_new(int depth, int width, int in_channels, int image, int classes, int hidden, int kk,
             const float **ptrs, int32_t *opened, int32_t *counts) {
    Net *n = calloc(1, sizeof(Net));
    if (!n) return NULL;
    n->depth = depth; n->width = width; n->in_channels = in_channels; n->image = image;
    n->classes = classes; n->hidden = hidden; n->kk = kk; n->opened = opened; n->counts = counts;
#define ALLOC(f, cnt) n->f = calloc((size_t)(cnt), sizeof(*n->f))
    ALLOC(conv, depth); ALLOC(gamma, depth); ALLOC(beta, depth); ALLOC(w1t, depth);
    ALLOC(b1, depth); ALLOC(w2t, depth); ALLOC(b2, depth); ALLOC(side, depth + 1);
    ALLOC(cin, depth); ALLOC(xp, depth); ALLOC(valid, depth);
    int ok = n->conv && n->gamma && n->beta && n->w1t && n->b1 && n->w2t && n->b2 && n->side &&
             n->cin && n->xp && n->valid;
    if (!ok) { net_free(n); return NULL; }
    for (int l = 0; l < depth; l++) {
        const float **p = ptrs + 7 * l;
        n->conv[l] = p[0]; n->gamma[l] = p[1]; n->beta[l] = p[2]; n->w1t[l] = p[3];
        n->b1[l] = p[4]; n->w2t[l] = p[5]; n->b2[l] = p[6];
    }
    n->head_w = ptrs[7 * depth]; n->head_b = ptrs[7 * depth + 1];
    const int maxc = in_channels > width ? in_channels : width;
    n->side[0] = image;
    for (int l = 0; l < depth; l++) n->side[l + 1] = (n->side[l] + 1) / 2;
    n->ldo = 0;
    for (int l = 0; l < depth && ok; l++) {
        const int s = n->side[l], sp = s + kk - 1, cols = round_up(s * sp, COLS);
        n->cin[l] = l == 0 ? in_channels : width;
        n->xp[l] = calloc((size_t)n->cin[l] * sp * sp + SLACK + kk * sp, sizeof(float));
        n->valid[l] = calloc((size_t)cols, sizeof(float));
        ok = n->xp[l] && n->valid[l];
        for (int p = 0; ok && p < s * sp; p++) n->valid[l][p] = p % sp < s ? 1.f : 0.f;
        if (cols > n->ldo) n->ldo = cols;
    }
    ALLOC(out, (size_t)width * n->ldo + SLACK);
    ALLOC(feat, (size_t)width * n->side[depth] * n->side[depth] + SLACK);
    ALLOC(gap, maxc + 1); ALLOC(hid, hidden + 1); ALLOC(logit, width + 1);
    ALLOC(tmp, 2 * image + 8); ALLOC(all, maxc);
    ok = ok && n->out && n->feat && n->gap && n->hid && n->logit && n->tmp && n->all;
    if (!ok) { net_free(n); return NULL; }
    for (int i = 0; i < maxc; i++) n->all[i] = i;
    return n;
}

/* out[r, p] = sum_{c,kh,kw} w_r[in_idx[c], kh, kw] * xp[c, p + kh*sp + kw] for R output rows,
 * whose weights start at wrow[r] (rows of the full (c_in, kk, kk) weight: nothing is gathered),
 * and p0 <= p < p1 in steps of NV vectors. xp holds only the open input channels; p = h*sp + w
 * walks the zero-padded grid, so columns w >= s are junk that nobody reads. The R x NV block of
 * outputs stays in vector registers (R*NV accumulators hide the FMA latency). */
#define CONV_KERNEL(R, NV)                                                                      \
    static void conv_##R##x##NV(const float *restrict xp, int n_in, const int32_t *in_idx,     \
                                int plane, int sp, int kk, const float *const *wrow,           \
                                float *restrict out, int ldo, int p0, int p1) {                 \
        const int kq = kk * kk;                                                                 \
        for (int p = p0; p + NV * VEC <= p1; p += NV * VEC) {                                   \
            vf a[R][NV];                                                                        \
            for (int r = 0; r < R; r++)                                                         \
                for (int v = 0; v < NV; v++) a[r][v] = (vf){0};                                 \
            for (int c = 0; c < n_in; c++) {                                                    \
                const float *xc = xp + (size_t)c * plane + p;                                   \
                const float *wc[R];                                                             \
                for (int r = 0; r < R; r++) wc[r] = wrow[r] + (size_t)in_idx[c] * kq;           \
                for (int kh = 0, t = 0; kh < kk; kh++) {                                        \
                    for (int kw = 0; kw < kk; kw++, t++) {                                      \
                        const float *src = xc + kh * sp + kw;                                   \
                        vf x[NV];                                                               \
                        for (int v = 0; v < NV; v++) {                                          \
                            x[v] = load(src + v * VEC);                                         \
                            KEEP_IN_REGISTER(x[v]);                                             \
                        }                                                                       \
                        for (int r = 0; r < R; r++)                                             \
                            for (int v = 0; v < NV; v++) a[r][v] += wc[r][t] * x[v];            \
                    }                                                                           \
                }                                                                               \
            }                                                                                   \
            for (int r = 0; r < R; r++)                                                         \
                for (int v = 0; v < NV; v++) store(out + (size_t)r * ldo + p + v * VEC, a[r][v]); \
        }                                                                                       \
    }
CONV_KERNEL(8, 2)
CONV_KERNEL(7, 2)
CONV_KERNEL(6, 2)
CONV_KERNEL(5, 4)
CONV_KERNEL(5, 2)
CONV_KERNEL(4, 4)
CONV_KERNEL(4, 2)
CONV_KERNEL(3, 4)
CONV_KERNEL(3, 2)
CONV_KERNEL(2, 8)
CONV_KERNEL(2, 4)
CONV_KERNEL(2, 2)
CONV_KERNEL(1, 8)
CONV_KERNEL(1, 4)
CONV_KERNEL(1, 2)

typedef void (*conv_kernel)(const float *restrict, int, const int32_t *, int, int, int,
                            const float *const *, float *restrict, int, int, int);
/* KERNELS[R][i]: R output rows, 2 << i vectors of columns (0 where not built) */
static const conv_kernel KERNELS[9][3] = {
    {0, 0, 0},
    {conv_1x2, conv_1x4, conv_1x8},
    {conv_2x2, conv_2x4, conv_2x8},
    {conv_3x2, conv_3x4, 0},
    {conv_4x2, conv_4x4, 0},
    {conv_5x2, conv_5x4, 0},
    {conv_6x2, 0, 0},
    {conv_7x2, 0, 0},
    {conv_8x2, 0, 0},
};

/* The conv of the open output channels open[0..n_out) from the open inputs in_idx[0..n_in):
 * blocks of 8 rows, then one block of the rest. Each block keeps at least 12 accumulators (FMA
 * latency): fewer rows take more columns at a time (then the rest in narrower steps). */
static void conv_open(const float *restrict xp, int n_in, const int32_t *in_idx, int plane,
                      int sp, int kk, const float *w, int K, const int32_t *open, int n_out,
                      float *restrict out, int ldo, int ncols) {
    const float *rows[8];
    for (int j = 0; j < n_out; j += 8) {
        const int R = n_out - j < 8 ? n_out - j : 8;
        for (int r = 0; r < R; r++) rows[r] = w + (size_t)open[j + r] * K;
        float *o = out + (size_t)j * ldo;
        int p = 0;
        for (int i = R >= 6 ? 0 : R >= 3 ? 1 : 2; i >= 0; i--) {
            const int step = (2 << i) * VEC, end = p + (ncols - p) / step * step;
            if (end > p) KERNELS[R][i](xp, n_in, in_idx, plane, sp, kk, rows, o, ldo, p, end);
            p = end;
        }
    }
}

/* Norm (the channel's own mean and variance over its s*s valid positions), 2x2 ceil-mode
 * max-pool and ReLU of one conv output row; writes the pooled channel with row stride `ld` into
 * dst and returns its sum (the next gate's average pool). Pooling runs on the raw values (max,
 * or min where the norm's scale is negative) and the affine map once per pooled value: a
 * monotone map commutes with max, so this equals norm -> ReLU -> pool. */
static float norm_pool(const float *restrict row, const float *restrict valid, int s, int sp,
                       float gamma, float beta, float *restrict dst, int ld,
                       float *restrict tmp) {
    /* One vectorized pass: junk columns are multiplied by 0; values are shifted by the first
     * one against cancellation. */
    const int count = s * s, span = s * sp;
    const float first = row[0];
    vf s0 = {0}, s1 = {0}, q0 = {0}, q1 = {0};
    int p = 0;
    for (; p + 2 * VEC <= span; p += 2 * VEC) {
        const vf d0 = (load(row + p) - first) * load(valid + p);
        const vf d1 = (load(row + p + VEC) - first) * load(valid + p + VEC);
        s0 += d0; q0 += d0 * d0; s1 += d1; q1 += d1 * d1;
    }
    for (; p < span; p += VEC) { /* valid is 0 past span (it is padded to COLS) */
        const vf d0 = (load(row + p) - first) * load(valid + p);
        s0 += d0; q0 += d0 * d0;
    }
    const float shifted = hsum(s0 + s1) / count;
    float var = hsum(q0 + q1) / count - shifted * shifted;
    var = var > 0.f ? var : 0.f;
    const float mean = first + shifted;
    const float scale = gamma / sqrtf(var + 1e-5f);
    const float shift = beta - mean * scale;
    const int s2 = (s + 1) / 2;
    const float sign = scale < 0.f ? -1.f : 1.f, mag = scale * sign;
    float total = 0.f;
    if (s % 2 == 0) {
        /* 32 input columns of a row pair -> 16 pooled values: vertical max, then the max of
         * the even and odd lanes. Reads past the row end land in junk or slack. */
        vf sum = {0};
        const vf zero = {0};
        const vi lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
        for (int i = 0; i < s2; i++) {
            const float *r0 = row + (2 * i) * sp, *r1 = r0 + sp;
            for (int c = 0; c < s; c += 2 * VEC) {
                const vf a0 = vmax(sign * load(r0 + c), sign * load(r1 + c));
                const vf a1 = vmax(sign * load(r0 + c + VEC), sign * load(r1 + c + VEC));
                const vf even = __builtin_shufflevector(a0, a1, 0, 2, 4, 6, 8, 10, 12, 14, 16,
                                                        18, 20, 22, 24, 26, 28, 30);
                const vf odd = __builtin_shufflevector(a0, a1, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19,
                                                       21, 23, 25, 27, 29, 31);
                vf y = vmax(vmax(even, odd) * mag + shift, zero);
                y = (vf)((vi)y & (lanes < s2 - c / 2)); /* lanes past the row: 0 */
                /* A whole vector is stored: the zero lanes land on padding (which stays 0) or
                 * on places written later (next rows, next channel) or on slack. */
                store(dst + i * ld + c / 2, y);
                sum += y;
            }
        }
        return hsum(sum);
    }
    float *pair = tmp + s + 1;
    for (int i = 0; i < s2; i++) {
        const float *r0 = row + (2 * i) * sp;
        const float *r1 = 2 * i + 1 < s ? r0 + sp : r0;
        for (int w = 0; w < s; w++) {
            const float u = sign * r0[w], v = sign * r1[w];
            tmp[w] = u > v ? u : v;
        }
        for (int j = 0; j < s / 2; j++) {
            const float u = tmp[2 * j], v = tmp[2 * j + 1];
            pair[j] = u > v ? u : v;
        }
        pair[s2 - 1] = tmp[s - 1]; /* ceil mode: the last column pools alone */
        float *d = dst + i * ld;
        for (int j = 0; j < s2; j++) {
            float v = pair[j] * mag + shift;
            v = v > 0.f ? v : 0.f;
            d[j] = v;
            total += v;
        }
    }
    return total;
}

/* One input (in_channels, image, image) -> logits (classes). gated=0: the plain backbone with
 * every channel (the dense reference: same kernels, no gates). Returns 0. */
int net_forward(Net *n, const float *restrict x, float *restrict logits, int gated) {
    const int kk = n->kk, pad = kk / 2, width = n->width, hidden = n->hidden;
    double mark = n->timing ? clock_ns() : 0.0;
    /* Layer 0's input: the image into its padded planes, and its average pool. */
    {
        const int s = n->side[0], sp = s + kk - 1, plane = sp * sp;
        for (int c = 0; c < n->in_channels; c++) {
            float sum = 0.f;
            for (int h = 0; h < s; h++) {
                const float *src = x + ((size_t)c * s + h) * s;
                float *dst = n->xp[0] + (size_t)c * plane + (h + pad) * sp + pad;
                memcpy(dst, src, s * sizeof(float));
                for (int w = 0; w < s; w++) sum += src[w];
            }
            n->gap[c] = sum / (s * s);
        }
    }
    STAGE(0);
    const int32_t *in_idx = n->all;
    int n_in = n->in_channels;
    for (int l = 0; l < n->depth; l++) {
        const int s = n->side[l], sp = s + kk - 1, plane = sp * sp;
        const int K = n->cin[l] * kk * kk;
        int32_t *open = n->opened + (size_t)l * width;
        int n_out = 0;
        if (gated) {
            /* gate: GAP(open inputs) -> fc1 -> ReLU -> fc2; open where logit > 0 */
            float *hid = n->hid, *logit = n->logit;
            memcpy(hid, n->b1[l], hidden * sizeof(float));
            for (int i = 0; i < n_in; i++) {
                const float g = n->gap[i], *wr = n->w1t[l] + (size_t)in_idx[i] * hidden;
                for (int h = 0; h < hidden; h++) hid[h] += wr[h] * g;
            }
            memcpy(logit, n->b2[l], width * sizeof(float));
            for (int h = 0; h < hidden; h++) {
                const float a = hid[h] > 0.f ? hid[h] : 0.f, *wr = n->w2t[l] + (size_t)h * width;
                for (int o = 0; o < width; o++) logit[o] += wr[o] * a;
            }
            for (int o = 0; o < width; o++)
                if (logit[o] > 0.f) open[n_out++] = o;
        } else {
            for (int o = 0; o < width; o++) open[o] = o;
            n_out = width;
        }
        n->counts[l] = n_out;
        STAGE(1 + 3 * l);
        const int ncols = round_up(s * sp, COLS);
        conv_open(n->xp[l], n_in, in_idx, plane, sp, kk, n->conv[l], K, open, n_out, n->out,
                  n->ldo, ncols);
        STAGE(2 + 3 * l);
        const int s2 = n->side[l + 1], last = l + 1 == n->depth;
        const int sp2 = s2 + kk - 1, plane2 = sp2 * sp2;
        for (int j = 0; j < n_out; j++) {
            const int o = open[j];
            float *dst = last ? n->feat + (size_t)j * s2 * s2
                              : n->xp[l + 1] + (size_t)j * plane2 + pad * sp2 + pad;
            const float total = norm_pool(n->out + (size_t)j * n->ldo, n->valid[l], s, sp,
                                          n->gamma[l][o], n->beta[l][o], dst,
                                          last ? s2 : sp2, n->tmp);
            n->gap[j] = total / (s2 * s2);
        }
        STAGE(3 + 3 * l);
        in_idx = open;
        n_in = n_out;
    }
    /* head over the open features of the last layer */
    const int S = n->side[n->depth] * n->side[n->depth], F = width * S;
    for (int k = 0; k < n->classes; k++) {
        float a = n->head_b[k];
        const float *wr = n->head_w + (size_t)k * F;
        for (int j = 0; j < n_in; j++) {
            const float *wc = wr + (size_t)in_idx[j] * S, *f = n->feat + (size_t)j * S;
            for (int q = 0; q < S; q++) a += wc[q] * f[q];
        }
        logits[k] = a;
    }
    STAGE(1 + 3 * n->depth);
    return 0;
}
"""

_CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-std=gnu11", "-fPIC"]


def _cache_dir() -> Path:
    """``$METAGATER_CACHE``, else ``$XDG_CACHE_HOME/metagater``, else ``~/.cache/metagater``;
    a temporary folder where that cannot be created (a read-only home)."""
    if os.environ.get("METAGATER_CACHE"):
        folder = Path(os.environ["METAGATER_CACHE"])
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        folder = Path(base) / "metagater"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir()) / "metagater-cache"
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def _cpu_key() -> str:
    """What ``-march=native`` depends on: a library built for one CPU may not run on another."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


@functools.cache
def _native_library() -> tuple[ctypes.CDLL | None, str]:
    """Compile (once per source, flags and CPU; cached on disk) and load the C engine.

    Returns ``(library, "")``, or ``(None, reason)`` when there is no working compiler.
    """
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (cc, gcc or $CC) found"
    key = hashlib.sha256("\0".join([_C_SOURCE, compiler, *_CFLAGS, _cpu_key()]).encode())
    target = _cache_dir() / f"sliced-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                source = Path(tmp) / "sliced.c"
                source.write_text(_C_SOURCE)
                built = Path(tmp) / target.name
                cmd = [compiler, *_CFLAGS, "-shared", "-o", str(built), str(source), "-lm"]
                result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                if result.returncode != 0:
                    return None, f"compiling the C engine failed: {result.stderr.strip()[-500:]}"
                os.replace(built, target)  # atomic: concurrent builders never see half a file
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"building or loading the C engine failed: {error}"
    lib.net_new.restype = ctypes.c_void_p
    lib.net_new.argtypes = [ctypes.c_int] * 7 + [ctypes.c_void_p] * 3
    lib.net_forward.restype = ctypes.c_int
    lib.net_forward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.net_free.restype = None
    lib.net_free.argtypes = [ctypes.c_void_p]
    lib.net_set_timing.restype = None
    lib.net_set_timing.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    return lib, ""


def native_available() -> tuple[bool, str]:
    """Whether the native backend can be used here, and if not, why."""
    lib, reason = _native_library()
    return lib is not None, reason


class _NativeNet:
    """The C engine's view of one network: owns the weight arrays the engine points into."""

    def __init__(self, lib: ctypes.CDLL, spec: ModelSpec, params: Params) -> None:
        self._lib = lib
        self._keep: list[np.ndarray] = []
        pointers: list[int] = []

        def add(array: np.ndarray) -> None:
            array = np.ascontiguousarray(array, dtype=np.float32)
            self._keep.append(array)
            pointers.append(array.ctypes.data)

        for i in range(spec.depth):
            add(params[f"backbone.blocks.{i}.conv.weight"].numpy().reshape(spec.width, -1))
            add(params[f"backbone.blocks.{i}.norm.weight"].numpy())
            add(params[f"backbone.blocks.{i}.norm.bias"].numpy())
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
            table,
            self.opened.ctypes.data,
            self.counts.ctypes.data,
        )
        if not handle:
            raise MemoryError("the C engine could not allocate its work buffers")
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
        """Nanoseconds of one forward per stage (see ``net_set_timing`` in the C source)."""
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


# --------------------------------------------------------------------------- torch backend


@dataclass(frozen=True)
class _Layer:
    """One gated conv layer, laid out for gathering by open output channel."""

    # (C_out, C_in*k*k + 2 + E): per output channel its conv weight row, norm gamma, norm beta,
    # then E extra values indexed by this channel: the next gate's fc1 column (hidden values)
    # or, for the last layer, the head weights of this channel's features (S x classes).
    rows: Tensor
    weight: Tensor  # (C_out, C_in, k, k) contiguous, for the dense path
    gamma: Tensor  # (C_out,)
    beta: Tensor  # (C_out,)
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


def _torch_layers(spec: ModelSpec, p: Params) -> list[_Layer]:
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
        gamma = p[f"backbone.blocks.{i}.norm.weight"]
        beta = p[f"backbone.blocks.{i}.norm.bias"]
        extra = p[f"gate.{i + 1}.fc1.weight"].t() if i + 1 < spec.depth else head_rows
        rows = torch.cat([conv.reshape(spec.width, -1), gamma[:, None], beta[:, None], extra], 1)
        layers.append(
            _Layer(
                rows=rows.contiguous(),
                weight=conv.contiguous(),
                gamma=gamma.contiguous(),
                beta=beta.contiguous(),
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

    ``backend``: ``"native"`` (the C engine; an error if it cannot be built), ``"torch"``, or
    ``"auto"`` (native where it builds, else torch with a warning).
    """

    def __init__(self, spec: ModelSpec, params: Params, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.spec = spec
        self.params = {name: t.detach().to(torch.float32).clone() for name, t in params.items()}
        _check_params(spec, self.params)
        self.metadata: dict[str, object] = {}  # what save() stored alongside, if loaded
        self._input_shape = (1, spec.in_channels, spec.image_size, spec.image_size)
        self._pad = spec.kernel_size // 2
        self._native: _NativeNet | None = None
        if backend != "torch":
            lib, reason = _native_library()
            if lib is not None:
                self._native = _NativeNet(lib, spec, self.params)
            elif backend == "native":
                raise RuntimeError(f"the native backend is unavailable: {reason}")
            else:
                warnings.warn(
                    f"SlicedGatedNet falls back to the (slower) torch backend: {reason}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self.backend = "native" if self._native is not None else "torch"
        self._layers = _torch_layers(spec, self.params)
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
                # No open input: the conv output is a constant per channel, the norm gives beta.
                x = beta.relu()[None, :, None, None].expand(1, -1, side, side).contiguous()
            else:
                weight = sub[:, :width].view(-1, layer.in_channels, layer.kernel, layer.kernel)
                if in_idx is not None:
                    weight = weight.index_select(1, in_idx)
                y = F.conv2d(x, weight, None, 1, self._pad)
                y = torch.group_norm(y, y.shape[1], gamma, beta, NORM_EPS)
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
            y = torch.group_norm(y, y.shape[1], layer.gamma, layer.beta, NORM_EPS)
            x = _pool(y, layer.even).relu_()
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
        """MACs of one input with these open channels, counted as gating/macs.py does:
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

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str], **metadata: object) -> None:
        """Write the exported model: one torch file with the spec (a dict), the parameters and
        any plain metadata (where it came from, its accuracy, ...)."""
        torch.save(
            {
                "format": FORMAT,
                "spec": dataclasses.asdict(self.spec),
                "params": self.params,
                "metadata": dict(metadata),
            },
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str], backend: str = "auto") -> SlicedGatedNet:
        """Read a file written by :meth:`save` (``weights_only``: loading runs no code)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"{path} is not an exported sliced model ({FORMAT})")
        model = cls(ModelSpec(**state["spec"]), state["params"], backend=backend)
        model.metadata = dict(state.get("metadata", {}))
        return model


def _check_params(spec: ModelSpec, params: Params) -> None:
    """Names and shapes exactly as ``GatedConvNet(spec).named_parameters()``."""
    expected = {n: tuple(t.shape) for n, t in GatedConvNet(spec).named_parameters()}
    given = {n: tuple(t.shape) for n, t in params.items()}
    missing = sorted(set(expected) - set(given))
    unknown = sorted(set(given) - set(expected))
    wrong = sorted(n for n in set(expected) & set(given) if expected[n] != given[n])
    if missing or unknown or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
            for what, names in (("missing", missing), ("unknown", unknown), ("shape", wrong))
            if names
        )
        raise ValueError(f"parameters do not match the model spec {spec} ({detail})")
