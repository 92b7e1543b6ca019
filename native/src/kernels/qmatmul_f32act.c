/* MatMulNBits at accuracy_level 0..3: float activations against weights
 * dequantized as (q - zero_point) * scale, which is what onnxruntime's
 * CompFp32 path computes. No activation rounding happens, so results differ
 * from onnxruntime only by float summation order (~1e-7 relative) and do not
 * cascade into flipped int8 codes the way the accuracy_level 4 path can.
 *
 * Reads the file layout in place (no repack): each task dequantizes one row
 * of W into its own scratch and reuses it over the M rows of x. */
#include <math.h>
#include <string.h>

#include "internal.h"

#if EA_X86
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,fma")))
#endif
#if EA_ARM64
#include <arm_neon.h>
#endif

/* ---- scalar reference ---------------------------------------------------- */
static void dequant_row_scalar(const ea_qweight *w, int n, float *wf) {
    const int bs = w->block_size, nb = w->n_blocks;
    const size_t row = (size_t)n * nb * bs;
    for (int b = 0; b < nb; b++) {
        const float s = w->scales[(size_t)n * nb + b];
        const int zp = ea_qweight_zp(w, n, b);
        for (int i = 0; i < bs; i++) {
            const size_t k = row + (size_t)b * bs + i;
            const int q = w->bits == 8 ? w->data[k] : (k & 1) ? w->data[k / 2] >> 4 : w->data[k / 2] & 15;
            wf[b * bs + i] = (float)(q - zp) * s;
        }
    }
}

static float dot_scalar(const float *a, const float *b, int K) {
    float acc = 0.0f;
    for (int k = 0; k < K; k++) acc = fmaf(a[k], b[k], acc);
    return acc;
}

/* ---- AVX2 ---------------------------------------------------------------- */
#if EA_X86
AVX2 static inline void store8(float *dst, __m128i bytes8, __m256i zp, __m256 s) {
    const __m256i q = _mm256_sub_epi32(_mm256_cvtepu8_epi32(bytes8), zp);
    _mm256_storeu_ps(dst, _mm256_mul_ps(_mm256_cvtepi32_ps(q), s));
}

AVX2 static void dequant_row_avx2(const ea_qweight *w, int n, float *wf) {
    const int bs = w->block_size, nb = w->n_blocks;
    const uint8_t *src = w->data + (size_t)n * nb * bs * w->bits / 8;
    const __m128i low4 = _mm_set1_epi8(0x0F);
    for (int b = 0; b < nb; b++) {
        const __m256 s = _mm256_set1_ps(w->scales[(size_t)n * nb + b]);
        const __m256i zp = _mm256_set1_epi32(ea_qweight_zp(w, n, b));
        float *dst = wf + (size_t)b * bs;
        if (w->bits == 8) {
            for (int i = 0; i < bs; i += 8) store8(dst + i, _mm_loadl_epi64((const __m128i *)(src + b * bs + i)), zp, s);
            continue;
        }
        for (int i = 0; i < bs; i += 32) { /* 16 bytes = 32 nibbles, element 2j low, 2j+1 high */
            const __m128i v = _mm_loadu_si128((const __m128i *)(src + (b * bs + i) / 2));
            const __m128i lo = _mm_and_si128(v, low4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
            const __m128i e0 = _mm_unpacklo_epi8(lo, hi), e1 = _mm_unpackhi_epi8(lo, hi); /* natural order */
            store8(dst + i, e0, zp, s);
            store8(dst + i + 8, _mm_srli_si128(e0, 8), zp, s);
            store8(dst + i + 16, e1, zp, s);
            store8(dst + i + 24, _mm_srli_si128(e1, 8), zp, s);
        }
    }
}

AVX2 static float dot_avx2(const float *a, const float *b, int K) {
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

/* ---- NEON ---------------------------------------------------------------- */
#if EA_ARM64
static inline void store8_neon(float *dst, uint8x8_t bytes, int32x4_t zp, float32x4_t s) {
    const int16x8_t q = vreinterpretq_s16_u16(vmovl_u8(bytes));
    const int32x4_t a = vsubq_s32(vmovl_s16(vget_low_s16(q)), zp), b = vsubq_s32(vmovl_s16(vget_high_s16(q)), zp);
    vst1q_f32(dst, vmulq_f32(vcvtq_f32_s32(a), s));
    vst1q_f32(dst + 4, vmulq_f32(vcvtq_f32_s32(b), s));
}

static void dequant_row_neon(const ea_qweight *w, int n, float *wf) {
    const int bs = w->block_size, nb = w->n_blocks;
    const uint8_t *src = w->data + (size_t)n * nb * bs * w->bits / 8;
    for (int b = 0; b < nb; b++) {
        const float32x4_t s = vdupq_n_f32(w->scales[(size_t)n * nb + b]);
        const int32x4_t zp = vdupq_n_s32(ea_qweight_zp(w, n, b));
        float *dst = wf + (size_t)b * bs;
        if (w->bits == 8) {
            for (int i = 0; i < bs; i += 8) store8_neon(dst + i, vld1_u8(src + b * bs + i), zp, s);
            continue;
        }
        for (int i = 0; i < bs; i += 32) {
            const uint8x16_t v = vld1q_u8(src + (b * bs + i) / 2);
            const uint8x16x2_t e = vzipq_u8(vandq_u8(v, vdupq_n_u8(0x0F)), vshrq_n_u8(v, 4)); /* natural order */
            store8_neon(dst + i, vget_low_u8(e.val[0]), zp, s);
            store8_neon(dst + i + 8, vget_high_u8(e.val[0]), zp, s);
            store8_neon(dst + i + 16, vget_low_u8(e.val[1]), zp, s);
            store8_neon(dst + i + 24, vget_high_u8(e.val[1]), zp, s);
        }
    }
}

static float dot_neon(const float *a, const float *b, int K) {
    float32x4_t acc[4] = {vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0)};
    int k = 0;
    for (; k + 16 <= K; k += 16)
        for (int j = 0; j < 4; j++) acc[j] = vfmaq_f32(acc[j], vld1q_f32(a + k + 4 * j), vld1q_f32(b + k + 4 * j));
    for (; k + 4 <= K; k += 4) acc[0] = vfmaq_f32(acc[0], vld1q_f32(a + k), vld1q_f32(b + k));
    float r = vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
    for (; k < K; k++) r = fmaf(a[k], b[k], r);
    return r;
}
#endif

/* ---- dispatch -------------------------------------------------------------- */
typedef struct {
    const ea_kctx *ctx;
    const ea_qweight *w;
    const float *x;
    int M, units, n_tasks;
    float *y, *wbuf; /* wbuf: one dequantized row per pool thread */
    size_t wbuf_stride;
} fjob;

static void f32act_task(void *arg, int task, int thread) {
    const fjob *j = arg;
    const ea_qweight *w = j->w;
    int n0 = (int)((long)j->units * task / j->n_tasks) * EA_NCHUNK;
    int n1 = (int)((long)j->units * (task + 1) / j->n_tasks) * EA_NCHUNK;
    if (n1 > w->N) n1 = w->N;
    float *wf = j->wbuf + (size_t)thread * j->wbuf_stride;
    void (*dequant)(const ea_qweight *, int, float *) = dequant_row_scalar;
    float (*dot)(const float *, const float *, int) = dot_scalar;
#if EA_X86
    if (j->ctx->isa == EA_ISA_AVX2) dequant = dequant_row_avx2, dot = dot_avx2;
#endif
#if EA_ARM64
    if (j->ctx->isa == EA_ISA_NEON || j->ctx->isa == EA_ISA_NEON_DOTPROD) dequant = dequant_row_neon, dot = dot_neon;
#endif
    for (int n = n0; n < n1; n++) {
        dequant(w, n, wf);
        for (int m = 0; m < j->M; m++) j->y[(size_t)m * w->N + n] = dot(wf, j->x + (size_t)m * w->K, w->K);
    }
}

int ea_qmatmul_f32act(ea_kctx *ctx, const ea_qweight *w, const float *x, int M, float *y) {
    if (M <= 0 || !w || !w->data || !w->scales || !x || !y) return EA_KERR_ARG;
    const int threads = ea_pool_size(ctx->pool);
    const size_t stride = ((size_t)w->n_blocks * w->block_size + 15) & ~(size_t)15;
    float *wbuf = ea_scratch(ctx, sizeof(float) * stride * (size_t)threads);
    if (!wbuf) return EA_KERR_NOMEM;
    const int units = (w->N + EA_NCHUNK - 1) / EA_NCHUNK;
    int n_tasks = threads > 1 ? threads * EA_TASKS_PER_THREAD : 1;
    if (n_tasks > units) n_tasks = units;
    fjob j = {ctx, w, x, M, units, n_tasks, y, wbuf, stride};
    ea_pool_run(ctx->pool, f32act_task, &j, n_tasks);
    return EA_KOK;
}
