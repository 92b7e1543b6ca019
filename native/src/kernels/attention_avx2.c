/* AVX2 attention of one query row over L cached positions (see
 * ea_attention_row_scalar in transformer.c for the contract).
 *
 * Decode spends its non-matmul time here: the scalar loop's dot product is
 * one serial chain of hd dependent adds per position and its softmax one
 * libm expf per position. Here eight positions (four on a short tail or
 * when hd is not a multiple of 8) are dotted at once with independent
 * accumulators, exp is a vector polynomial (relative error ~2e-7, inside
 * the kernel test's 1e-5), and the weighted sum of V keeps 64 outputs in
 * registers. Accumulators are named variables: GCC -O2 kept arrays of them
 * on the stack, each fma waiting on a store (decode attention at 160
 * positions, 32 heads: 42.6 -> 31.0 us a layer with the eight positions). */
#include "internal.h"

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

#endif
