/* Scalar references of the float kernels: fp16 conversion, float MatMul, one attention row,
 * SiLU, GELU, and accuracy_level 0..3's dequantized row and dot product. */
#include <math.h>
#include <string.h>

#include "../internal.h"

float ea_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13); /* inf / nan */
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: renormalize */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

uint16_t ea_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0);
    if (ax >= 0x477ff000u) return sign | 0x7c00; /* rounds to >= 65520: inf */
    if (ax < 0x38800000u) { /* below the smallest normal half: subnormal or zero */
        if (ax < 0x33000000u) return sign; /* < half of the smallest subnormal */
        const uint32_t e = ax >> 23, man = (ax & 0x7fffff) | 0x800000;
        const uint32_t shift = 126 - e; /* 14..24 */
        uint32_t v = man >> shift;
        const uint32_t rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (v & 1))) v++;
        return sign | (uint16_t)v;
    }
    uint32_t v = ((ax >> 13) - (112u << 10));
    const uint32_t rem = ax & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (v & 1))) v++;
    return sign | (uint16_t)v;
}

void ea_f16_row_scalar(const uint16_t *src, float *dst, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = ea_f16_to_f32(src[i]);
}

/* Columns [n0, n1) of y, scalar. W16 selects the fp16 table. */
void ea_matmul_cols_scalar(const float *x, int M, int K, const float *W, const uint16_t *W16,
                               int N, float *y, int n0, int n1) {
    for (int m = 0; m < M; m++) {
        float *yr = y + (size_t)m * N;
        for (int n = n0; n < n1; n++) yr[n] = 0.0f;
        for (int k = 0; k < K; k++) {
            const float xv = x[(size_t)m * K + k];
            if (W16) {
                const uint16_t *wr = W16 + (size_t)k * N;
                for (int n = n0; n < n1; n++) yr[n] += xv * ea_f16_to_f32(wr[n]);
            } else {
                const float *wr = W + (size_t)k * N;
                for (int n = n0; n < n1; n++) yr[n] += xv * wr[n];
            }
        }
    }
}

void ea_matmul_f32_scalar(const float *x, int M, int K, const float *W, int N, float *y, int n0, int n1) {
    ea_matmul_cols_scalar(x, M, K, W, NULL, N, y, n0, n1);
}

void ea_matmul_f16_scalar(const float *x, int M, int K, const uint16_t *W, int N, float *y, int n0, int n1) {
    ea_matmul_cols_scalar(x, M, K, NULL, W, N, y, n0, n1);
}

/* out[hd] = softmax(scale * K q) V over cached positions 0..L-1 (K, V rows
 * of hd floats); sc is L floats of scratch. */
void ea_attention_row_scalar(const float *q, const float *kc, const float *vc, int hd, int L, float scale,
                             float *sc, float *out) {
    float mx = -INFINITY;
    for (int t = 0; t < L; t++) {
        const float *kr = kc + (size_t)t * hd;
        float d[4] = {0}; /* independent chains instead of one serial sum */
        int i = 0;
        for (; i + 4 <= hd; i += 4)
            for (int l = 0; l < 4; l++) d[l] += q[i + l] * kr[i + l];
        for (; i < hd; i++) d[0] += q[i] * kr[i];
        sc[t] = ((d[0] + d[1]) + (d[2] + d[3])) * scale;
        if (sc[t] > mx) mx = sc[t];
    }
    float sum = 0.0f;
    for (int t = 0; t < L; t++) {
        sc[t] = expf(sc[t] - mx);
        sum += sc[t];
    }
    const float inv = 1.0f / sum;
    memset(out, 0, sizeof(float) * (size_t)hd);
    for (int t = 0; t < L; t++) {
        const float p = sc[t];
        const float *vr = vc + (size_t)t * hd;
        for (int i = 0; i < hd; i++) out[i] += p * vr[i];
    }
    for (int i = 0; i < hd; i++) out[i] *= inv;
}

/* e^x for x <= 0, the SIMD kernels' polynomial operation for operation (x86/vecmath_avx2.h
 * exp_neg): x = n ln2 + r, |r| <= ln2/2, degree-6 Taylor polynomial of e^r (relative error
 * ~2e-7) by fused multiply-adds, times 2^n; x clamped at -87 (a NaN x too, as the SIMD max). */
static float exp_neg_ref(float x) {
    x = fmaxf(x, -87.0f);
    const float n = rintf(x * 1.44269504088896341f);
    float r = fmaf(-n, 0.693359375f, x);
    r = fmaf(-n, -2.12194440e-4f, r);
    float p = 1.0f / 720;
    p = fmaf(p, r, 1.0f / 120);
    p = fmaf(p, r, 1.0f / 24);
    p = fmaf(p, r, 1.0f / 6);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    const int32_t bits = ((int32_t)n + 127) * (1 << 23);
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* GELU, tanh form (Gemma's gelu_pytorch_tanh): the specification every SIMD variant gives bit
 * for bit, one rounding per statement (no contraction but the explicit fmaf):
 * tanh(z) = sign(z) (1 - e) / (1 + e) with e = exp(-2|z|). */
void ea_gelu_tanh_scalar(const float *x, size_t n, float *y) {
    for (size_t i = 0; i < n; i++) {
        const float v = x[i];
        const float kv = 0.044715f * v;
        const float vv = v * v;
        const float z = 0.7978845608028654f * fmaf(kv, vv, v);
        const float az = fabsf(z);
        const float e = exp_neg_ref(-2.0f * az);
        const float num = 1.0f - e;
        const float den = 1.0f + e;
        const float t = copysignf(num / den, z);
        const float hv = 0.5f * v;
        const float s = 1.0f + t;
        y[i] = hv * s;
    }
}

void ea_silu_mul_scalar(const float *g, const float *u, size_t n, float *y) {
    for (size_t i = 0; i < n; i++) y[i] = g[i] / (1.0f + expf(-g[i])) * (u ? u[i] : 1.0f);
}

void ea_dequant_row_scalar(const ea_qweight *w, int n, float *wf) {
    const int bs = w->block_size, nb = w->n_blocks;
    const size_t row = (size_t)n * nb * bs;
    for (int b = 0; b < nb; b++) {
        const float s = w->scales[(size_t)n * nb + b];
        const int zp = ea_qweight_zp(w, n, b);
        const float mn = w->has_minimums ? w->minimums[(size_t)n * nb + b] : 0.0f;
        for (int i = 0; i < bs; i++) {
            const size_t k = row + (size_t)b * bs + i;
            const int q = w->bits == 8 ? w->data[k] : (k & 1) ? w->data[k / 2] >> 4 : w->data[k / 2] & 15;
            /* float minimums: q*scale + minimum rounded once */
            wf[b * bs + i] = w->has_minimums ? fmaf((float)q, s, mn) : (float)(q - zp) * s;
        }
    }
}

float ea_dot_scalar(const float *a, const float *b, int K) {
    float acc = 0.0f;
    for (int k = 0; k < K; k++) acc = fmaf(a[k], b[k], acc);
    return acc;
}
