/* The sliced engine: one input through the open channels of an adapted gated Conv-N network.
 * Built by torch.utils.cpp_extension.load (gating/deploy/native.py) as a plain shared library
 * with a C ABI, and called through ctypes. Written in the C subset of C++ with GCC vector
 * extensions. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define VEC 16   /* floats per vector */
#define COLS 32  /* output positions per micro-kernel block (2 vectors) */
#define SLACK 96 /* floats after the last padded plane: the kernel may read past it */
#define restrict __restrict__
#define EXPORT extern "C" __attribute__((visibility("default")))

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
    int frozen;           /* 1: gamma and beta are a frozen norm's scale and shift */
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
EXPORT void net_set_timing(Net *n, double *timing) { n->timing = timing; }

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

EXPORT void net_free(Net *n) {
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
EXPORT Net *net_new(int depth, int width, int in_channels, int image, int classes, int hidden,
                    int kk, int frozen, const float **ptrs, int32_t *opened, int32_t *counts) {
    Net *n = (Net *)calloc(1, sizeof(Net));
    if (!n) return NULL;
    n->depth = depth; n->width = width; n->in_channels = in_channels; n->image = image;
    n->classes = classes; n->hidden = hidden; n->kk = kk; n->opened = opened; n->counts = counts;
    n->frozen = frozen;
#define ALLOC(f, cnt) n->f = (decltype(n->f))calloc((size_t)(cnt), sizeof(*n->f))
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
        n->xp[l] = (float *)calloc((size_t)n->cin[l] * sp * sp + SLACK + kk * sp, sizeof(float));
        n->valid[l] = (float *)calloc((size_t)cols, sizeof(float));
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
                for (int v = 0; v < NV; v++) a[r][v] = vf{};                                 \
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

/* The channel's norm as an affine map: given (frozen statistics: gamma and beta are already
 * its scale and shift), or from the channel's own mean and variance over its s*s valid
 * positions (one vectorized pass: junk columns are multiplied by 0; values are shifted by the
 * first one against cancellation). */
static void norm_affine(const float *restrict row, const float *restrict valid, int s, int sp,
                        float gamma, float beta, int frozen, float *scale, float *shift) {
    if (frozen) {
        *scale = gamma;
        *shift = beta;
        return;
    }
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
    *scale = gamma / sqrtf(var + 1e-5f);
    *shift = beta - mean * *scale;
}

/* Norm, 2x2 ceil-mode max-pool and ReLU of one conv output row; writes the pooled channel with
 * row stride `ld` into dst and returns its sum (the next gate's average pool). Pooling runs on
 * the raw values (max, or min where the norm's scale is negative) and the affine map once per
 * pooled value: a monotone map commutes with max, so this equals norm -> ReLU -> pool. */
static float norm_pool(const float *restrict row, const float *restrict valid, int s, int sp,
                       float gamma, float beta, int frozen, float *restrict dst, int ld,
                       float *restrict tmp) {
    float scale, shift;
    norm_affine(row, valid, s, sp, gamma, beta, frozen, &scale, &shift);
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
EXPORT int net_forward(Net *n, const float *restrict x, float *restrict logits, int gated) {
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
                                          n->gamma[l][o], n->beta[l][o], n->frozen, dst,
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
