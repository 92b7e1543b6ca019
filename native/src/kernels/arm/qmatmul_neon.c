/* NEON MatMulNBits kernels over the packed layout (internal.h).
 * int4 nibbles are 0..15 and so valid signed bytes; int8 weights use w-128
 * (signed) and add 128*sumx back with the zero point term. With dotprod each
 * 16-byte piece is one sdot; without, smull(/smlal) into int16 then sadalp
 * into int32. Rows sit in the packed groups in natural lane order. */
#include "../internal.h"

#if EA_ARM64
#include <arm_neon.h>

EA_TARGET_DOTPROD static inline int32x4_t dot16_sdot(int32x4_t acc, int8x16_t w, int8x16_t x) {
    return vdotq_s32(acc, w, x);
}

/* int4: low nibbles x even activations + high nibbles x odd ones */
static inline int32x4_t dot32_smull(int32x4_t acc, int8x16_t wa, int8x16_t xa, int8x16_t wb, int8x16_t xb) {
    int16x8_t lo = vmull_s8(vget_low_s8(wa), vget_low_s8(xa));
    lo = vmlal_s8(lo, vget_low_s8(wb), vget_low_s8(xb));
    int16x8_t hi = vmull_high_s8(wa, xa);
    hi = vmlal_high_s8(hi, wb, xb);
    return vpadalq_s16(vpadalq_s16(acc, lo), hi);
}

/* int8: one 16-byte piece; single products (|p| <= 128*127) fit int16 */
static inline int32x4_t dot16_smull(int32x4_t acc, int8x16_t w, int8x16_t x) {
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(w), vget_low_s8(x)));
    return vpadalq_s16(acc, vmull_high_s8(w, x));
}

static inline void store_group(float *y, int N, int m, int n, float32x4_t v0, float32x4_t v1) {
    float *dst = y + (size_t)m * N + n;
    if (n + EA_QROWS <= N) {
        vst1q_f32(dst, v0);
        vst1q_f32(dst + 4, v1);
    } else {
        float tmp[EA_QROWS];
        vst1q_f32(tmp, v0);
        vst1q_f32(tmp + 4, v1);
        for (int r = 0; n + r < N; r++) dst[r] = tmp[r];
    }
}

/* One row of x against one group of EA_QROWS rows (lanes in row order);
 * BS, BITS, DP and MIN (float minimums, fp16 when mf16) constant at call sites. */
static inline __attribute__((always_inline)) void
group_row(const uint8_t *gp, size_t stride, int nb, int has_zp, int f16, int mf16, const ea_qact *a, int m,
          int BS, int BITS, int DP, int MIN, float32x4_t acc[2]) {
    const int kp = nb * BS, bpb = BS * BITS / 8, subs = bpb / 16;
    const int8_t *x = a->xq + (size_t)m * kp;
    const int32x4_t off = vdupq_n_s32(BITS == 8 ? 128 : 0);
    acc[0] = acc[1] = vdupq_n_f32(0.0f);
    for (int b = 0; b < nb; b++) {
        const uint8_t *p = gp + (size_t)b * stride;
        for (size_t o = 0; o < stride; o += 64) __builtin_prefetch(p + EA_QPREFETCH + o, 0, 3);
        int32x4_t d[EA_QROWS];
        for (int r = 0; r < EA_QROWS; r++) d[r] = vdupq_n_s32(0);
        for (int j = 0; j < subs; j++) {
            const int8x16_t xa = vld1q_s8(x + b * BS + (BITS == 4 ? j * 32 : j * 16));
            const int8x16_t xb = BITS == 4 ? vld1q_s8(x + b * BS + j * 32 + 16) : xa;
            for (int r = 0; r < EA_QROWS; r++) {
                const uint8x16_t v = vld1q_u8(p + ((size_t)j * EA_QROWS + r) * 16);
                if (BITS == 4) { /* x is [even16 | odd16]: low nibbles, then high */
                    const int8x16_t wa = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(15)));
                    const int8x16_t wb = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
                    if (DP) d[r] = dot16_sdot(dot16_sdot(d[r], wa, xa), wb, xb);
                    else d[r] = dot32_smull(d[r], wa, xa, wb, xb);
                } else {
                    const int8x16_t ws = vreinterpretq_s8_u8(veorq_u8(v, vdupq_n_u8(0x80)));
                    d[r] = DP ? dot16_sdot(d[r], ws, xa) : dot16_smull(d[r], ws, xa);
                }
            }
        }
        const uint8_t *sw = p + EA_QROWS * bpb;
        const float32x4_t sx = vdupq_n_f32(a->sx[(size_t)m * nb + b]);
        const int32x4_t sumx = vdupq_n_s32(a->sumx[(size_t)m * nb + b]);
        /* minimum * sx*sumx (ref/qmatmul.c) */
        const float32x4_t xs = vdupq_n_f32(MIN ? a->sx[(size_t)m * nb + b] * (float)a->sumx[(size_t)m * nb + b] : 0.0f);
        const uint8_t *mn = p + EA_QROWS * (bpb + ea_qpack_scale_size(f16));
        for (int h = 0; h < 2; h++) {
            int32x4_t idot = vpaddq_s32(vpaddq_s32(d[4 * h], d[4 * h + 1]), vpaddq_s32(d[4 * h + 2], d[4 * h + 3]));
            int32x4_t zp;
            if (has_zp) {
                const uint8_t *z = p + EA_QROWS * (bpb + ea_qpack_scale_size(f16)) + 4 * h;
                const int32_t zz[4] = {z[0], z[1], z[2], z[3]};
                zp = vld1q_s32(zz);
            } else {
                zp = vdupq_n_s32(MIN ? 0 : BITS == 4 ? 8 : 128);
            }
            idot = vmlaq_s32(idot, vsubq_s32(off, zp), sumx); /* + (off - zp) * sumx */
            const float32x4_t s = vmulq_f32(sx, ea_load4_scales(sw + 4 * h * ea_qpack_scale_size(f16), f16));
            acc[h] = vfmaq_f32(acc[h], s, vcvtq_f32_s32(idot));
            if (MIN) acc[h] = vfmaq_f32(acc[h], ea_load4_scales(mn + 4 * h * ea_qpack_scale_size(mf16), mf16), xs);
        }
    }
}

static inline __attribute__((always_inline)) void
groups_impl(const ea_qweight *w, const ea_qact *a, float *y, int g0, int g1, int BS, int BITS, int DP, int MIN) {
    const size_t stride = ea_qpack_block_stride(w);
    const int nb = w->n_blocks, has_zp = w->zero_points != NULL;
    for (int g = g0; g < g1; g++) {
        const uint8_t *gp = (const uint8_t *)w->packed + (size_t)g * nb * stride;
        /* the group (n_blocks * stride bytes) stays in L1 across the rows of x */
        for (int m = 0; m < a->M; m++) {
            float32x4_t acc[2];
            group_row(gp, stride, nb, has_zp, w->packed_f16, w->packed_min_f16, a, m, BS, BITS, DP, MIN, acc);
            store_group(y, w->N, m, g * EA_QROWS, acc[0], acc[1]);
        }
    }
}

#define GROUPS_BY_SHAPE_MIN(DP, MIN)                                     \
    switch (w->bits * 1000 + w->block_size) {                            \
    case 4032: groups_impl(w, a, y, g0, g1, 32, 4, DP, MIN); break;      \
    case 4064: groups_impl(w, a, y, g0, g1, 64, 4, DP, MIN); break;      \
    case 4128: groups_impl(w, a, y, g0, g1, 128, 4, DP, MIN); break;     \
    case 8032: groups_impl(w, a, y, g0, g1, 32, 8, DP, MIN); break;      \
    case 8064: groups_impl(w, a, y, g0, g1, 64, 8, DP, MIN); break;      \
    default: groups_impl(w, a, y, g0, g1, 128, 8, DP, MIN); break;       \
    }
#define GROUPS_BY_SHAPE(DP)                                              \
    if (w->has_minimums) {                                               \
        GROUPS_BY_SHAPE_MIN(DP, 1)                                       \
    } else {                                                             \
        GROUPS_BY_SHAPE_MIN(DP, 0)                                       \
    }

EA_TARGET_DOTPROD static void groups_dotprod(const ea_qweight *w, const ea_qact *a,
                                                               float *y, int g0, int g1) {
    GROUPS_BY_SHAPE(1)
}

static void groups_plain(const ea_qweight *w, const ea_qact *a, float *y, int g0, int g1) {
    GROUPS_BY_SHAPE(0)
}

void ea_qmatmul_neon(const ea_qweight *w, const ea_qact *a, float *y, int n0, int n1) {
    groups_plain(w, a, y, n0 / EA_QROWS, (n1 + EA_QROWS - 1) / EA_QROWS);
}

void ea_qmatmul_neon_dotprod(const ea_qweight *w, const ea_qact *a, float *y, int n0, int n1) {
    groups_dotprod(w, a, y, n0 / EA_QROWS, (n1 + EA_QROWS - 1) / EA_QROWS);
}

#endif
