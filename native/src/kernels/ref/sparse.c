/* Scalar references of the activation-sparse kernels (semantics: sparse.c): quantization of
 * the active entries, the input-sparse tiles, output rows, and Sparsify's rule. */
#include <float.h>
#include <math.h>
#include <string.h>

#include "../internal.h"

/* nearbyintf for |v| < 2^22 in the default rounding mode (ties to even). Baseline x86-64 has
 * no rounding instruction, so nearbyintf was a libm call per active channel, the largest part
 * of this serial pass; there, adding 1.5 * 2^23 leaves no fraction bits. Only there: with
 * FMA the compiler may fuse the caller's multiply into the add (skipping its rounding), and
 * x87 adds in extended precision; targets with a rounding instruction inline nearbyintf. */
#if defined(__x86_64__) && !defined(__SSE4_1__) && !defined(__FMA__) && FLT_EVAL_METHOD == 0
static inline float round_even_small(float v) {
    const float magic = 12582912.0f;
    return (v + magic) - magic;
}
#else
static inline float round_even_small(float v) { return nearbyintf(v); }
#endif

/* Quantizes the active entries block by block with the arithmetic of
 * ea_quantize_row_scalar; blocks whose active entries are all zero are
 * dropped (they contribute exactly nothing). */
static void quantize_active(const float *x, int bs, const int32_t *active, int n_active, ea_sparse_act *a) {
    a->n_blocks = 0;
    int i = 0, out = 0;
    while (i < n_active) {
        const int b = active[i] / bs;
        const int b_end = (b + 1) * bs; /* the list ascends: a compare, not a division per entry */
        int e = i;
        float amax = 0.0f;
        int finite = 1;
        for (; e < n_active && active[e] < b_end; e++) {
            const float v = fabsf(x[active[e]]);
            finite &= v <= FLT_MAX;
            amax = v > amax ? v : amax; /* fmaxf without the call; a nan is caught by finite */
        }
        float inv = finite && amax != 0.0f ? 127.0f / amax : 0.0f;
        if (inv > FLT_MAX) inv = 0.0f;
        if (!finite || inv != 0.0f) { /* non-finite: a nan scale with no entries poisons the outputs */
            const float scale = finite ? amax / 127.0f : NAN;
            int32_t sum = 0;
            const int start = out;
            for (int j = i; j < e && finite; j++) {
                const float r = round_even_small(x[active[j]] * inv); /* |x * inv| <= 127 + an ulp */
                const int v = r > 127.0f ? 127 : r < -128.0f ? -128 : (int)r;
                if (!v) continue; /* a zero contributes nothing to the integer dot */
                a->ch[out] = active[j];
                a->q[out++] = (int8_t)v;
                sum += v;
            }
            a->blk[a->n_blocks] = b;
            a->start[a->n_blocks] = start;
            a->sx[a->n_blocks] = scale;
            a->sumx[a->n_blocks++] = sum;
        }
        i = e;
    }
    a->start[a->n_blocks] = out;
}

/* Groups each block's entries in quads for the x86 kernels; a short last
 * quad repeats its first channel with value 0 (adds nothing). */
static void make_quads(const ea_sparse_act *a, size_t row_bytes, ea_sparse_act *out) {
    int nq = 0;
    for (int ab = 0; ab < a->n_blocks; ab++) {
        out->qstart[ab] = nq;
        for (int j = a->start[ab]; j < a->start[ab + 1]; j += 4, nq++) {
            uint32_t packed = 0;
            for (int c = 0; c < 4; c++) {
                const int e = j + c < a->start[ab + 1] ? j + c : j;
                out->qoff[4 * (size_t)nq + c] = (size_t)a->ch[e] * row_bytes;
                if (e == j + c) packed |= (uint32_t)(uint8_t)a->q[e] << (8 * c);
            }
            out->qx[nq] = (int32_t)packed;
        }
    }
    out->qstart[a->n_blocks] = nq;
}

void ea_sparse_prep_scalar(const float *x, int bs, const int32_t *active, int n_active, size_t row_bytes, int quads,
                           ea_sparse_act *a) {
    quantize_active(x, bs, active, n_active, a);
    if (quads) make_quads(a, row_bytes, a);
}

void ea_sparse_tiles_scalar(const ea_qweight_cm *cm, const ea_sparse_act *a, float *y, int t0, int t1) {
    const int np = cm->n_pad;
    for (int t = t0; t < t1; t++) {
        float acc[EA_CM_TILE] = {0};
        for (int ab = 0; ab < a->n_blocks; ab++) {
            int32_t idot[EA_CM_TILE] = {0};
            for (int j = a->start[ab]; j < a->start[ab + 1]; j++) {
                const uint8_t *col = cm->data + (size_t)a->ch[j] * (np / 2) + t * EA_CM_TILE / 2;
                for (int n = 0; n < EA_CM_TILE; n++)
                    idot[n] += a->q[j] * ((n & 1) ? col[n / 2] >> 4 : col[n / 2] & 15);
            }
            const size_t sb = (size_t)a->blk[ab] * np + t * EA_CM_TILE;
            for (int lane = 0; lane < EA_CM_TILE; lane++) {
                const int n = ea_cm_lane_n(cm->isa, lane);
                const int zp = cm->zero_points ? cm->zero_points[sb + lane] : cm->minimums ? 0 : 8;
                const float s = a->sx[ab] * ea_cm_scale(cm, sb + lane);
                acc[lane] = fmaf(s, (float)(idot[n] - zp * a->sumx[ab]), acc[lane]);
                if (cm->minimums) acc[lane] = fmaf(ea_cm_min(cm, sb + lane), a->sx[ab] * (float)a->sumx[ab], acc[lane]);
            }
        }
        for (int lane = 0; lane < EA_CM_TILE; lane++) {
            const int n = t * EA_CM_TILE + ea_cm_lane_n(cm->isa, lane);
            if (n < cm->N) y[n] = acc[lane];
        }
    }
}

void ea_rows_scalar(const ea_qweight *w, const ea_qact *a, const int32_t *rows, int n_rows, float *y) {
    for (int i = 0; i < n_rows; i++) ea_qmatmul_rows_scalar(w, a, y, rows[i], rows[i] + 1);
}

int ea_sparsify_scalar(const float *x, const float *thr, int thr_step, const float *col_scale, int k0, int n,
                       float *y, int32_t *active) {
    int na = 0;
    for (int k = k0; k < n; k++) {
        /* branch-free: a data-dependent branch mispredicts half the time at 50% */
        const int keep = fabsf(x[k]) * (col_scale ? col_scale[k] : 1.0f) >= thr[(size_t)k * thr_step];
        y[k] = keep ? x[k] : 0.0f;
        active[na] = k;
        na += keep;
    }
    return na;
}

const uint32_t ea_keep4_lanes[16] = {0x0, 0x0, 0x1, 0x100, 0x2, 0x200, 0x201, 0x20100,
                                     0x3, 0x300, 0x301, 0x30100, 0x302, 0x30200, 0x30201, 0x3020100};
const uint8_t ea_keep4_count[16] = {0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4};
