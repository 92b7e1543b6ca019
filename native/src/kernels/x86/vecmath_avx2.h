/* Vector math shared by the AVX2 kernels (x86 translation units only). */
#ifndef EDGEACT_VECMATH_AVX2_H
#define EDGEACT_VECMATH_AVX2_H

#include <immintrin.h>
#include <stdint.h>

/* f16c: every CPU with AVX2 here has it (ea_isa_available requires it) */
#define AVX2 __attribute__((target("avx2,fma,f16c")))

/* Eight float scales stored as fp32, or as fp16 when f16 (exact either way). */
AVX2 static inline __m256 ea_load8_scales(const uint8_t *p, int f16) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)) : _mm256_loadu_ps((const float *)p);
}

/* The largest of eight floats (for finite lanes; a NaN lane's result is the caller's to discard). */
AVX2 static inline float ea_hmax8_ps(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

/* The sum of eight int32 lanes. */
AVX2 static inline int32_t ea_hsum8_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

/* e^x for x <= 0: x = n ln2 + r, |r| <= ln2/2, degree-6 Taylor polynomial
 * of e^r (relative error ~2e-7), times 2^n; x is clamped at -87, where
 * e^x ~ 1.6e-38 is nothing next to the 1 it is added to (softmax sums,
 * sigmoid denominators). */
AVX2 static inline __m256 exp_neg(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* acc += per-int32-lane sum of four u8 x s8 products (DOT: EA_DOT_*). With AVX-VNNI one
 * vpdpbusd in its VEX form, with AVX512-VNNI (+VL) the same instruction in its EVEX form
 * (inline asm: the intrinsics need target attributes these AVX2 functions cannot inline);
 * otherwise maddubs + madd, whose int16 pair sums cannot saturate here (15*127*2 for int4,
 * 128*127*2 for int8), so all three give the same integers. */
AVX2 static inline __attribute__((always_inline)) __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s, int DOT) {
    if (DOT == 2) { /* EA_DOT_VNNI_EVEX */
        __asm__("%{evex%} vpdpbusd %[s], %[u], %[acc]" : [acc] "+x"(acc) : [u] "x"(u), [s] "x"(s));
        return acc;
    }
    if (DOT == 1) { /* EA_DOT_VNNI_VEX */
        __asm__("%{vex%} vpdpbusd %[s], %[u], %[acc]" : [acc] "+x"(acc) : [u] "x"(u), [s] "x"(s));
        return acc;
    }
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}

#endif
