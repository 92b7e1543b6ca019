/* AVX2 elementwise ops of the FFN (scalar references in transformer.c). */
#include "internal.h"

#if EA_X86
#include "vecmath_avx2.h"

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
#endif
