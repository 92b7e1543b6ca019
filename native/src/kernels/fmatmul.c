/* fp32 and fp16 matmuls with ONNX MatMul weights W [K, N]: y = x @ W.
 * Threads split N in 16-column (64-byte) chunks; SIMD kernels keep a 4x16
 * tile of y in registers and stream W rows, each W row reused by 4 x rows. */
#include <string.h>

#include "internal.h"

#if EA_X86
#include <immintrin.h>
#endif
#if EA_ARM64
#include <arm_neon.h>
#endif

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

#if EA_X86
__attribute__((target("avx2,fma,f16c"))) static void f16_row_avx2(const uint16_t *s, float *d, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
    for (; i < n; i++) d[i] = ea_f16_to_f32(s[i]);
}
#endif

void ea_f16_to_f32_row(const ea_kctx *ctx, const uint16_t *src, float *dst, size_t n) {
#if EA_X86
    if (ctx && ctx->isa == EA_ISA_AVX2) { f16_row_avx2(src, dst, n); return; }
#endif
#if EA_ARM64
    if (ctx && ctx->isa != EA_ISA_SCALAR) {
        size_t i = 0;
        for (; i + 4 <= n; i += 4)
            vst1q_f32(dst + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(src + i))));
        for (; i < n; i++) dst[i] = ea_f16_to_f32(src[i]);
        return;
    }
#endif
    (void)ctx;
    for (size_t i = 0; i < n; i++) dst[i] = ea_f16_to_f32(src[i]);
}

/* Columns [n0, n1) of y, scalar. W16 selects the fp16 table. */
static void matmul_cols_scalar(const float *x, int M, int K, const float *W, const uint16_t *W16,
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

#if EA_X86
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
    if (n < n1) matmul_cols_scalar(x, M, K, W, W16, N, y, n, n1);
}

F16C_AVX2 void ea_matmul_f32_avx2(const float *x, int M, int K, const float *W, int N, float *y, int n0, int n1) {
    matmul_avx2(x, M, K, W, NULL, N, y, n0, n1);
}
F16C_AVX2 void ea_matmul_f16_avx2(const float *x, int M, int K, const uint16_t *W, int N, float *y, int n0, int n1) {
    matmul_avx2(x, M, K, NULL, W, N, y, n0, n1);
}
#endif

#if EA_ARM64
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
    if (n < n1) matmul_cols_scalar(x, M, K, W, W16, N, y, n, n1);
}

void ea_matmul_f32_neon(const float *x, int M, int K, const float *W, int N, float *y, int n0, int n1) {
    matmul_neon(x, M, K, W, NULL, N, y, n0, n1);
}
void ea_matmul_f16_neon(const float *x, int M, int K, const uint16_t *W, int N, float *y, int n0, int n1) {
    matmul_neon(x, M, K, NULL, W, N, y, n0, n1);
}
#endif

typedef struct {
    const ea_kctx *ctx;
    const float *x, *W;
    const uint16_t *W16;
    int M, K, N, units, n_tasks;
    float *y;
} fjob;

static void fmatmul_task(void *arg, int task, int thread) {
    (void)thread;
    const fjob *j = arg;
    const int n0 = (int)((long)j->units * task / j->n_tasks) * EA_NCHUNK;
    int n1 = (int)((long)j->units * (task + 1) / j->n_tasks) * EA_NCHUNK;
    if (n1 > j->N) n1 = j->N;
    if (n0 >= n1) return;
#if EA_X86
    if (j->ctx->isa == EA_ISA_AVX2) {
        if (j->W16) ea_matmul_f16_avx2(j->x, j->M, j->K, j->W16, j->N, j->y, n0, n1);
        else ea_matmul_f32_avx2(j->x, j->M, j->K, j->W, j->N, j->y, n0, n1);
        return;
    }
#endif
#if EA_ARM64
    if (j->ctx->isa != EA_ISA_SCALAR) {
        if (j->W16) ea_matmul_f16_neon(j->x, j->M, j->K, j->W16, j->N, j->y, n0, n1);
        else ea_matmul_f32_neon(j->x, j->M, j->K, j->W, j->N, j->y, n0, n1);
        return;
    }
#endif
    matmul_cols_scalar(j->x, j->M, j->K, j->W, j->W16, j->N, j->y, n0, n1);
}

static int fmatmul(ea_kctx *ctx, const float *x, int M, int K, const float *W, const uint16_t *W16,
                   int N, float *y) {
    if (M <= 0 || K <= 0 || N <= 0 || !x || !y || (!W && !W16)) return EA_KERR_ARG;
    const int units = (N + EA_NCHUNK - 1) / EA_NCHUNK;
    int n_tasks = ea_pool_size(ctx->pool);
    if (n_tasks > units) n_tasks = units;
    fjob j = {ctx, x, W, W16, M, K, N, units, n_tasks, y};
    ea_pool_run(ctx->pool, fmatmul_task, &j, n_tasks);
    return EA_KOK;
}

int ea_matmul_f32(ea_kctx *ctx, const float *x, int M, int K, const float *W, int N, float *y) {
    return fmatmul(ctx, x, M, K, W, NULL, N, y);
}

int ea_matmul_f16(ea_kctx *ctx, const float *x, int M, int K, const uint16_t *W, int N, float *y) {
    return fmatmul(ctx, x, M, K, NULL, W, N, y);
}
