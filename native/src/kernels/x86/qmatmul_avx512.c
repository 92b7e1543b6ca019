/* int4 MatMulNBits (decode and prefill) with AVX-512 VNNI on the AVX2 packed
 * layout (internal.h): the avx512-vnni table's matmul. Prompt processing is compute-bound: a 64-byte vpdpbusd covers
 * four weight rows where the AVX2 kernel covers two, 32 registers hold four
 * rows of x per pass (the AVX2 kernel: two), and the per-block reduction of
 * eight rows is one unpack/shuffle/permute tree instead of three hadds.
 * The integers and the per-block fma order are those of the AVX2 and scalar
 * kernels, so results are bit-identical (tested). Decode (M = 1) runs here
 * too: it is bound by memory, but fewer ops per byte leave the core more
 * time for the loads, and it streams two groups at once (group_pair_m1)
 * (docs/performance.md, "kernel variants"). */
#include "../internal.h"

#if EA_X86
#include <immintrin.h>

#include "vecmath_avx2.h"

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

/* d0 holds rows 0-3 (128-bit lane L = row L, four partial sums each), d1
 * rows 4-7: the eight row sums in the AVX2 lane order r0 r2 r4 r6 r1 r3 r5 r7
 * that the packed scales follow. */
AVX512 static inline __m256i reduce8(__m512i d0, __m512i d1) {
    __m512i s = _mm512_add_epi32(_mm512_unpacklo_epi32(d0, d1), _mm512_unpackhi_epi32(d0, d1));
    s = _mm512_add_epi32(s, _mm512_shuffle_epi32(s, _MM_PERM_BADC)); /* lane L: [rL, r4+L, rL, r4+L] */
    const __m512i idx = _mm512_setr_epi32(0, 8, 1, 9, 4, 12, 5, 13, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_castsi512_si256(_mm512_permutexvar_epi32(idx, s));
}

/* MT rows of x against one group of EA_QROWS int4 rows over all blocks; MIN (float minimums,
 * fp16 when mf16) is a compile-time constant, as in the AVX2 kernel. */
AVX512 static inline __attribute__((always_inline)) void group_rows(const uint8_t *gp, size_t stride, int nb,
                                                                    int has_zp, int f16, int mf16, const ea_qact *a,
                                                                    int m0, int MT, int BS, int MIN, __m256 acc[4]) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const int kp = nb * BS, bpb = BS / 2, subs = bpb / 16;
    const int8_t *xr[4];
    for (int t = 0; t < MT; t++) {
        xr[t] = a->xq + (size_t)(m0 + t) * kp;
        acc[t] = _mm256_setzero_ps();
    }
    const __m256i zp_sym = _mm256_set1_epi32(MIN ? 0 : 8);
    for (int b = 0; b < nb; b++) {
        const uint8_t *p = gp + (size_t)b * stride;
        for (size_t o = 0; o < stride; o += 64) __builtin_prefetch(p + EA_QPREFETCH + o, 0, 3);
        __m512i d[4][2];
        for (int t = 0; t < MT; t++) d[t][0] = d[t][1] = _mm512_setzero_si512();
        for (int j = 0; j < subs; j++) {
            const __m512i v0 = _mm512_loadu_si512((const void *)(p + (size_t)j * EA_QROWS * 16));
            const __m512i v1 = _mm512_loadu_si512((const void *)(p + (size_t)j * EA_QROWS * 16 + 64));
            const __m512i lo0 = _mm512_and_si512(v0, low4), hi0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), low4);
            const __m512i lo1 = _mm512_and_si512(v1, low4), hi1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), low4);
            for (int t = 0; t < MT; t++) { /* 32 activations stored [even16 | odd16] */
                const int8_t *x = xr[t] + b * BS + j * 32;
                const __m512i xa = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)x));
                const __m512i xb = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(x + 16)));
                d[t][0] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(d[t][0], lo0, xa), hi0, xb);
                d[t][1] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(d[t][1], lo1, xa), hi1, xb);
            }
        }
        const __m256 sw = ea_load8_scales(p + EA_QROWS * bpb, f16);
        const __m256i zp = has_zp ? _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + EA_QROWS * (bpb + ea_qpack_scale_size(f16)))))
                                  : zp_sym;
        const __m256i corr = _mm256_sub_epi32(_mm256_setzero_si256(), zp); /* idot = dot - zp * sumx */
        const __m256 mn = MIN ? ea_load8_scales(p + EA_QROWS * (bpb + ea_qpack_scale_size(f16)), mf16) : _mm256_setzero_ps();
        for (int t = 0; t < MT; t++) {
            const size_t mb = (size_t)(m0 + t) * nb + b;
            const __m256i idot = _mm256_add_epi32(reduce8(d[t][0], d[t][1]),
                                                  _mm256_mullo_epi32(corr, _mm256_set1_epi32(a->sumx[mb])));
            const __m256 s = _mm256_mul_ps(_mm256_set1_ps(a->sx[mb]), sw);
            acc[t] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(idot), acc[t]);
            if (MIN) /* + minimum * sx*sumx (ref/qmatmul.c) */
                acc[t] = _mm256_fmadd_ps(mn, _mm256_set1_ps(a->sx[mb] * (float)a->sumx[mb]), acc[t]);
        }
    }
}

/* Decode (M = 1): two groups from far apart in the task's range at once, so
 * the core streams two sequences (more lines in flight than one prefetched
 * stream keeps). Same integers and fma order per row as group_rows. */
AVX512 static inline __attribute__((always_inline)) void group_pair_m1(const uint8_t *gA, const uint8_t *gB, size_t stride,
                                                                       int nb, int has_zp, int f16, int mf16,
                                                                       const ea_qact *a, int BS, int MIN, __m256 acc[2]) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const int bpb = BS / 2, subs = bpb / 16;
    const __m256i zp_sym = _mm256_set1_epi32(MIN ? 0 : 8);
    acc[0] = acc[1] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *ps[2] = {gA + (size_t)b * stride, gB + (size_t)b * stride};
        for (int g = 0; g < 2; g++)
            for (size_t o = 0; o < stride; o += 64) __builtin_prefetch(ps[g] + EA_QPREFETCH + o, 0, 3);
        __m512i d[2][2];
        for (int g = 0; g < 2; g++) d[g][0] = d[g][1] = _mm512_setzero_si512();
        for (int j = 0; j < subs; j++) {
            const int8_t *x = a->xq + b * BS + j * 32;
            const __m512i xa = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)x));
            const __m512i xb = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(x + 16)));
            for (int g = 0; g < 2; g++) {
                const __m512i v0 = _mm512_loadu_si512((const void *)(ps[g] + (size_t)j * EA_QROWS * 16));
                const __m512i v1 = _mm512_loadu_si512((const void *)(ps[g] + (size_t)j * EA_QROWS * 16 + 64));
                const __m512i lo0 = _mm512_and_si512(v0, low4), hi0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), low4);
                const __m512i lo1 = _mm512_and_si512(v1, low4), hi1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), low4);
                d[g][0] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(d[g][0], lo0, xa), hi0, xb);
                d[g][1] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(d[g][1], lo1, xa), hi1, xb);
            }
        }
        const __m256 sx = _mm256_set1_ps(a->sx[b]);
        const __m256i sumx = _mm256_set1_epi32(a->sumx[b]);
        const __m256 xs = _mm256_set1_ps(MIN ? a->sx[b] * (float)a->sumx[b] : 0.0f);
        for (int g = 0; g < 2; g++) {
            const __m256 sw = ea_load8_scales(ps[g] + EA_QROWS * bpb, f16);
            const __m256i zp = has_zp ? _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(ps[g] + EA_QROWS * (bpb + ea_qpack_scale_size(f16)))))
                                      : zp_sym;
            const __m256i corr = _mm256_sub_epi32(_mm256_setzero_si256(), zp);
            const __m256i idot = _mm256_add_epi32(reduce8(d[g][0], d[g][1]), _mm256_mullo_epi32(corr, sumx));
            acc[g] = _mm256_fmadd_ps(_mm256_mul_ps(sx, sw), _mm256_cvtepi32_ps(idot), acc[g]);
            if (MIN)
                acc[g] = _mm256_fmadd_ps(ea_load8_scales(ps[g] + EA_QROWS * (bpb + ea_qpack_scale_size(f16)), mf16), xs,
                                         acc[g]);
        }
    }
}

AVX512 static void store_rows(float *y, int N, int m0, int MT, int g, const __m256 *acc) {
    for (int t = 0; t < MT; t++) {
        float tmp[EA_QROWS];
        _mm256_storeu_ps(tmp, acc[t]);
        float *dst = y + (size_t)(m0 + t) * N;
        for (int lane = 0; lane < EA_QROWS; lane++) {
            const int n = g * EA_QROWS + ea_qpack_lane_row(EA_ISA_AVX2, lane);
            if (n < N) dst[n] = tmp[lane];
        }
    }
}

AVX512 static inline __attribute__((always_inline)) void groups_impl(const ea_qweight *w, const ea_qact *a, float *y,
                                                                     int g0, int g1, int BS, int MIN) {
    const size_t stride = ea_qpack_block_stride(w);
    const int nb = w->n_blocks, has_zp = w->zero_points != NULL, f16 = w->packed_f16, mf16 = w->packed_min_f16;
    __m256 acc[4];
    if (a->M == 1) {
        const int h = (g1 - g0) / 2;
        for (int g = g0; g < g0 + h; g++) {
            group_pair_m1((const uint8_t *)w->packed + (size_t)g * nb * stride,
                          (const uint8_t *)w->packed + (size_t)(g + h) * nb * stride, stride, nb, has_zp, f16, mf16, a,
                          BS, MIN, acc);
            store_rows(y, w->N, 0, 1, g, &acc[0]);
            store_rows(y, w->N, 0, 1, g + h, &acc[1]);
        }
        g0 += 2 * h; /* an odd group left at the end */
    }
    for (int g = g0; g < g1; g++) {
        const uint8_t *gp = (const uint8_t *)w->packed + (size_t)g * nb * stride;
        int m = 0;
        for (; m + 4 <= a->M; m += 4) {
            group_rows(gp, stride, nb, has_zp, f16, mf16, a, m, 4, BS, MIN, acc);
            store_rows(y, w->N, m, 4, g, acc);
        }
        switch (a->M - m) { /* the group stays in L1 for the tail rows */
        case 3: group_rows(gp, stride, nb, has_zp, f16, mf16, a, m, 3, BS, MIN, acc); store_rows(y, w->N, m, 3, g, acc); break;
        case 2: group_rows(gp, stride, nb, has_zp, f16, mf16, a, m, 2, BS, MIN, acc); store_rows(y, w->N, m, 2, g, acc); break;
        case 1: group_rows(gp, stride, nb, has_zp, f16, mf16, a, m, 1, BS, MIN, acc); store_rows(y, w->N, m, 1, g, acc); break;
        default: break;
        }
    }
}

AVX512 void ea_qmatmul_groups_avx512(const ea_qweight *w, const ea_qact *a, float *y, int g0, int g1) {
    const int mins = w->has_minimums;
    switch (w->block_size * 2 + mins) {
    case 64: groups_impl(w, a, y, g0, g1, 32, 0); break;
    case 128: groups_impl(w, a, y, g0, g1, 64, 0); break;
    case 256: groups_impl(w, a, y, g0, g1, 128, 0); break;
    case 65: groups_impl(w, a, y, g0, g1, 32, 1); break;
    case 129: groups_impl(w, a, y, g0, g1, 64, 1); break;
    default: groups_impl(w, a, y, g0, g1, 128, 1); break;
    }
}
/* int4 here; int8 on the AVX2 code with vpdpbusd in its EVEX form (AVX512-VNNI implies it,
 * AVX-VNNI's VEX form need not be there) */
void ea_qmatmul_avx512_vnni(const ea_qweight *w, const ea_qact *a, float *y, int n0, int n1) {
    const int g0 = n0 / EA_QROWS, g1 = (n1 + EA_QROWS - 1) / EA_QROWS;
    if (w->bits == 4) ea_qmatmul_groups_avx512(w, a, y, g0, g1);
    else ea_qmatmul_groups_avx2(w, a, y, g0, g1, EA_DOT_VNNI_EVEX);
}
#endif
