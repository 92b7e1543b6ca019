/* GELU, tanh form (Gemma's gelu_pytorch_tanh): y = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
 * The scalar reference uses libm's tanhf; the AVX2 variant tanh(z) = sign(z) (1 - e)/(1 + e)
 * with e = exp(-2|z|) from exp_neg (relative error ~2e-7), within a stated tolerance of it. */
#include <math.h>

#include "internal.h"

void ea_gelu_tanh_scalar(const float *x, size_t n, float *y) {
    for (size_t i = 0; i < n; i++) {
        const float v = x[i];
        y[i] = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    }
}

#if EA_X86
#include "vecmath_avx2.h"

AVX2 static void gelu_tanh_avx2(const float *x, size_t n, float *y) {
    const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f), sign = _mm256_set1_ps(-0.0f);
    const __m256 c = _mm256_set1_ps(0.7978845608028654f), k = _mm256_set1_ps(0.044715f), m2 = _mm256_set1_ps(-2.0f);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256 z = _mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(k, v), _mm256_mul_ps(v, v), v));
        const __m256 e = exp_neg(_mm256_mul_ps(m2, _mm256_andnot_ps(sign, z))); /* exp(-2|z|) */
        const __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
        const __m256 tz = _mm256_or_ps(t, _mm256_and_ps(sign, z)); /* tanh(|z|) with z's sign */
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, tz)));
    }
    ea_gelu_tanh_scalar(x + i, n - i, y + i);
}
#endif

static void gelu_span(ea_isa isa, const float *x, size_t n, float *y) {
#if EA_X86
    if (isa == EA_ISA_AVX2) {
        gelu_tanh_avx2(x, n, y);
        return;
    }
#endif
    (void)isa;
    ea_gelu_tanh_scalar(x, n, y);
}

typedef struct {
    const float *x;
    float *y;
    size_t n;
    ea_isa isa;
    int n_tasks;
} gelu_job;

static void gelu_task(void *arg, int task, int thread) {
    (void)thread;
    const gelu_job *j = arg;
    const size_t a = j->n * task / j->n_tasks, b = j->n * (task + 1) / j->n_tasks;
    gelu_span(j->isa, j->x + a, b - a, j->y + a);
}

void ea_gelu_tanh(const ea_kctx *ctx, const float *x, size_t n, float *y) {
    if (n < 32768) { /* below this a pool wake-up costs more than it saves (as ea_silu_mul) */
        gelu_span(ctx->isa, x, n, y);
        return;
    }
    gelu_job j = {x, y, n, ctx->isa, 8};
    ea_pool_run(ctx->pool, gelu_task, &j, j.n_tasks);
}
