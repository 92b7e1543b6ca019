/* NEON float kernels: float MatMul, fp16 rows, GELU, and accuracy_level 0..3's dequantized
 * row and dot product. */
#include <math.h>
#include <string.h>

#include "../internal.h"

#if EA_ARM64
#include <arm_neon.h>

/* e^x for x <= 0: ref/float.c's exp_neg_ref four lanes wide (maxnm: a NaN lane clamps to -87
 * as the scalar fmaxf; the conversion of the integral n truncates exactly). */
static inline float32x4_t exp_neg4(float32x4_t x) {
    x = vmaxnmq_f32(x, vdupq_n_f32(-87.0f));
    const float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504088896341f)));
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t p = vdupq_n_f32(1.0f / 720);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 120), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 24), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 6), p, r);
    p = vfmaq_f32(vdupq_n_f32(0.5f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(e));
}

/* GELU, tanh form: ea_gelu_tanh_scalar's operations four lanes at a time. */
void ea_gelu_tanh_neon(const float *x, size_t n, float *y) {
    const float32x4_t one = vdupq_n_f32(1.0f), half = vdupq_n_f32(0.5f), m2 = vdupq_n_f32(-2.0f);
    const float32x4_t c = vdupq_n_f32(0.7978845608028654f), k = vdupq_n_f32(0.044715f);
    const uint32x4_t sign = vdupq_n_u32(0x80000000u);
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t v = vld1q_f32(x + i);
        const float32x4_t z = vmulq_f32(c, vfmaq_f32(v, vmulq_f32(k, v), vmulq_f32(v, v)));
        const float32x4_t e = exp_neg4(vmulq_f32(m2, vabsq_f32(z)));
        const float32x4_t t = vdivq_f32(vsubq_f32(one, e), vaddq_f32(one, e));
        const uint32x4_t zs = vandq_u32(vreinterpretq_u32_f32(z), sign); /* t >= +0: z's sign */
        const float32x4_t tz = vreinterpretq_f32_u32(vorrq_u32(vreinterpretq_u32_f32(t), zs));
        vst1q_f32(y + i, vmulq_f32(vmulq_f32(half, v), vaddq_f32(one, tz)));
    }
    ea_gelu_tanh_scalar(x + i, n - i, y + i);
}

void ea_f16_row_neon(const uint16_t *src, float *dst, size_t n) {
    size_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(dst + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(src + i))));
    for (; i < n; i++) dst[i] = ea_f16_to_f32(src[i]);
}

static inline float32x4_t load4(const float *W, const uint16_t *W16, size_t i) {
    return W16 ? vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(W16 + i))) : vld1q_f32(W + i);
}

static inline void matmul_neon(const float *x, int M, int K, const float *W, const uint16_t *W16,
                               int N, float *y, int n0, int n1) {
    int n = n0;
    for (; n + 16 <= n1; n += 16) {
        int m = 0;
        for (; m + 4 <= M; m += 4) {
            float32x4_t acc[4][4];
            for (int t = 0; t < 4; t++)
                for (int j = 0; j < 4; j++) acc[t][j] = vdupq_n_f32(0.0f);
            for (int k = 0; k < K; k++) {
                float32x4_t w[4];
                for (int j = 0; j < 4; j++) w[j] = load4(W, W16, (size_t)k * N + n + 4 * j);
                for (int t = 0; t < 4; t++) {
                    const float xv = x[(size_t)(m + t) * K + k];
                    for (int j = 0; j < 4; j++) acc[t][j] = vfmaq_n_f32(acc[t][j], w[j], xv);
                }
            }
            for (int t = 0; t < 4; t++)
                for (int j = 0; j < 4; j++) vst1q_f32(y + (size_t)(m + t) * N + n + 4 * j, acc[t][j]);
        }
        for (; m < M; m++) {
            float32x4_t acc[4];
            for (int j = 0; j < 4; j++) acc[j] = vdupq_n_f32(0.0f);
            for (int k = 0; k < K; k++) {
                const float xv = x[(size_t)m * K + k];
                for (int j = 0; j < 4; j++) acc[j] = vfmaq_n_f32(acc[j], load4(W, W16, (size_t)k * N + n + 4 * j), xv);
            }
            for (int j = 0; j < 4; j++) vst1q_f32(y + (size_t)m * N + n + 4 * j, acc[j]);
        }
    }
    if (n < n1) ea_matmul_cols_scalar(x, M, K, W, W16, N, y, n, n1);
}

void ea_matmul_f32_neon(const float *x, int M, int K, const float *W, int N, float *y, int n0, int n1) {
    matmul_neon(x, M, K, W, NULL, N, y, n0, n1);
}
void ea_matmul_f16_neon(const float *x, int M, int K, const uint16_t *W, int N, float *y, int n0, int n1) {
    matmul_neon(x, M, K, NULL, W, N, y, n0, n1);
}

/* (q - zp) * s, or with float minimums (zp 0) fma(q, s, mn): ea_dequant_row_scalar's bits */
static inline void store8_neon(float *dst, uint8x8_t bytes, int32x4_t zp, float32x4_t s, int has_min, float32x4_t mn) {
    const int16x8_t q = vreinterpretq_s16_u16(vmovl_u8(bytes));
    const int32x4_t a = vsubq_s32(vmovl_s16(vget_low_s16(q)), zp), b = vsubq_s32(vmovl_s16(vget_high_s16(q)), zp);
    if (has_min) {
        vst1q_f32(dst, vfmaq_f32(mn, vcvtq_f32_s32(a), s));
        vst1q_f32(dst + 4, vfmaq_f32(mn, vcvtq_f32_s32(b), s));
        return;
    }
    vst1q_f32(dst, vmulq_f32(vcvtq_f32_s32(a), s));
    vst1q_f32(dst + 4, vmulq_f32(vcvtq_f32_s32(b), s));
}

void ea_dequant_row_neon(const ea_qweight *w, int n, float *wf) {
    const int bs = w->block_size, nb = w->n_blocks, hm = w->has_minimums;
    const uint8_t *src = w->data + (size_t)n * nb * bs * w->bits / 8;
    for (int b = 0; b < nb; b++) {
        const float32x4_t s = vdupq_n_f32(w->scales[(size_t)n * nb + b]);
        const int32x4_t zp = vdupq_n_s32(ea_qweight_zp(w, n, b));
        const float32x4_t mn = vdupq_n_f32(hm ? w->minimums[(size_t)n * nb + b] : 0.0f);
        float *dst = wf + (size_t)b * bs;
        if (w->bits == 8) {
            for (int i = 0; i < bs; i += 8) store8_neon(dst + i, vld1_u8(src + b * bs + i), zp, s, hm, mn);
            continue;
        }
        for (int i = 0; i < bs; i += 32) {
            const uint8x16_t v = vld1q_u8(src + (b * bs + i) / 2);
            const uint8x16x2_t e = vzipq_u8(vandq_u8(v, vdupq_n_u8(0x0F)), vshrq_n_u8(v, 4)); /* natural order */
            store8_neon(dst + i, vget_low_u8(e.val[0]), zp, s, hm, mn);
            store8_neon(dst + i + 8, vget_high_u8(e.val[0]), zp, s, hm, mn);
            store8_neon(dst + i + 16, vget_low_u8(e.val[1]), zp, s, hm, mn);
            store8_neon(dst + i + 24, vget_high_u8(e.val[1]), zp, s, hm, mn);
        }
    }
}

float ea_dot_neon(const float *a, const float *b, int K) {
    float32x4_t acc[4] = {vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0)};
    int k = 0;
    for (; k + 16 <= K; k += 16)
        for (int j = 0; j < 4; j++) acc[j] = vfmaq_f32(acc[j], vld1q_f32(a + k + 4 * j), vld1q_f32(b + k + 4 * j));
    for (; k + 4 <= K; k += 4) acc[0] = vfmaq_f32(acc[0], vld1q_f32(a + k), vld1q_f32(b + k));
    float r = vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
    for (; k < K; k++) r = fmaf(a[k], b[k], r);
    return r;
}
#endif
