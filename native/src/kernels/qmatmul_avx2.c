/* AVX2 MatMulNBits kernels over the packed layout (internal.h).
 *
 * int4: 16 bytes of a row hold 32 nibbles; [low nibbles | high nibbles] in a
 * ymm lines up with the activations interleaved as [even | odd], and
 * maddubs (unsigned weight x signed activation, no saturation: 2*15*127)
 * plus madd against ones gives 8 int32 partial sums.
 * int8: maddubs would saturate on 0..255 weights, so w-128 is used as a
 * signed byte with the abs/sign trick (2*128*127 < 32767), and 128*sumx
 * is added back with the zero point term. */
#include "internal.h"

#if EA_X86
#include <immintrin.h>
#include <math.h>

#define AVX2 __attribute__((target("avx2,fma")))

/* Four rows' 8-lane partial sums → their four totals. */
AVX2 static inline __m128i hsum4(__m256i d0, __m256i d1, __m256i d2, __m256i d3) {
    __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(d0, d1), _mm256_hadd_epi32(d2, d3));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

AVX2 static inline __m256i unpack_nibbles(const uint8_t *p) {
    __m128i w = _mm_loadu_si128((const __m128i *)p);
    __m256i v = _mm256_set_m128i(_mm_srli_epi16(w, 4), w);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

/* MT rows of x (1 or 2) against one group of EA_QROWS weight rows, all
 * blocks; BS and BITS are compile-time constants at each call site so the
 * chunk loops unroll. */
AVX2 static inline void group_rows(const uint8_t *gp, size_t stride, int nb, int has_zp,
                                   const ea_qact *a, int m0, int MT, int BS, int BITS,
                                   __m128 acc[2]) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int kp = nb * BS, bpb = BS * BITS / 8;
    const __m128i off = _mm_set1_epi32(BITS == 8 ? 128 : 0);
    const int8_t *x0 = a->xq + (size_t)m0 * kp;
    const int8_t *x1 = a->xq + (size_t)(m0 + (MT > 1)) * kp;
    acc[0] = acc[1] = _mm_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *p = gp + (size_t)b * stride;
        __m256i d[2][EA_QROWS];
        for (int t = 0; t < MT; t++)
            for (int r = 0; r < EA_QROWS; r++) d[t][r] = _mm256_setzero_si256();
        for (int c = 0; c < BS / 32; c++) {
            const __m256i xa = _mm256_loadu_si256((const __m256i *)(x0 + b * BS + c * 32));
            const __m256i xb = _mm256_loadu_si256((const __m256i *)(x1 + b * BS + c * 32));
            for (int r = 0; r < EA_QROWS; r++) {
                if (BITS == 4) {
                    const __m256i wv = unpack_nibbles(p + r * bpb + c * 16);
                    d[0][r] = _mm256_add_epi32(d[0][r], _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xa), ones));
                    if (MT > 1)
                        d[1][r] = _mm256_add_epi32(d[1][r], _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xb), ones));
                } else {
                    const __m256i ws = _mm256_xor_si256(
                        _mm256_loadu_si256((const __m256i *)(p + r * bpb + c * 32)), _mm256_set1_epi8((char)0x80));
                    const __m256i wa = _mm256_abs_epi8(ws);
                    d[0][r] = _mm256_add_epi32(d[0][r], _mm256_madd_epi16(
                        _mm256_maddubs_epi16(wa, _mm256_sign_epi8(xa, ws)), ones));
                    if (MT > 1)
                        d[1][r] = _mm256_add_epi32(d[1][r], _mm256_madd_epi16(
                            _mm256_maddubs_epi16(wa, _mm256_sign_epi8(xb, ws)), ones));
                }
            }
        }
        const __m128 sw = _mm_loadu_ps((const float *)(p + EA_QROWS * bpb));
        __m128i zp = has_zp ? _mm_cvtepu8_epi32(_mm_cvtsi32_si128(*(const int *)(p + EA_QROWS * bpb + 16)))
                            : _mm_set1_epi32(BITS == 4 ? 8 : 128);
        const __m128i corr = _mm_sub_epi32(off, zp); /* idot = dot + (off - zp) * sumx */
        for (int t = 0; t < MT; t++) {
            const int m = m0 + t;
            __m128i idot = hsum4(d[t][0], d[t][1], d[t][2], d[t][3]);
            idot = _mm_add_epi32(idot, _mm_mullo_epi32(corr, _mm_set1_epi32(a->sumx[(size_t)m * nb + b])));
            const __m128 s = _mm_mul_ps(_mm_set1_ps(a->sx[(size_t)m * nb + b]), sw);
            acc[t] = _mm_fmadd_ps(s, _mm_cvtepi32_ps(idot), acc[t]);
        }
    }
}

AVX2 static void store_rows(float *y, int N, int m, int n, __m128 v) {
    float *dst = y + (size_t)m * N + n;
    if (n + EA_QROWS <= N) {
        _mm_storeu_ps(dst, v);
    } else {
        float tmp[EA_QROWS];
        _mm_storeu_ps(tmp, v);
        for (int r = 0; n + r < N; r++) dst[r] = tmp[r];
    }
}

AVX2 static inline void groups_impl(const ea_qweight *w, const ea_qact *a, float *y, int g0, int g1,
                                    int BS, int BITS) {
    const size_t stride = ea_qpack_block_stride(w);
    const int nb = w->n_blocks, has_zp = w->zero_points != NULL;
    for (int g = g0; g < g1; g++) {
        const uint8_t *gp = (const uint8_t *)w->packed + (size_t)g * nb * stride;
        if (g + 1 < g1) _mm_prefetch((const char *)(gp + (size_t)nb * stride), _MM_HINT_T0);
        int m = 0;
        __m128 acc[2];
        for (; m + 2 <= a->M; m += 2) {
            group_rows(gp, stride, nb, has_zp, a, m, 2, BS, BITS, acc);
            store_rows(y, w->N, m, g * EA_QROWS, acc[0]);
            store_rows(y, w->N, m + 1, g * EA_QROWS, acc[1]);
        }
        if (m < a->M) {
            group_rows(gp, stride, nb, has_zp, a, m, 1, BS, BITS, acc);
            store_rows(y, w->N, m, g * EA_QROWS, acc[0]);
        }
    }
}

AVX2 void ea_qmatmul_groups_avx2(const ea_qweight *w, const ea_qact *a, float *y, int g0, int g1) {
    switch (w->bits * 1000 + w->block_size) {
    case 4032: groups_impl(w, a, y, g0, g1, 32, 4); break;
    case 4064: groups_impl(w, a, y, g0, g1, 64, 4); break;
    case 4128: groups_impl(w, a, y, g0, g1, 128, 4); break;
    case 8032: groups_impl(w, a, y, g0, g1, 32, 8); break;
    case 8064: groups_impl(w, a, y, g0, g1, 64, 8); break;
    default: groups_impl(w, a, y, g0, g1, 128, 8); break;
    }
}

/* Same arithmetic as ea_quantize_row_scalar: x * (1/scale) rounded to
 * nearest even by cvtps (default MXCSR), so the int8 values match exactly. */
AVX2 void ea_quantize_row_avx2(const float *x, int K, int bs, int8_t *xq, float *sx, int32_t *sumx,
                               int interleave) {
    const int nb = (K + bs - 1) / bs;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int b = 0; b < nb; b++) {
        const int k0 = b * bs, len = K - k0 < bs ? K - k0 : bs;
        if (len < bs) { /* ragged tail: the scalar code handles it identically */
            ea_quantize_row_scalar(x + k0, len, bs, xq + k0, sx + b, sumx + b, interleave);
            continue;
        }
        __m256 mx = _mm256_setzero_ps();
        for (int i = 0; i < bs; i += 8)
            mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(x + k0 + i), absmask));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
        const float scale = _mm_cvtss_f32(m4) / 127.0f;
        const __m256 inv = _mm256_set1_ps(scale != 0.0f ? 1.0f / scale : 0.0f);
        __m256i sum = _mm256_setzero_si256();
        for (int c = 0; c < bs; c += 32) {
            __m256i q[4];
            for (int j = 0; j < 4; j++) {
                __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k0 + c + 8 * j), inv));
                v = _mm256_max_epi32(_mm256_min_epi32(v, _mm256_set1_epi32(127)), _mm256_set1_epi32(-128));
                sum = _mm256_add_epi32(sum, v);
                q[j] = v;
            }
            /* pack 32 int32 → 32 int8 in element order */
            __m256i p16a = _mm256_packs_epi32(q[0], q[1]);
            __m256i p16b = _mm256_packs_epi32(q[2], q[3]);
            __m256i p8 = _mm256_packs_epi16(p16a, p16b);
            p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            if (interleave) {
                /* within each 128-bit lane gather even bytes then odd bytes */
                const __m256i sh = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                                    0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
                p8 = _mm256_shuffle_epi8(p8, sh);
                p8 = _mm256_permute4x64_epi64(p8, _MM_SHUFFLE(3, 1, 2, 0));
            }
            _mm256_storeu_si256((__m256i *)(xq + k0 + c), p8);
        }
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_hadd_epi32(s4, s4);
        s4 = _mm_hadd_epi32(s4, s4);
        sx[b] = scale;
        sumx[b] = _mm_cvtsi128_si32(s4);
    }
}

#endif
