/* AVX2 float kernels: one attention row, SiLU, float MatMul columns, fp16 rows, and
 * accuracy_level 0..3's dequantized row and dot product, GELU (AVX2 and AVX-512; contracts:
 * their scalar references in ref/float.c).
 *
 * Attention of one query row over L cached positions.
 *
 * Decode spends its non-matmul time here: the scalar loop's dot product is
 * one serial chain of hd dependent adds per position and its softmax one
 * libm expf per position. Here eight positions (four on a short tail or
 * when hd is not a multiple of 8) are dotted at once with independent
 * accumulators, exp is a vector polynomial (relative error ~2e-7, inside
 * the kernel test's 1e-5), and the weighted sum of V keeps 64 outputs in
 * registers. Accumulators are named variables: GCC -O2 kept arrays of them
 * on the stack, each fma waiting on a store (docs/performance.md, "attention"). */
#include "../internal.h"

#if EA_X86
#include <math.h>
#include <string.h>

#include "vecmath_avx2.h"

AVX2 static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}


AVX2 static inline float dot_tail(const float *a, const float *b, int i, int n, float d) {
    for (; i < n; i++) d += a[i] * b[i];
    return d;
}

/* out[hd] = softmax(scale * K q) V over positions 0..L-1; sc holds L floats. */
AVX2 void ea_attention_row_avx2(const float *q, const float *kc, const float *vc, int hd, int L, float scale,
                                float *sc, float *out) {
    const int hv = hd & ~7;
    int t = 0;
    __m128 m4 = _mm_set1_ps(-INFINITY);
    if (hv == hd) /* eight positions: eight independent chains cover the fma latency (four left it half idle) */
        for (; t + 8 <= L; t += 8) {
            const float *k0 = kc + (size_t)t * hd;
            if (t + 24 <= L) /* two steps ahead: in decode the cache is cold (the weights streamed through since) */
                for (int i = 0; i < 8 * hd; i += 16) _mm_prefetch((const char *)(k0 + 16 * (size_t)hd + i), _MM_HINT_T0);
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
            for (int i = 0; i < hd; i += 8) { /* named: an array of them went to the stack */
                const __m256 qv = _mm256_loadu_ps(q + i);
                a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + i), a0);
                a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + hd + i), a1);
                a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 2 * hd + i), a2);
                a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 3 * hd + i), a3);
                a4 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 4 * hd + i), a4);
                a5 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 5 * hd + i), a5);
                a6 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 6 * hd + i), a6);
                a7 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 7 * hd + i), a7);
            }
            /* lanes [0..3 | 4..7] of position sums: the low halves' partial sums, then the high ones' */
            const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
            const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
            const __m256 s8 = _mm256_mul_ps(_mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31)),
                                            _mm256_set1_ps(scale));
            _mm256_storeu_ps(sc + t, s8);
            m4 = _mm_max_ps(m4, _mm_max_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1)));
        }
    for (; t + 4 <= L; t += 4) {
        const float *k0 = kc + (size_t)t * hd;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int i = 0; i < hv; i += 8) {
            const __m256 qv = _mm256_loadu_ps(q + i);
            a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + i), a0);
            a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + hd + i), a1);
            a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 2 * hd + i), a2);
            a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 3 * hd + i), a3);
        }
        /* four horizontal sums at once: [a0 a1 a2 a3] lanes */
        const __m256 h01 = _mm256_hadd_ps(a0, a1), h23 = _mm256_hadd_ps(a2, a3);
        const __m256 h = _mm256_hadd_ps(h01, h23);
        __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        if (hv < hd) {
            float tl[4];
            _mm_storeu_ps(tl, s4);
            for (int u = 0; u < 4; u++) tl[u] = dot_tail(q, k0 + (size_t)u * hd, hv, hd, tl[u]);
            s4 = _mm_loadu_ps(tl);
        }
        s4 = _mm_mul_ps(s4, _mm_set1_ps(scale));
        _mm_storeu_ps(sc + t, s4);
        m4 = _mm_max_ps(m4, s4);
    }
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float mx = _mm_cvtss_f32(m4);
    for (; t < L; t++) {
        const float *kr = kc + (size_t)t * hd;
        __m256 a = _mm256_setzero_ps();
        for (int i = 0; i < hv; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(kr + i), a);
        sc[t] = dot_tail(q, kr, hv, hd, hsum(a)) * scale;
        if (sc[t] > mx) mx = sc[t];
    }
    /* exponentials and their sum */
    const __m256 vm = _mm256_set1_ps(mx);
    __m256 vs = _mm256_setzero_ps();
    int u = 0;
    for (; u + 8 <= L; u += 8) {
        const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(sc + u), vm));
        _mm256_storeu_ps(sc + u, e);
        vs = _mm256_add_ps(vs, e);
    }
    if (u < L) {
        float tmp[8] = {0};
        memcpy(tmp, sc + u, sizeof(float) * (size_t)(L - u));
        const __m256 mask = _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7),
                                          _mm256_set1_ps((float)(L - u)), _CMP_LT_OQ);
        const __m256 e = _mm256_and_ps(exp_neg(_mm256_sub_ps(_mm256_loadu_ps(tmp), vm)), mask);
        _mm256_storeu_ps(tmp, e);
        memcpy(sc + u, tmp, sizeof(float) * (size_t)(L - u));
        vs = _mm256_add_ps(vs, e);
    }
    const float inv = 1.0f / hsum(vs);
    /* weighted sum of V rows, 64 outputs per pass held in registers */
    for (int i0 = 0; i0 < hv; i0 += 64) {
        const int w = hv - i0 < 64 ? hv - i0 : 64;
        __m256 o[8];
        for (int c = 0; c < 8; c++) o[c] = _mm256_setzero_ps();
        if (w == 64) { /* named accumulators: as an array GCC kept them in memory, each fma waiting on a store */
            __m256 o0 = o[0], o1 = o[1], o2 = o[2], o3 = o[3], o4 = o[4], o5 = o[5], o6 = o[6], o7 = o[7];
            for (int tt = 0; tt < L; tt++) {
                const __m256 p = _mm256_set1_ps(sc[tt]);
                const float *vr = vc + (size_t)tt * hd + i0;
                if (tt + 8 < L) /* a row ahead per row */
                    for (int i = 0; i < 64; i += 16) _mm_prefetch((const char *)(vr + 8 * (size_t)hd + i), _MM_HINT_T0);
                o0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr), o0);
                o1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8), o1);
                o2 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 16), o2);
                o3 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 24), o3);
                o4 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 32), o4);
                o5 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 40), o5);
                o6 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 48), o6);
                o7 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 56), o7);
            }
            o[0] = o0; o[1] = o1; o[2] = o2; o[3] = o3; o[4] = o4; o[5] = o5; o[6] = o6; o[7] = o7;
        } else {
            for (int tt = 0; tt < L; tt++) {
                const __m256 p = _mm256_set1_ps(sc[tt]);
                const float *vr = vc + (size_t)tt * hd + i0;
                for (int c = 0; c < w / 8; c++) o[c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8 * c), o[c]);
            }
        }
        const __m256 vi = _mm256_set1_ps(inv);
        for (int c = 0; c < w / 8; c++) _mm256_storeu_ps(out + i0 + 8 * c, _mm256_mul_ps(o[c], vi));
    }
    for (int i = hv; i < hd; i++) {
        float o = 0.0f;
        for (int tt = 0; tt < L; tt++) o += sc[tt] * vc[(size_t)tt * hd + i];
        out[i] = o * inv;
    }
}

/* ---- SiLU ---- */
/* y = g * sigmoid(g) * u (u NULL: no factor), sigmoid from e = exp(-|g|) so
 * exp_neg's domain holds: 1/(1+e) for g >= 0, e/(1+e) below. */
AVX2 static inline __attribute__((always_inline)) void silu_body(const float *g, const float *u, size_t n, float *y,
                                                               int has_u) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 e = exp_neg(_mm256_or_ps(x, sign)); /* -|x| */
        const __m256 num = _mm256_blendv_ps(one, e, x); /* sign bit set: x < 0 (or -0) */
        const __m256 s = _mm256_mul_ps(x, _mm256_div_ps(num, _mm256_add_ps(one, e)));
        _mm256_storeu_ps(y + i, has_u ? _mm256_mul_ps(s, _mm256_loadu_ps(u + i)) : s);
    }
    ea_silu_mul_scalar(g + i, has_u ? u + i : NULL, n - i, y + i);
}

AVX2 void ea_silu_mul_avx2(const float *g, const float *u, size_t n, float *y) {
    if (u) silu_body(g, u, n, y, 1);
    else silu_body(g, NULL, n, y, 0);
}

/* ---- GELU, tanh form ---- */
/* ea_gelu_tanh_scalar's operations: tanh(z) = sign(z) (1 - e) / (1 + e) with e = exp(-2|z|),
 * exp_neg's domain. */
AVX2 void ea_gelu_tanh_avx2(const float *x, size_t n, float *y) {
    const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f), sign = _mm256_set1_ps(-0.0f);
    const __m256 c = _mm256_set1_ps(0.7978845608028654f), k = _mm256_set1_ps(0.044715f), m2 = _mm256_set1_ps(-2.0f);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256 z = _mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(k, v), _mm256_mul_ps(v, v), v));
        const __m256 e = exp_neg(_mm256_mul_ps(m2, _mm256_andnot_ps(sign, z)));
        const __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
        const __m256 tz = _mm256_or_ps(t, _mm256_and_ps(sign, z)); /* t >= +0: z's sign */
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, tz)));
    }
    ea_gelu_tanh_scalar(x + i, n - i, y + i);
}

/* The same on zmm registers (AVX512F), exp_neg's steps 16 lanes wide. */
#define AVX512F __attribute__((target("avx512f,avx2,fma")))
AVX512F static inline __m512 exp_neg16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

AVX512F void ea_gelu_tanh_avx512(const float *x, size_t n, float *y) {
    const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f), m2 = _mm512_set1_ps(-2.0f);
    const __m512 c = _mm512_set1_ps(0.7978845608028654f), k = _mm512_set1_ps(0.044715f);
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        const __m512 z = _mm512_mul_ps(c, _mm512_fmadd_ps(_mm512_mul_ps(k, v), _mm512_mul_ps(v, v), v));
        const __m512i zi = _mm512_castps_si512(z);
        const __m512 e = exp_neg16(_mm512_mul_ps(m2, _mm512_castsi512_ps(_mm512_andnot_si512(sign, zi))));
        const __m512 t = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
        const __m512 tz = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t), _mm512_and_si512(sign, zi)));
        _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_mul_ps(half, v), _mm512_add_ps(one, tz)));
    }
    ea_gelu_tanh_avx2(x + i, n - i, y + i);
}

/* ---- float MatMul and fp16 rows ---- */
__attribute__((target("avx2,fma,f16c"))) void ea_f16_row_avx2(const uint16_t *s, float *d, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
    for (; i < n; i++) d[i] = ea_f16_to_f32(s[i]);
}

#define F16C_AVX2 __attribute__((target("avx2,fma,f16c")))
F16C_AVX2 static inline __m256 load8(const float *W, const uint16_t *W16, size_t i) {
    return W16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(W16 + i))) : _mm256_loadu_ps(W + i);
}

F16C_AVX2 static inline void matmul_avx2(const float *x, int M, int K, const float *W, const uint16_t *W16,
                                         int N, float *y, int n0, int n1) {
    int n = n0;
    for (; n + 16 <= n1; n += 16) {
        int m = 0;
        for (; m + 4 <= M; m += 4) {
            __m256 acc[4][2];
            for (int t = 0; t < 4; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
            for (int k = 0; k < K; k++) {
                const __m256 w0 = load8(W, W16, (size_t)k * N + n);
                const __m256 w1 = load8(W, W16, (size_t)k * N + n + 8);
                for (int t = 0; t < 4; t++) {
                    const __m256 xv = _mm256_broadcast_ss(x + (size_t)(m + t) * K + k);
                    acc[t][0] = _mm256_fmadd_ps(xv, w0, acc[t][0]);
                    acc[t][1] = _mm256_fmadd_ps(xv, w1, acc[t][1]);
                }
            }
            for (int t = 0; t < 4; t++) {
                _mm256_storeu_ps(y + (size_t)(m + t) * N + n, acc[t][0]);
                _mm256_storeu_ps(y + (size_t)(m + t) * N + n + 8, acc[t][1]);
            }
        }
        for (; m < M; m++) {
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            for (int k = 0; k < K; k++) {
                const __m256 xv = _mm256_broadcast_ss(x + (size_t)m * K + k);
                a0 = _mm256_fmadd_ps(xv, load8(W, W16, (size_t)k * N + n), a0);
                a1 = _mm256_fmadd_ps(xv, load8(W, W16, (size_t)k * N + n + 8), a1);
            }
            _mm256_storeu_ps(y + (size_t)m * N + n, a0);
            _mm256_storeu_ps(y + (size_t)m * N + n + 8, a1);
        }
    }
    if (n < n1) ea_matmul_cols_scalar(x, M, K, W, W16, N, y, n, n1);
}

F16C_AVX2 void ea_matmul_f32_avx2(const float *x, int M, int K, const float *W, int N, float *y, int n0, int n1) {
    matmul_avx2(x, M, K, W, NULL, N, y, n0, n1);
}
F16C_AVX2 void ea_matmul_f16_avx2(const float *x, int M, int K, const uint16_t *W, int N, float *y, int n0, int n1) {
    matmul_avx2(x, M, K, NULL, W, N, y, n0, n1);
}

/* ---- accuracy_level 0..3 ---- */
/* (q - zp) * s, or with float minimums (zp 0) fma(q, s, mn): ea_dequant_row_scalar's bits */
AVX2 static inline void store8(float *dst, __m128i bytes8, __m256i zp, __m256 s, int has_min, __m256 mn) {
    const __m256 q = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(bytes8), zp));
    _mm256_storeu_ps(dst, has_min ? _mm256_fmadd_ps(q, s, mn) : _mm256_mul_ps(q, s));
}

AVX2 void ea_dequant_row_avx2(const ea_qweight *w, int n, float *wf) {
    const int bs = w->block_size, nb = w->n_blocks, hm = w->has_minimums;
    const uint8_t *src = w->data + (size_t)n * nb * bs * w->bits / 8;
    const __m128i low4 = _mm_set1_epi8(0x0F);
    for (int b = 0; b < nb; b++) {
        const __m256 s = _mm256_set1_ps(w->scales[(size_t)n * nb + b]);
        const __m256i zp = _mm256_set1_epi32(ea_qweight_zp(w, n, b));
        const __m256 mn = _mm256_set1_ps(hm ? w->minimums[(size_t)n * nb + b] : 0.0f);
        float *dst = wf + (size_t)b * bs;
        if (w->bits == 8) {
            for (int i = 0; i < bs; i += 8)
                store8(dst + i, _mm_loadl_epi64((const __m128i *)(src + b * bs + i)), zp, s, hm, mn);
            continue;
        }
        for (int i = 0; i < bs; i += 32) { /* 16 bytes = 32 nibbles, element 2j low, 2j+1 high */
            const __m128i v = _mm_loadu_si128((const __m128i *)(src + (b * bs + i) / 2));
            const __m128i lo = _mm_and_si128(v, low4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
            const __m128i e0 = _mm_unpacklo_epi8(lo, hi), e1 = _mm_unpackhi_epi8(lo, hi); /* natural order */
            store8(dst + i, e0, zp, s, hm, mn);
            store8(dst + i + 8, _mm_srli_si128(e0, 8), zp, s, hm, mn);
            store8(dst + i + 16, e1, zp, s, hm, mn);
            store8(dst + i + 24, _mm_srli_si128(e1, 8), zp, s, hm, mn);
        }
    }
}

AVX2 float ea_dot_avx2(const float *a, const float *b, int K) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int k = 0;
    for (; k + 32 <= K; k += 32)
        for (int j = 0; j < 4; j++)
            acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8 * j), _mm256_loadu_ps(b + k + 8 * j), acc[j]);
    for (; k + 8 <= K; k += 8) acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc[0]);
    const __m256 s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float r = _mm_cvtss_f32(h);
    for (; k < K; k++) r = fmaf(a[k], b[k], r);
    return r;
}
#endif
