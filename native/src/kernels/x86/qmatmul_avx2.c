/* AVX2 MatMulNBits kernels over the packed layout (internal.h).
 *
 * int4: 16 bytes of a row hold 32 nibbles; their low nibbles line up with
 * the activations' 16 even elements and the high ones with the 16 odd ones
 * (ea_quantize_row_* interleave), and maddubs (unsigned weight x signed
 * activation) plus madd against ones gives int32 partial sums.
 * int8: maddubs would saturate on 0..255 weights, so w-128 is used as a
 * signed byte with the abs/sign trick (2*128*127 < 32767), and 128*sumx
 * is added back with the zero point term. */
#include "../internal.h"

#if EA_X86
#include <immintrin.h>
#include <float.h>
#include <math.h>
#include <string.h>

#include "vecmath_avx2.h"

/* Eight rows' sums from four [row 2q | row 2q+1] vectors of 4 lanes each;
 * the result is in lane order r0 r2 r4 r6 r1 r3 r5 r7 (internal.h). */
AVX2 static inline __m256i hsum8(const __m256i d[4]) {
    return _mm256_hadd_epi32(_mm256_hadd_epi32(d[0], d[1]), _mm256_hadd_epi32(d[2], d[3]));
}

AVX2 static inline __m256i bcast16(const int8_t *p) {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
}

/* MT rows of x (1 or 2) against one group of EA_QROWS weight rows over all
 * blocks; BS, BITS and MIN (float minimums, fp16 when mf16) are compile-time
 * constants at each call site so the loops unroll and the integer-zero-point
 * code has no trace of the minimums. Each 32-byte load holds 16 bytes of two
 * rows; the activations are broadcast to both halves. */
AVX2 static inline __attribute__((always_inline)) void group_rows(const uint8_t *gp, size_t stride, int nb, int has_zp,
                                   int f16, int mf16, const ea_qact *a, int m0, int MT, int BS, int BITS, int VNNI,
                                   int MIN, __m256 acc[2]) {
    const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0F);
    const int kp = nb * BS, bpb = BS * BITS / 8, subs = bpb / 16;
    const int8_t *xr[2] = {a->xq + (size_t)m0 * kp, a->xq + (size_t)(m0 + (MT > 1)) * kp};
    const __m256i off = _mm256_set1_epi32(BITS == 8 ? 128 : 0);
    const __m256i zp_sym = _mm256_set1_epi32(MIN ? 0 : BITS == 4 ? 8 : 128);
    acc[0] = acc[1] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *p = gp + (size_t)b * stride;
        for (size_t o = 0; o < stride; o += 64) __builtin_prefetch(p + EA_QPREFETCH + o, 0, 3);
        __m256i d[2][4];
        for (int t = 0; t < MT; t++)
            for (int q = 0; q < 4; q++) d[t][q] = _mm256_setzero_si256();
        for (int j = 0; j < subs; j++) {
            __m256i xa[2], xb[2];
            for (int t = 0; t < MT; t++) {
                if (BITS == 4) { /* 32 elements stored [even16 | odd16] */
                    xa[t] = bcast16(xr[t] + b * BS + j * 32);
                    xb[t] = bcast16(xr[t] + b * BS + j * 32 + 16);
                } else {
                    xa[t] = bcast16(xr[t] + b * BS + j * 16);
                }
            }
            for (int q = 0; q < 4; q++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(p + (size_t)j * EA_QROWS * 16 + q * 32));
                if (BITS == 4) {
                    const __m256i lo = _mm256_and_si256(v, low4);
                    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                    for (int t = 0; t < MT; t++) {
                        if (VNNI) {
                            d[t][q] = dot_u8s8(dot_u8s8(d[t][q], lo, xa[t], VNNI), hi, xb[t], VNNI);
                            continue;
                        }
                        /* int16 sum of two maddubs: at most 4*15*127, no saturation */
                        const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xa[t]),
                                                             _mm256_maddubs_epi16(hi, xb[t]));
                        d[t][q] = _mm256_add_epi32(d[t][q], _mm256_madd_epi16(s16, ones));
                    }
                } else {
                    const __m256i ws = _mm256_xor_si256(v, _mm256_set1_epi8((char)0x80));
                    const __m256i wa = _mm256_abs_epi8(ws);
                    for (int t = 0; t < MT; t++)
                        d[t][q] = dot_u8s8(d[t][q], wa, _mm256_sign_epi8(xa[t], ws), VNNI);
                }
            }
        }
        const __m256 sw = ea_load8_scales(p + EA_QROWS * bpb, f16);
        const __m256i zp = has_zp ? _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + EA_QROWS * (bpb + ea_qpack_scale_size(f16)))))
                                  : zp_sym;
        const __m256i corr = _mm256_sub_epi32(off, zp); /* idot = dot + (off - zp) * sumx */
        const __m256 mn = MIN ? ea_load8_scales(p + EA_QROWS * (bpb + ea_qpack_scale_size(f16)), mf16) : _mm256_setzero_ps();
        for (int t = 0; t < MT; t++) {
            const size_t mb = (size_t)(m0 + t) * nb + b;
            const __m256i idot = _mm256_add_epi32(hsum8(d[t]), _mm256_mullo_epi32(corr, _mm256_set1_epi32(a->sumx[mb])));
            const __m256 s = _mm256_mul_ps(_mm256_set1_ps(a->sx[mb]), sw);
            acc[t] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(idot), acc[t]);
            if (MIN) /* + minimum * sx*sumx (ref/qmatmul.c) */
                acc[t] = _mm256_fmadd_ps(mn, _mm256_set1_ps(a->sx[mb] * (float)a->sumx[mb]), acc[t]);
        }
    }
}

AVX2 static void store_group(float *y, int N, int m, int g, __m256 v) {
    float tmp[EA_QROWS];
    _mm256_storeu_ps(tmp, v);
    float *dst = y + (size_t)m * N;
    for (int lane = 0; lane < EA_QROWS; lane++) {
        const int n = g * EA_QROWS + ea_qpack_lane_row(EA_ISA_AVX2, lane);
        if (n < N) dst[n] = tmp[lane];
    }
}

AVX2 static inline __attribute__((always_inline)) void groups_impl(const ea_qweight *w, const ea_qact *a, float *y, int g0, int g1,
                                    int BS, int BITS, int VNNI, int MIN) {
    const size_t stride = ea_qpack_block_stride(w);
    const int nb = w->n_blocks, has_zp = w->zero_points != NULL;
    for (int g = g0; g < g1; g++) {
        const uint8_t *gp = (const uint8_t *)w->packed + (size_t)g * nb * stride;
        /* the group (n_blocks * stride bytes) stays in L1 across the rows of x */
        int m = 0;
        __m256 acc[2];
        for (; m + 2 <= a->M; m += 2) {
            group_rows(gp, stride, nb, has_zp, w->packed_f16, w->packed_min_f16, a, m, 2, BS, BITS, VNNI, MIN, acc);
            store_group(y, w->N, m, g, acc[0]);
            store_group(y, w->N, m + 1, g, acc[1]);
        }
        if (m < a->M) {
            group_rows(gp, stride, nb, has_zp, w->packed_f16, w->packed_min_f16, a, m, 1, BS, BITS, VNNI, MIN, acc);
            store_group(y, w->N, m, g, acc[0]);
        }
    }
}

#define GROUPS_BY_SHAPE_MIN(V, MIN)                                      \
    switch (w->bits * 1000 + w->block_size) {                            \
    case 4032: groups_impl(w, a, y, g0, g1, 32, 4, V, MIN); break;       \
    case 4064: groups_impl(w, a, y, g0, g1, 64, 4, V, MIN); break;       \
    case 4128: groups_impl(w, a, y, g0, g1, 128, 4, V, MIN); break;      \
    case 8032: groups_impl(w, a, y, g0, g1, 32, 8, V, MIN); break;       \
    case 8064: groups_impl(w, a, y, g0, g1, 64, 8, V, MIN); break;       \
    default: groups_impl(w, a, y, g0, g1, 128, 8, V, MIN); break;        \
    }
#define GROUPS_BY_SHAPE(V)                                               \
    if (w->has_minimums) {                                               \
        GROUPS_BY_SHAPE_MIN(V, 1)                                        \
    } else {                                                             \
        GROUPS_BY_SHAPE_MIN(V, 0)                                        \
    }

AVX2 static void groups_plain(const ea_qweight *w, const ea_qact *a, float *y, int g0, int g1) {
    GROUPS_BY_SHAPE(EA_DOT_MADD)
}
AVX2 static void groups_vnni(const ea_qweight *w, const ea_qact *a, float *y, int g0, int g1) {
    GROUPS_BY_SHAPE(EA_DOT_VNNI_VEX)
}
AVX2 static void groups_evex(const ea_qweight *w, const ea_qact *a, float *y, int g0, int g1) {
    GROUPS_BY_SHAPE(EA_DOT_VNNI_EVEX)
}

void ea_qmatmul_groups_avx2(const ea_qweight *w, const ea_qact *a, float *y, int g0, int g1, int dot) {
    if (dot == EA_DOT_VNNI_EVEX) groups_evex(w, a, y, g0, g1);
    else if (dot == EA_DOT_VNNI_VEX) groups_vnni(w, a, y, g0, g1);
    else groups_plain(w, a, y, g0, g1);
}

void ea_qmatmul_avx2(const ea_qweight *w, const ea_qact *a, float *y, int n0, int n1) {
    groups_plain(w, a, y, n0 / EA_QROWS, (n1 + EA_QROWS - 1) / EA_QROWS);
}

void ea_qmatmul_avx2_vnni(const ea_qweight *w, const ea_qact *a, float *y, int n0, int n1) {
    groups_vnni(w, a, y, n0 / EA_QROWS, (n1 + EA_QROWS - 1) / EA_QROWS);
}

/* Same arithmetic as ea_quantize_row_scalar: x * (127/amax) rounded to
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
        __m256i big = _mm256_setzero_si256(); /* lanes that saw inf/nan (bits > 0x7f7fffff) */
        for (int i = 0; i < bs; i += 8) {
            const __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + k0 + i), absmask);
            big = _mm256_or_si256(big, _mm256_cmpgt_epi32(_mm256_castps_si256(a), _mm256_set1_epi32(0x7f7fffff)));
            mx = _mm256_max_ps(mx, a);
        }
        const float amax = ea_hmax8_ps(mx);
        const int finite = _mm256_testz_si256(big, big);
        const float scale = finite ? amax / 127.0f : NAN;
        float invs = finite && amax != 0.0f ? 127.0f / amax : 0.0f;
        if (invs > FLT_MAX) invs = 0.0f;
        if (invs == 0.0f) { /* zero, tiny or non-finite block: all codes 0 (no cvt of inf/nan) */
            memset(xq + k0, 0, (size_t)bs);
            sx[b] = scale;
            sumx[b] = 0;
            continue;
        }
        const __m256 inv = _mm256_set1_ps(invs);
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
        sx[b] = scale;
        sumx[b] = ea_hsum8_epi32(sum);
    }
}

#endif
