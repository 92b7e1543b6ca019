/* Kernel self-tests: every SIMD kernel against the scalar reference
 * (bit-exact for the integer paths), float kernels against double-precision
 * references, fp16 conversion against the hardware converter, the pool.
 *
 *   test_kernels                       run the self-tests (SIMD ISA from
 *                                      EDGEACT_ISA if set, else detected)
 *   test_kernels --qmatmul IN OUT      MatMulNBits on a file (for numpy):
 *     IN  = int32 M,K,N,bits,block_size,has_zp,threads; float x[M*K];
 *           uint8 B[N*nb*bs*bits/8]; float scales[N*nb]; uint8 zp[...]
 *           (has_zp 1), or float minimums[N*nb] (has_zp 2)
 *     OUT = float y[M*N]
 *   test_kernels --sparse IN OUT       input-sparse int4 GEMV on a file:
 *     IN  = int32 K,N,block_size,has_zp,threads,n_active; float x[K];
 *           uint8 B; float scales; uint8 zp (as above); int32 active[n_active]
 *     OUT = float y[N]
 * Exit status 0 on success; failures print one line each. */
#define _GNU_SOURCE
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../src/kernels/internal.h"
#include "../src/threadpool.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

#include "check.h"

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}
static float rndf(void) { return (float)((rnd() & 0xffffff) / 16777216.0 * 2.0 - 1.0); }

/* ---- MatMulNBits: SIMD vs scalar, bit-exact --------------------------- */
/* zp: 0 symmetric, 1 integer zero points, 2 float minimums */
typedef struct {
    int K, N, bits, bs, zp, M;
} qcase;

/* Block minimums as converters make them (-zp*scale, zp in [0, 15]), rounded to fp16 values
 * when f16; else a few of them surely not exact in fp16. */
static float *fill_minimums(int N, int nb, const float *scales, int f16) {
    float *mn = malloc(sizeof(float) * (size_t)N * nb);
    for (int i = 0; i < N * nb; i++) {
        mn[i] = -(float)(rnd() % 1600) / 100.0f * scales[i] * (i % 5 == 0 ? -1.0f : 1.0f);
        if (i % 9 == 4) mn[i] = 0.0f;
        if (f16) mn[i] = ea_f16_to_f32(ea_f32_to_f16(mn[i]));
        else if (i % 3 == 0) mn[i] = 0.1f + (float)i * 1e-7f; /* needs fp32 */
    }
    return mn;
}

static void fill_qweight(int K, int N, int bits, int bs, int has_zp, uint8_t **data, float **scales, uint8_t **zp) {
    const int nb = (K + bs - 1) / bs;
    const size_t bpb = (size_t)bs * bits / 8;
    *data = calloc((size_t)N * nb * bpb, 1);
    *scales = malloc(sizeof(float) * (size_t)N * nb);
    for (int n = 0; n < N; n++)
        for (int k = 0; k < nb * bs; k++) {
            if (k >= K) continue; /* the file pads K with zeros */
            unsigned v = rnd() & (bits == 4 ? 15 : 255);
            uint8_t *row = *data + (size_t)n * nb * bpb;
            if (bits == 8) row[k] = (uint8_t)v;
            else row[k / 2] |= (uint8_t)(k & 1 ? v << 4 : v);
        }
    for (int i = 0; i < N * nb; i++) (*scales)[i] = rndf() * 0.05f;
    *zp = NULL;
    if (has_zp) {
        const size_t zbytes = bits == 8 ? (size_t)N * nb : (size_t)N * ((nb + 1) / 2);
        *zp = malloc(zbytes);
        for (size_t i = 0; i < zbytes; i++) (*zp)[i] = (uint8_t)rnd();
    }
}

/* accuracy_level < 4: float activations. The scalar kernel against float64 math on the
 * dequantized weight, and the SIMD kernel against the scalar one; only the summation order
 * differs, so both hold to 1e-5 of sum |w x| (a wrong element or scale is off by far more). */
static void test_f32act_case(ea_isa isa, ea_kctx *sctx, ea_kctx *vctx, const ea_qweight *w, const float *x, qcase c,
                             float *ys, float *yv) {
    CHECK(ea_qmatmul_f32act(sctx, w, x, c.M, ys) == 0 && ea_qmatmul_f32act(vctx, w, x, c.M, yv) == 0, "f32act rc");
    const int nb = w->n_blocks;
    for (int m = 0; m < c.M; m++)
        for (int n = 0; n < c.N; n++) {
            double ref = 0, mag = 0;
            for (int k = 0; k < c.K; k++) {
                const size_t e = ((size_t)n * nb * c.bs + k);
                const int q = c.bits == 8 ? w->data[e] : (e & 1) ? w->data[e / 2] >> 4 : w->data[e / 2] & 15;
                const size_t nbk = (size_t)n * nb + k / c.bs;
                const double wk = (double)(float)(q - ea_qweight_zp(w, n, k / c.bs)) * w->scales[nbk] +
                                  (w->minimums ? w->minimums[nbk] : 0.0);
                ref += wk * x[(size_t)m * c.K + k];
                mag += fabs(wk * x[(size_t)m * c.K + k]);
            }
            const float got_s = ys[(size_t)m * c.N + n], got_v = yv[(size_t)m * c.N + n];
            CHECK(fabs(got_s - ref) <= 1e-5 * mag + 1e-30 && fabs(got_v - got_s) <= 1e-5 * mag + 1e-30,
                  "f32act %s M=%d K=%d N=%d bits=%d bs=%d zp=%d [%d,%d]: scalar %.9g simd %.9g ref %.9g",
                  ea_isa_name(isa), c.M, c.K, c.N, c.bits, c.bs, c.zp, m, n, got_s, got_v, ref);
        }
}

/* A weight of fill_qweight's with zp (0 symmetric, 1 integer zero points, 2 float minimums
 * from fill_minimums: *mins, fp16 values when mf16), prepared for isa. */
static void init_qweight(ea_qweight *w, ea_isa isa, int K, int N, int bits, int bs, int zp, const uint8_t *data,
                         const float *scales, const uint8_t *zpd, const float *mins) {
    const int rc = zp == 2 ? ea_qweight_init_min(w, isa, K, N, bits, bs, data, scales, mins)
                           : ea_qweight_init(w, isa, K, N, bits, bs, data, scales, zpd);
    CHECK(rc == EA_KOK, "weight init %s K=%d N=%d bits=%d zp=%d: rc %d", ea_isa_name(isa), K, N, bits, zp, rc);
}

/* f16: scales rounded to fp16 values, which the repack then stores as fp16; mf16: the same
 * for the minimums (c.zp == 2) */
static void test_qmatmul_case(ea_isa isa, ea_pool *pool, qcase c, int f16, int mf16) {
    uint8_t *data, *zp;
    float *scales;
    fill_qweight(c.K, c.N, c.bits, c.bs, c.zp == 1, &data, &scales, &zp);
    const int nb = (c.K + c.bs - 1) / c.bs;
    if (f16)
        for (int i = 0; i < c.N * nb; i++) scales[i] = ea_f16_to_f32(ea_f32_to_f16(scales[i]));
    float *mins = c.zp == 2 ? fill_minimums(c.N, nb, scales, mf16) : NULL;
    float *x = malloc(sizeof(float) * (size_t)c.M * c.K);
    for (int i = 0; i < c.M * c.K; i++) x[i] = rndf() * (i % 7 == 0 ? 4.0f : 1.0f);
    float *y_ref = malloc(sizeof(float) * (size_t)c.M * c.N);
    float *y = malloc(sizeof(float) * (size_t)c.M * c.N);
    ea_kctx sctx, vctx;
    ea_qweight ws, wv;
    ea_kctx_init(&sctx, EA_ISA_SCALAR, NULL);
    ea_kctx_init(&vctx, isa, pool);
    init_qweight(&ws, EA_ISA_SCALAR, c.K, c.N, c.bits, c.bs, c.zp, data, scales, zp, mins);
    init_qweight(&wv, isa, c.K, c.N, c.bits, c.bs, c.zp, data, scales, zp, mins);
    CHECK(wv.packed_f16 == (f16 && isa != EA_ISA_SCALAR), "%s: fp16 scales in the repack %d, expected %d",
          ea_isa_name(isa), wv.packed_f16, f16);
    CHECK(wv.packed_min_f16 == (mins && mf16 && isa != EA_ISA_SCALAR), "%s: fp16 minimums in the repack %d",
          ea_isa_name(isa), wv.packed_min_f16);
    CHECK(ea_qmatmul(&sctx, &ws, x, c.M, y_ref) == 0, "scalar qmatmul");
    int rc = ea_qmatmul(&vctx, &wv, x, c.M, y);
    CHECK(rc == 0, "qmatmul %s rc %d", ea_isa_name(isa), rc);
    int bad = -1;
    for (int i = 0; i < c.M * c.N; i++)
        if (memcmp(&y[i], &y_ref[i], sizeof(float)) != 0) { bad = i; break; }
    CHECK(bad < 0, "qmatmul %s threads=%d M=%d K=%d N=%d bits=%d bs=%d zp=%d f16=%d mf16=%d: y[%d]=%.9g scalar %.9g",
          ea_isa_name(isa), ea_pool_size(pool), c.M, c.K, c.N, c.bits, c.bs, c.zp, f16, mf16, bad,
          bad < 0 ? 0.0 : y[bad], bad < 0 ? 0.0 : y_ref[bad]);
    if (mins) { /* the reference itself: double math on the int8 activations against q*scale + minimum */
        const int kp = nb * c.bs;
        int8_t *xq = malloc((size_t)kp);
        float *sx = malloc(sizeof(float) * nb);
        int32_t *sumx = malloc(sizeof(int32_t) * nb);
        double worst = 0;
        for (int m = 0; m < c.M; m++) {
            ea_quantize_act(&sctx, x + (size_t)m * c.K, c.K, c.bs, xq, sx, sumx);
            for (int n = 0; n < c.N; n++) {
                double ref = 0, mag = 0;
                for (int k = 0; k < c.K; k++) {
                    const size_t e = (size_t)n * kp + k, nbk = (size_t)n * nb + k / c.bs;
                    const int q = c.bits == 8 ? data[e] : (e & 1) ? data[e / 2] >> 4 : data[e / 2] & 15;
                    const double wk = (double)q * scales[nbk] + mins[nbk], xk = (double)xq[k] * sx[k / c.bs];
                    ref += wk * xk;
                    mag += fabs(wk * xk);
                }
                const double err = fabs(y_ref[(size_t)m * c.N + n] - ref) / (mag + 1e-30);
                if (err > worst) worst = err;
            }
        }
        CHECK(worst <= 1e-5, "minimums reference M=%d K=%d N=%d bits=%d bs=%d: relative error %.3g", c.M, c.K, c.N,
              c.bits, c.bs, worst);
        free(xq); free(sx); free(sumx);
    }
    /* the scalar context also runs a weight packed for SIMD (from the file layout) */
    CHECK(ea_qmatmul(&sctx, &wv, x, c.M, y) == 0 && memcmp(y, y_ref, sizeof(float) * c.M * c.N) == 0,
          "scalar ctx on a packed weight");
    if (mins && isa != EA_ISA_SCALAR) { /* the repack alone, its owner's copy of the minimums dropped */
        wv.minimums = NULL;
        CHECK(ea_qmatmul(&vctx, &wv, x, c.M, y) == 0 && memcmp(y, y_ref, sizeof(float) * c.M * c.N) == 0,
              "%s: the repack without the file-layout minimums", ea_isa_name(isa));
        CHECK(ea_qmatmul(&sctx, &wv, x, c.M, y) == EA_KERR_ARG, "scalar ctx on a repack without its minimums");
    }
    test_f32act_case(isa, &sctx, &vctx, &ws, x, c, y_ref, y);
    ea_qweight_release(&ws);
    ea_qweight_release(&wv);
    ea_kctx_release(&sctx);
    ea_kctx_release(&vctx);
    free(data); free(scales); free(zp); free(mins); free(x); free(y_ref); free(y);
}

static void test_qmatmul(ea_isa isa, ea_pool *pool) {
    static const qcase cases[] = {
        {32, 16, 4, 32, 0, 1},   {64, 4, 4, 32, 1, 1},    {100, 37, 4, 32, 0, 1}, {100, 37, 4, 32, 1, 3},
        {257, 61, 4, 64, 1, 1},  {257, 61, 4, 64, 0, 5},  {300, 33, 4, 128, 1, 2}, {513, 130, 4, 128, 0, 1},
        {96, 19, 8, 32, 0, 1},   {96, 19, 8, 32, 1, 4},   {200, 70, 8, 64, 1, 1},  {333, 45, 8, 128, 0, 3},
        {333, 45, 8, 128, 1, 1}, {1000, 257, 4, 32, 1, 7}, {576, 1536, 4, 32, 0, 1}, {31, 5, 4, 32, 1, 2},
        /* float minimums: odd N, K off the block, decode and prefill (M up to 4-row tiles and tails) */
        {32, 16, 4, 32, 2, 1},   {100, 37, 4, 32, 2, 1},  {100, 37, 4, 32, 2, 3},  {257, 61, 4, 64, 2, 5},
        {300, 33, 4, 128, 2, 2}, {513, 130, 4, 128, 2, 1}, {1000, 257, 4, 32, 2, 7}, {576, 1536, 4, 32, 2, 1},
        {31, 5, 4, 32, 2, 4},    {96, 19, 8, 32, 2, 1},   {200, 70, 8, 64, 2, 2},  {333, 45, 8, 128, 2, 3},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        for (int f16 = 0; f16 < 2; f16++)
            for (int mf16 = 0; mf16 < 1 + (cases[i].zp == 2); mf16++) test_qmatmul_case(isa, pool, cases[i], f16, mf16);
    uint8_t d[16] = {0};
    float s[1] = {1};
    ea_qweight w;
    CHECK(ea_qweight_init_min(&w, isa, 32, 1, 4, 32, d, s, NULL) == EA_KERR_ARG, "minimums NULL rejected");
}

static void test_quantize(ea_isa isa) {
    ea_kctx sctx, vctx;
    ea_kctx_init(&sctx, EA_ISA_SCALAR, NULL);
    ea_kctx_init(&vctx, isa, NULL);
    for (int t = 0; t < 20; t++) {
        const int K = 1 + (int)(rnd() % 700), bs = 32 << (rnd() % 3), nb = (K + bs - 1) / bs;
        float *x = malloc(sizeof(float) * K);
        for (int i = 0; i < K; i++) x[i] = rndf() * (t % 3 == 0 ? 0.0f : 3.0f); /* all-zero blocks too */
        int8_t *q1 = malloc((size_t)nb * bs), *q2 = malloc((size_t)nb * bs);
        float s1[64], s2[64];
        int32_t u1[64], u2[64];
        ea_quantize_act(&sctx, x, K, bs, q1, s1, u1);
        ea_quantize_act(&vctx, x, K, bs, q2, s2, u2);
        CHECK(memcmp(q1, q2, (size_t)nb * bs) == 0 && memcmp(s1, s2, sizeof(float) * nb) == 0 &&
                  memcmp(u1, u2, sizeof(int32_t) * nb) == 0,
              "quantize %s K=%d bs=%d", ea_isa_name(isa), K, bs);
        /* round(x / scale) within 0.5 (+ float slack), tail zero, sums match */
        for (int b = 0; b < nb; b++) {
            int32_t sum = 0;
            for (int i = 0; i < bs; i++) {
                const int k = b * bs + i;
                sum += q1[k];
                if (k >= K) CHECK(q1[k] == 0, "tail not zero");
                else if (s1[b] > 0) CHECK(fabsf(x[k] / s1[b] - q1[k]) <= 0.5001f, "quantized value off");
            }
            CHECK(sum == u1[b], "sumx");
        }
        free(x); free(q1); free(q2);
    }
    ea_kctx_release(&sctx);
    ea_kctx_release(&vctx);
}

/* inf/nan activations: defined results (no float->int conversion of a
 * non-finite value, which UBSan flags): the block gets codes 0 and a nan
 * scale, every output it feeds is nan, other blocks are unaffected, and the
 * SIMD quantizer agrees. Also a denormal-tiny block (127/amax overflows)
 * counts as zero. */
static void test_quantize_nonfinite(ea_isa isa) {
    const int K = 96, bs = 32, N = 8;
    ea_kctx sctx, vctx;
    ea_kctx_init(&sctx, EA_ISA_SCALAR, NULL);
    ea_kctx_init(&vctx, isa, NULL);
    const float bad[3] = {INFINITY, -INFINITY, NAN};
    for (int t = 0; t < 3; t++) {
        float x[96];
        for (int i = 0; i < K; i++) x[i] = 0.25f * (float)(i % 7) - 0.7f;
        x[40] = bad[t];                  /* block 1 */
        for (int i = 64; i < 96; i++) x[i] = 1e-38f * (float)(i % 3); /* block 2: tiny */
        int8_t q1[96], q2[96];
        float s1[3], s2[3];
        int32_t u1[3], u2[3];
        ea_quantize_act(&sctx, x, K, bs, q1, s1, u1);
        ea_quantize_act(&vctx, x, K, bs, q2, s2, u2);
        CHECK(memcmp(q1, q2, sizeof q1) == 0 && memcmp(u1, u2, sizeof u1) == 0, "nonfinite codes %s", ea_isa_name(isa));
        CHECK(isnan(s1[1]) && isnan(s2[1]) && u1[1] == 0, "nonfinite block scale must be nan");
        CHECK(s1[0] == s2[0] && s1[0] > 0 && u1[0] == u2[0], "finite block unaffected");
        for (int i = 32; i < 96; i++) CHECK(q1[i] == 0, "nonfinite/tiny block codes must be 0");
        /* a weight over the first block only stays finite; over all blocks it is nan */
        uint8_t data[8 * 48];
        float scales[8 * 3];
        for (int i = 0; i < 8 * 48; i++) data[i] = (uint8_t)(i * 37 + 11);
        for (int i = 0; i < 8 * 3; i++) scales[i] = i % 3 == 0 ? 0.01f : 0.0f;
        float ys[8], yv[8];
        for (int pass = 0; pass < 2; pass++) {
            ea_qweight w;
            ea_kctx *c = pass ? &vctx : &sctx;
            CHECK(ea_qweight_init(&w, c->isa, K, N, 4, bs, data, scales, NULL) == EA_KOK, "init");
            CHECK(ea_qmatmul(c, &w, x, 1, pass ? yv : ys) == EA_KOK, "qmatmul");
            ea_qweight_release(&w);
        }
        for (int n = 0; n < N; n++) CHECK(isnan(ys[n]) && isnan(yv[n]), "nan in, nan out (n=%d)", n);
    }
    ea_kctx_release(&sctx);
    ea_kctx_release(&vctx);
}

/* ---- activation-sparse kernels: equal the dense kernel on masked x ---- */
/* extreme: all nibbles 15 and all activations equal, the int16 worst case (with minimums: large
 * ones, of both signs) */
/* f16: scales rounded to fp16 values, which the channel-major copy stores as fp16; mf16 the
 * same for the minimums (has_zp 2) */
static void test_sparse_case(ea_isa isa, ea_pool *pool, int K, int N, int bs, int has_zp, double frac, int extreme,
                             int f16, int mf16) {
    uint8_t *data, *zp;
    float *scales;
    const int nb = (K + bs - 1) / bs;
    fill_qweight(K, N, 4, bs, has_zp == 1, &data, &scales, &zp);
    if (f16)
        for (int i = 0; i < N * nb; i++) scales[i] = ea_f16_to_f32(ea_f32_to_f16(scales[i]));
    float *mins = has_zp == 2 ? fill_minimums(N, nb, scales, mf16) : NULL;
    if (mins && extreme)
        for (int i = 0; i < N * nb; i++) mins[i] = (i % 2 ? -1.0f : 1.0f) * (mf16 ? 65504.0f : 1e30f) * (i % 3 ? 1.0f : 0.5f);
    float *x = malloc(sizeof(float) * K), *xm = calloc((size_t)K, sizeof(float));
    float *y_ref = malloc(sizeof(float) * N), *y = malloc(sizeof(float) * N);
    int32_t *active = malloc(sizeof(int32_t) * K);
    int n_active = 0;
    for (int k = 0; k < K; k++) {
        x[k] = rndf() * (k % 5 == 0 ? 3.0f : 1.0f);
        if (k % 11 == 3) x[k] = 0.0f; /* active but zero */
        if (extreme) x[k] = 1.0f;
        if ((rnd() % 1000) < frac * 1000) { active[n_active++] = k; xm[k] = x[k]; }
    }
    if (extreme) memset(data, 0xFF, (size_t)N * ((K + bs - 1) / bs) * bs / 2);
    ea_kctx sctx, vctx;
    ea_kctx_init(&sctx, EA_ISA_SCALAR, NULL);
    ea_kctx_init(&vctx, isa, pool);
    ea_qweight ws, wv;
    ea_qweight_cm cm;
    init_qweight(&ws, EA_ISA_SCALAR, K, N, 4, bs, has_zp, data, scales, zp, mins);
    init_qweight(&wv, isa, K, N, 4, bs, has_zp, data, scales, zp, mins);
    CHECK(ea_qweight_cm_init(&cm, isa, &wv) == 0 && cm.scales_f16 == f16 && !cm.minimums == !mins &&
              cm.minimums_f16 == (mins && mf16),
          "cm init (fp16 scales %d, minimums %d, fp16 minimums %d)", f16, has_zp == 2, mf16);
    ea_qmatmul(&sctx, &ws, xm, 1, y_ref);
    /* with minimums, a second copy made from the repack alone (its owner dropped the file-layout array) */
    ea_qweight_cm cm_rp = cm;
    if (mins && wv.packed) {
        wv.minimums = NULL;
        CHECK(ea_qweight_cm_init(&cm_rp, isa, &wv) == 0 && cm_rp.minimums_f16 == mf16 &&
                  memcmp(cm_rp.minimums, cm.minimums, (mf16 ? 2 : 4) * (size_t)nb * cm.n_pad) == 0,
              "cm from the repack's minimums (%s, fp16 %d)", ea_isa_name(isa), mf16);
        wv.minimums = mins;
    }
    const struct { ea_kctx *ctx; const ea_qweight *dense; const ea_qweight_cm *cm; const char *what; } runs[] = {
        {&sctx, NULL, &cm, "scalar"}, {&vctx, NULL, &cm, "simd"}, {&vctx, &wv, &cm, "simd+dense fallback"},
        {&vctx, NULL, &cm_rp, "simd, copy from the repack"}};
    for (int r = 0; r < 4; r++) {
        for (int i = 0; i < N; i++) y[i] = NAN;
        int rc = ea_sparse_qgemv(runs[r].ctx, runs[r].cm, runs[r].dense, x, active, n_active, y);
        CHECK(rc == 0 && memcmp(y, y_ref, sizeof(float) * N) == 0,
              "sparse %s (%s) threads=%d K=%d N=%d bs=%d zp=%d f16=%d mf16=%d extreme=%d active=%d/%d: rc %d",
              runs[r].what, ea_isa_name(isa), ea_pool_size(pool), K, N, bs, has_zp, f16, mf16, extreme, n_active, K, rc);
    }
    if (cm_rp.data != cm.data) ea_qweight_cm_release(&cm_rp);
    /* output-row subset: the listed rows equal the dense rows, the rest untouched */
    for (int bits = 4; bits <= 8; bits += 4) {
        uint8_t *d2, *z2;
        float *s2;
        fill_qweight(K, N, bits, bs, has_zp == 1, &d2, &s2, &z2);
        float *m2 = mins ? fill_minimums(N, nb, s2, mf16) : NULL;
        ea_qweight w2;
        init_qweight(&w2, EA_ISA_SCALAR, K, N, bits, bs, has_zp, d2, s2, z2, m2);
        ea_qmatmul(&sctx, &w2, x, 1, y_ref);
        int32_t *rows = malloc(sizeof(int32_t) * N);
        int n_rows = 0;
        for (int n = 0; n < N; n++)
            if ((rnd() % 1000) < frac * 1000) rows[n_rows++] = n;
        for (int c = 0; c < 2; c++) {
            ea_kctx *ctx = c ? &vctx : &sctx;
            for (int i = 0; i < N; i++) y[i] = -7.0f;
            int ok = ea_qgemv_rows(ctx, &w2, x, rows, n_rows, y) == 0;
            for (int i = 0, j = 0; i < N; i++) {
                const int listed = j < n_rows && rows[j] == i;
                if (listed) j++;
                ok &= listed ? memcmp(&y[i], &y_ref[i], 4) == 0 : y[i] == -7.0f;
            }
            CHECK(ok, "qgemv_rows %s threads=%d bits=%d K=%d N=%d bs=%d zp=%d rows=%d", ea_isa_name(ctx->isa),
                  ea_pool_size(c ? pool : NULL), bits, K, N, bs, has_zp, n_rows);
        }
        if (m2) { /* the rows kernels read the file layout: without its minimums, refused */
            w2.minimums = NULL;
            CHECK(ea_qgemv_rows(&vctx, &w2, x, rows, n_rows, y) == EA_KERR_ARG, "qgemv_rows without the minimums");
        }
        ea_qweight_release(&w2);
        free(d2); free(s2); free(z2); free(m2); free(rows);
    }
    ea_qweight_cm_release(&cm);
    ea_qweight_release(&ws);
    ea_qweight_release(&wv);
    ea_kctx_release(&sctx);
    ea_kctx_release(&vctx);
    free(data); free(scales); free(zp); free(mins); free(x); free(xm); free(y_ref); free(y); free(active);
}

static void test_sparse(ea_isa isa, ea_pool *pool) {
    static const double fracs[] = {0.0, 0.05, 0.3, 0.7, 1.0};
    /* N = 300 and 330: five and six 64-row tiles, so threads get tile pairs and an odd last tile;
     * N = 2600: more tiles per thread than the prefetch distance; N = 256, 640 and 2048: even
     * tile counts, the decode shapes' case */
    static const int shapes[][4] = {{100, 37, 32, 1}, {256, 64, 32, 0}, {300, 70, 64, 1}, {520, 45, 128, 0}, {1030, 100, 32, 1},
                                    {128, 300, 32, 1}, {200, 330, 128, 0}, {260, 2600, 128, 1}, {520, 256, 128, 1},
                                    {300, 640, 64, 0}, {1030, 2048, 32, 1}, {130, 256, 128, 0}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (size_t f = 0; f < sizeof fracs / sizeof fracs[0]; f++) {
            test_sparse_case(isa, pool, shapes[s][0], shapes[s][1], shapes[s][2], shapes[s][3], fracs[f], 0,
                             (int)((s + f) & 1), 0);
            /* float minimums (zp 2), every pairing of fp16 / fp32 scales and minimums over the shapes */
            test_sparse_case(isa, pool, shapes[s][0], shapes[s][1], shapes[s][2], 2, fracs[f], 0, (int)((s + f) & 1),
                             (int)((s / 2 + f) & 1));
        }
    /* full 128-channel blocks at the int16 limits exercise the widening */
    test_sparse_case(isa, pool, 640, 33, 128, 1, 0.98, 0, 1, 0);
    test_sparse_case(isa, pool, 256, 40, 128, 0, 1.0, 1, 0, 0);
    for (int mf16 = 0; mf16 < 2; mf16++) {
        test_sparse_case(isa, pool, 640, 33, 128, 2, 0.98, 0, 1, mf16);
        test_sparse_case(isa, pool, 256, 40, 128, 2, 1.0, 1, 0, mf16);
        test_sparse_case(isa, pool, 300, 131, 32, 2, 0.5, 1, 1, mf16);
    }
    ea_kctx ctx;
    ea_kctx_init(&ctx, isa, NULL);
    ea_qweight w;
    ea_qweight_cm cm;
    uint8_t d[64] = {0};
    float sc[2] = {1, 1}, x[64] = {0}, y[2];
    ea_qweight_init(&w, isa, 64, 1, 4, 32, d, sc, NULL);
    ea_qweight_cm_init(&cm, isa, &w);
    const int32_t unsorted[2] = {5, 3}, outside[1] = {64};
    CHECK(ea_sparse_qgemv(&ctx, &cm, NULL, x, unsorted, 2, y) == EA_KERR_ARG, "unsorted active list");
    CHECK(ea_sparse_qgemv(&ctx, &cm, NULL, x, outside, 1, y) == EA_KERR_ARG, "active index >= K");
    CHECK(ea_qgemv_rows(&ctx, &w, x, outside, 1, y) == EA_KERR_ARG, "row index >= N");
    ea_qweight_cm_release(&cm);
    ea_qweight_release(&w);
    ea_kctx_release(&ctx);
}

/* The AVX2 sparse prep gives the scalar one's arrays: entries that round to 0 dropped,
 * blocks with none left dropped, non-finite blocks kept with a nan scale and no entries,
 * short quads padded; every block size, tails of 1..7 entries per block. */
#if EA_X86
typedef struct {
    ea_sparse_act a;
    void *mem[11];
} prep_bufs;

static void prep_alloc(prep_bufs *b, int n, int nb) {
    const size_t mq = (size_t)n / 4 + nb + 1;
    memset(b, 0, sizeof *b);
    b->a.blk = b->mem[0] = calloc((size_t)nb + 1, 4);
    b->a.start = b->mem[1] = calloc((size_t)nb + 1, 4);
    b->a.sx = b->mem[2] = calloc((size_t)nb + 1, 4);
    b->a.sumx = b->mem[3] = calloc((size_t)nb + 1, 4);
    b->a.ch = b->mem[4] = calloc((size_t)n + 1, 4);
    b->a.q = b->mem[5] = calloc((size_t)n + 4, 1);
    b->a.qstart = b->mem[6] = calloc((size_t)nb + 1, 4);
    b->a.qoff = b->mem[7] = calloc(4 * mq, sizeof(size_t));
    b->a.qx = b->mem[8] = calloc(mq, 4);
}

static void test_sparse_prep(void) {
    if (!ea_isa_available(EA_ISA_AVX2)) return;
    static const int block_sizes[] = {16, 32, 64, 128, 256};
    for (size_t bi = 0; bi < sizeof block_sizes / sizeof block_sizes[0]; bi++)
        for (int round = 0; round < 6; round++) {
            const int bs = block_sizes[bi], K = bs * 9 + 5, nb = (K + bs - 1) / bs;
            float *x = malloc(sizeof(float) * K);
            int32_t *active = malloc(sizeof(int32_t) * K);
            int n = 0;
            const int keep = 1 + round * 17 % 97; /* per mille-ish shares from 1% to all */
            for (int k = 0; k < K; k++) {
                x[k] = rndf() * (k % 7 == 0 ? 50.0f : 1.0f);
                if (k % 13 == 5) x[k] = 0.0f;
                if (k % 29 == 3) x[k] *= 1e-4f; /* rounds to 0 next to a large entry */
                if (k / bs == 2) x[k] = 0.0f;       /* a block with nothing left */
                if (round == 3 && k == 4 * bs + 1) x[k] = NAN;
                if (round == 4 && k == 6 * bs + 2) x[k] = -INFINITY;
                if (round == 5 || (int)(rnd() % 100) < keep) active[n++] = k;
            }
            prep_bufs r, v;
            prep_alloc(&r, n, nb);
            prep_alloc(&v, n, nb);
            const size_t row_bytes = 4160;
            ea_sparse_prep_scalar(x, bs, active, n, row_bytes, 1, &r.a);
            ea_sparse_prep_avx2(x, bs, active, n, row_bytes, &v.a);
            int ok = r.a.n_blocks == v.a.n_blocks;
            const int nbk = r.a.n_blocks, nq = ok ? r.a.qstart[nbk] : 0, ne = ok ? r.a.start[nbk] : 0;
            ok = ok && memcmp(r.a.blk, v.a.blk, 4 * (size_t)nbk) == 0 && memcmp(r.a.sx, v.a.sx, 4 * (size_t)nbk) == 0 &&
                 memcmp(r.a.sumx, v.a.sumx, 4 * (size_t)nbk) == 0 &&
                 memcmp(r.a.start, v.a.start, 4 * ((size_t)nbk + 1)) == 0 &&
                 memcmp(r.a.qstart, v.a.qstart, 4 * ((size_t)nbk + 1)) == 0 &&
                 memcmp(r.a.ch, v.a.ch, 4 * (size_t)ne) == 0 && memcmp(r.a.q, v.a.q, (size_t)ne) == 0 &&
                 memcmp(r.a.qoff, v.a.qoff, 4 * sizeof(size_t) * (size_t)nq) == 0 &&
                 memcmp(r.a.qx, v.a.qx, 4 * (size_t)nq) == 0;
            CHECK(ok, "sparse prep avx2 vs scalar: bs %d round %d, %d active, %d/%d blocks", bs, round, n,
                  v.a.n_blocks, r.a.n_blocks);
            CHECK(round == 5 ? nbk == nb - 1 : nbk < nb, "prep drops the empty block (bs %d round %d: %d of %d)", bs,
                  round, nbk, nb);
            for (int i = 0; i < 11; i++) { free(r.mem[i]); free(v.mem[i]); }
            free(x);
            free(active);
        }
}
#endif

/* ea_sparse_pf_at's schedule, walked as the AVX-512 kernel walks it (blocks, their chunks,
 * the thread's tile pairs): every line a chunk reads was prefetched exactly min(distance,
 * range) tiles of work earlier, from inside the thread's range, except the first chunk's
 * first tiles (nothing runs before them). */
static void test_sparse_pf(void) {
    static const int quads[] = {7, 1, 0, 13, 3, 2}; /* per block; a block of zeros has none */
    enum { NB = sizeof quads / sizeof quads[0], NQ = 26, TMAX = 64 };
    int qstart[NB + 1] = {0};
    for (int b = 0; b < NB; b++) qstart[b + 1] = qstart[b] + quads[b];
    static const int ranges[][2] = {{0, 4}, {0, 16}, {6, 22}, {0, 18}, {10, 54}, {2, 64}};
    for (size_t r = 0; r < sizeof ranges / sizeof ranges[0]; r++) {
        const int t0 = ranges[r][0], t1 = ranges[r][1];
        const int lead = (EA_SPARSE_PF_TILES < t1 - t0 ? EA_SPARSE_PF_TILES : t1 - t0) / 2;
        long when[NQ][TMAX], step = 0;
        for (int q = 0; q < NQ; q++)
            for (int t = 0; t < TMAX; t++) when[q][t] = -1;
        int bad = 0, first_chunk = 1;
        for (int ab = 0; ab < NB; ab++) {
            const int q0 = qstart[ab], q1 = qstart[ab + 1], qn = ab + 1 < NB ? qstart[ab + 2] : q1;
            for (int c0 = q0;; c0 += EA_SPARSE_CHUNK_QUADS) {
                const ea_sparse_chunk ch = ea_sparse_chunk_at(q0, q1, qn, c0);
                for (int t = t0; t < t1; t += 2, step++) {
                    const ea_sparse_pf pf = ea_sparse_pf_at(ch, c0, t, t0, t1);
                    bad += pf.t < t0 || pf.t >= t1 || (pf.t - t0) % 2 != 0;
                    for (int q = pf.q0; q < pf.q1 && pf.t >= 0 && pf.t < TMAX; q++) when[q][pf.t] = step;
                    for (int q = c0; q < ch.c1; q++) {
                        const int cold = first_chunk && t < t0 + 2 * lead;
                        bad += cold ? when[q][t] != -1 && when[q][t] != step : when[q][t] != step - lead;
                    }
                }
                first_chunk = 0;
                if (ch.last) break;
            }
        }
        CHECK(!bad, "prefetch schedule over tiles [%d, %d): %d lines early, late or outside", t0, t1, bad);
    }
}

/* Siblings stacked along N (q/k/v, gate/up): each one's rows equal its own dense result.
 * zpm: 1 integer zero points, 2 float minimums. */
static void test_sparse_concat(ea_isa isa, ea_pool *pool, const int Ns[3], int zpm) {
    /* ragged, so members straddle 64-row tiles */
    const int K = 300, bs = 32, total = Ns[0] + Ns[1] + Ns[2];
    for (int f16 = 0; f16 < 2; f16++) {
        uint8_t *data[3], *zp[3];
        float *scales[3], *mins[3] = {NULL, NULL, NULL};
        ea_qweight ws[3], wv[3];
        const ea_qweight *list[3];
        ea_kctx sctx, vctx;
        ea_kctx_init(&sctx, EA_ISA_SCALAR, NULL);
        ea_kctx_init(&vctx, isa, pool);
        for (int i = 0; i < 3; i++) {
            fill_qweight(K, Ns[i], 4, bs, zpm == 1, &data[i], &scales[i], &zp[i]);
            if (f16 || i != 1) /* without f16, member 1 keeps fp32 scales (and minimums): the whole copy must */
                for (int j = 0; j < Ns[i] * ((K + bs - 1) / bs); j++) scales[i][j] = ea_f16_to_f32(ea_f32_to_f16(scales[i][j]));
            if (zpm == 2) mins[i] = fill_minimums(Ns[i], (K + bs - 1) / bs, scales[i], f16 || i != 1);
            init_qweight(&ws[i], EA_ISA_SCALAR, K, Ns[i], 4, bs, zpm, data[i], scales[i], zp[i], mins[i]);
            init_qweight(&wv[i], isa, K, Ns[i], 4, bs, zpm, data[i], scales[i], zp[i], mins[i]);
            list[i] = &wv[i];
        }
        ea_qweight_cm cm;
        CHECK(ea_qweight_cm_init_concat(&cm, isa, list, 3) == 0 && cm.N == total && cm.scales_f16 == f16 &&
                  cm.minimums_f16 == (zpm == 2 && f16),
              "stacked cm init (fp16 %d, zp %d)", f16, zpm);
        float *x = malloc(sizeof(float) * K), *xm = calloc((size_t)K, sizeof(float));
        float *y = malloc(sizeof(float) * total), *y_ref = malloc(sizeof(float) * total);
        int32_t *active = malloc(sizeof(int32_t) * K);
        int n_active = 0;
        for (int k = 0; k < K; k++) {
            x[k] = rndf();
            if (rnd() % 2) { active[n_active++] = k; xm[k] = x[k]; }
        }
        for (int i = 0, off = 0; i < 3; off += Ns[i], i++) ea_qmatmul(&sctx, &ws[i], xm, 1, y_ref + off);
        for (int c = 0; c < 2; c++) {
            for (int i = 0; i < total; i++) y[i] = NAN;
            const int rc = ea_sparse_qgemv(c ? &vctx : &sctx, &cm, NULL, x, active, n_active, y);
            CHECK(rc == 0 && memcmp(y, y_ref, sizeof(float) * total) == 0, "stacked sparse %s threads=%d fp16 %d zp %d: rc %d",
                  c ? ea_isa_name(isa) : "scalar", ea_pool_size(c ? pool : NULL), f16, zpm, rc);
        }
        { /* each member's rows straight to its own output, from the thread that computed them */
            float *outs[3], *scratch = malloc(sizeof(float) * cm.n_pad);
            for (int i = 0; i < 3; i++) outs[i] = malloc(sizeof(float) * Ns[i]);
            for (int c = 0; c < 2; c++) {
                for (int i = 0; i < 3; i++)
                    for (int n = 0; n < Ns[i]; n++) outs[i][n] = NAN; /* each run must write every row */
                const int rc = ea_sparse_qgemv_split(c ? &vctx : &sctx, &cm, x, active, n_active, scratch, outs, Ns, 3);
                int same = rc == 0;
                for (int i = 0, off = 0; i < 3; off += Ns[i], i++)
                    same &= memcmp(outs[i], y_ref + off, sizeof(float) * Ns[i]) == 0;
                CHECK(same, "split sparse %s threads=%d fp16 %d zp %d: rc %d", c ? ea_isa_name(isa) : "scalar",
                      ea_pool_size(c ? pool : NULL), f16, zpm, rc);
            }
            const int short_ns[3] = {Ns[0], Ns[1], Ns[2] - 1};
            CHECK(ea_sparse_qgemv_split(&vctx, &cm, x, active, n_active, scratch, outs, short_ns, 3) == EA_KERR_ARG,
                  "split outputs not covering N");
            float *const keep = outs[1];
            outs[1] = NULL;
            CHECK(ea_sparse_qgemv_split(&vctx, &cm, x, active, n_active, scratch, outs, Ns, 3) == EA_KERR_ARG,
                  "split output NULL");
            outs[1] = keep;
            free(scratch);
            for (int i = 0; i < 3; i++) free(outs[i]);
        }
        CHECK(ea_masked_qgemv(&vctx, &wv[2], x, active, n_active, y) == 0 &&
              memcmp(y, y_ref + Ns[0] + Ns[1], sizeof(float) * Ns[2]) == 0, "masked dense GEMV (%s)", ea_isa_name(isa));
        { /* the masked copy of x is kept between calls: a call with half the channels must not see the others */
            int32_t *half = malloc(sizeof(int32_t) * (size_t)(n_active + 1));
            float *xm = calloc((size_t)K, sizeof(float)), *r = malloc(sizeof(float) * Ns[2]);
            int nh = 0;
            for (int i = 0; i < n_active; i += 2) half[nh++] = active[i];
            for (int i = 0; i < nh; i++) xm[half[i]] = x[half[i]];
            const int rc = ea_qmatmul(&vctx, &wv[2], xm, 1, r);
            CHECK(!rc && ea_masked_qgemv(&vctx, &wv[2], x, half, nh, y) == 0 && memcmp(y, r, sizeof(float) * Ns[2]) == 0,
                  "masked dense GEMV after a call with more channels (%s)", ea_isa_name(isa));
            free(half); free(xm); free(r);
        }
        CHECK(ea_sparse_prefers_dense(&cm, K) && !ea_sparse_prefers_dense(&cm, K / 10) == (total >= EA_SPARSE_MIN_N),
              "crossover rule");
        ea_qweight_cm bad;
        ea_qweight w_other;
        ea_qweight_init(&w_other, EA_ISA_SCALAR, K - 32, Ns[0], 4, bs, data[0], scales[0], zp[0]);
        const ea_qweight *mixed_k[2] = {&ws[0], &w_other};
        CHECK(ea_qweight_cm_init_concat(&bad, isa, mixed_k, 2) == EA_KERR_ARG, "stacking weights of different K");
        ea_qweight_init(&w_other, EA_ISA_SCALAR, K, Ns[0], 4, bs, data[0], scales[0], NULL);
        const ea_qweight *mixed_zp[2] = {&ws[0], &w_other};
        CHECK(ea_qweight_cm_init_concat(&bad, isa, mixed_zp, 2) == EA_KERR_ARG,
              "stacking with and without zero points (or minimums)");
        ea_qweight_cm_release(&cm);
        for (int i = 0; i < 3; i++) {
            ea_qweight_release(&ws[i]);
            ea_qweight_release(&wv[i]);
            free(data[i]); free(scales[i]); free(zp[i]); free(mins[i]);
        }
        ea_kctx_release(&sctx);
        ea_kctx_release(&vctx);
        free(x); free(xm); free(y); free(y_ref); free(active);
    }
}

/* ---- float matmuls against a double reference ------------------------ */
static void test_fmatmul(ea_isa isa, ea_pool *pool, int f16) {
    static const int shapes[][3] = {{1, 64, 48}, {1, 100, 37}, {3, 77, 50}, {5, 128, 160}, {4, 33, 16}, {9, 10, 3}};
    ea_kctx ctxs[2];
    ea_kctx_init(&ctxs[0], EA_ISA_SCALAR, NULL);
    ea_kctx_init(&ctxs[1], isa, pool);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int M = shapes[s][0], K = shapes[s][1], N = shapes[s][2];
        float *x = malloc(sizeof(float) * M * K), *W = malloc(sizeof(float) * K * N), *y = malloc(sizeof(float) * M * N);
        uint16_t *W16 = malloc(sizeof(uint16_t) * K * N);
        for (int i = 0; i < M * K; i++) x[i] = rndf();
        for (int i = 0; i < K * N; i++) {
            W16[i] = ea_f32_to_f16(rndf());
            W[i] = ea_f16_to_f32(W16[i]);
        }
        for (int c = 0; c < 2; c++) {
            int rc = f16 ? ea_matmul_f16(&ctxs[c], x, M, K, W16, N, y) : ea_matmul_f32(&ctxs[c], x, M, K, W, N, y);
            CHECK(rc == 0, "fmatmul rc");
            for (int m = 0; m < M; m++)
                for (int n = 0; n < N; n++) {
                    double ref = 0, mag = 0;
                    for (int k = 0; k < K; k++) {
                        ref += (double)x[m * K + k] * W[k * N + n];
                        mag += fabs((double)x[m * K + k] * W[k * N + n]);
                    }
                    /* float accumulation in any order: K * eps * sum|terms| bounds it */
                    const double tol = K * 1.2e-7 * mag + 1e-30;
                    CHECK(fabs(y[m * N + n] - ref) <= tol, "matmul_%s %s M=%d K=%d N=%d y[%d,%d]=%g ref %g",
                          f16 ? "f16" : "f32", ea_isa_name(ctxs[c].isa), M, K, N, m, n, y[m * N + n], ref);
                }
        }
        free(x); free(W); free(y); free(W16);
    }
    ea_kctx_release(&ctxs[0]);
    ea_kctx_release(&ctxs[1]);
}

/* ---- fp16 conversion: exhaustive against the hardware converter -------- */
#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("f16c"))) static float hw_h2f(uint16_t h) { return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h))); }
__attribute__((target("f16c"))) static uint16_t hw_f2h(float f) {
    return (uint16_t)_mm_cvtsi128_si32(_mm_cvtps_ph(_mm_set_ss(f), _MM_FROUND_TO_NEAREST_INT));
}
static int hw_f16(void) { __builtin_cpu_init(); return __builtin_cpu_supports("f16c"); }
#elif defined(__aarch64__)
static float hw_h2f(uint16_t h) { return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0); }
static uint16_t hw_f2h(float f) { return vget_lane_u16(vreinterpret_u16_f16(vcvt_f16_f32(vdupq_n_f32(f))), 0); }
static int hw_f16(void) { return 1; }
#else
static float hw_h2f(uint16_t h) { return ea_f16_to_f32(h); }
static uint16_t hw_f2h(float f) { return ea_f32_to_f16(f); }
static int hw_f16(void) { return 0; }
#endif

static void test_f16(void) {
    if (!hw_f16()) return;
    for (uint32_t h = 0; h < 65536; h++) {
        const float a = ea_f16_to_f32((uint16_t)h), b = hw_h2f((uint16_t)h);
        if (isnan(b)) { CHECK(isnan(a), "f16 %04x nan", h); continue; }
        CHECK(memcmp(&a, &b, 4) == 0, "f16_to_f32(%04x) = %g, hardware %g", h, a, b);
        CHECK(ea_f32_to_f16(a) == h, "f16 round trip %04x", h);
    }
    for (int i = 0; i < 200000; i++) {
        uint32_t bits = rnd() << 16 ^ rnd();
        float f;
        memcpy(&f, &bits, 4);
        if (isnan(f)) continue;
        CHECK(ea_f32_to_f16(f) == hw_f2h(f), "f32_to_f16(%08x) = %04x, hardware %04x", bits, ea_f32_to_f16(f), hw_f2h(f));
    }
}

/* ---- transformer pieces against double references ---------------------- */
static void test_attention(ea_isa isa, ea_pool *pool) {
    static const int cases[][7] = {/* S, H, kvh, hd, pos0, capacity, q scale */
                                   {1, 4, 2, 16, 0, 8, 2}, {1, 6, 2, 32, 9, 16, 2}, {5, 4, 4, 8, 3, 10, 2}, {7, 8, 1, 64, 0, 7, 2},
                                   /* long cache (threaded, 8-wide exp + tail), hd not a multiple of 8 */
                                   {1, 9, 3, 64, 300, 320, 2}, {3, 4, 2, 12, 37, 48, 2}, {2, 2, 1, 128, 61, 70, 2},
                                   /* decode shapes (TinyLlama, SmolLM2 heads), a cache longer than 2048, and
                                    * scores spread wide enough that most exps underflow */
                                   {1, 32, 4, 64, 200, 256, 2}, {1, 4, 2, 12, 130, 140, 2}, {1, 2, 1, 16, 2500, 2600, 2},
                                   {1, 9, 3, 64, 499, 512, 24}};
    ea_kctx ctx;
    ea_kctx_init(&ctx, isa, pool);
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const int S = cases[c][0], H = cases[c][1], kvh = cases[c][2], hd = cases[c][3], pos0 = cases[c][4],
                  cap = cases[c][5], qs = cases[c][6];
        float *q = malloc(sizeof(float) * S * H * hd), *out = malloc(sizeof(float) * S * H * hd);
        float *kc = malloc(sizeof(float) * kvh * cap * hd), *vc = malloc(sizeof(float) * kvh * cap * hd);
        for (int i = 0; i < S * H * hd; i++) q[i] = rndf() * (float)qs;
        for (int i = 0; i < kvh * cap * hd; i++) { kc[i] = rndf() * 2; vc[i] = rndf(); }
        double *sc = malloc(sizeof(double) * cap);
        const float scale = 1.0f / sqrtf((float)hd);
        CHECK(ea_attention(&ctx, q, S, H, hd, kc, vc, kvh, cap, pos0, scale, out) == 0, "attention rc");
        for (int s = 0; s < S; s++)
            for (int h = 0; h < H; h++) {
                const int g = h / (H / kvh), L = pos0 + s + 1;
                double mx = -1e300, sum = 0;
                for (int t = 0; t < L; t++) {
                    double d = 0;
                    for (int i = 0; i < hd; i++) d += (double)q[(s * H + h) * hd + i] * kc[(g * cap + t) * hd + i];
                    sc[t] = d * scale;
                    if (sc[t] > mx) mx = sc[t];
                }
                for (int t = 0; t < L; t++) { sc[t] = exp(sc[t] - mx); sum += sc[t]; }
                for (int i = 0; i < hd; i++) {
                    double o = 0;
                    for (int t = 0; t < L; t++) o += sc[t] / sum * vc[(g * cap + t) * hd + i];
                    CHECK(fabs(out[(s * H + h) * hd + i] - o) <= 1e-5, "attention case %zu s=%d h=%d i=%d: %g vs %g",
                          c, s, h, i, out[(s * H + h) * hd + i], o);
                }
            }
        free(q); free(out); free(kc); free(vc); free(sc);
    }
    CHECK(ea_attention(&ctx, NULL, 2, 6, 8, NULL, NULL, 4, 8, 0, 1.0f, NULL) == EA_KERR_ARG, "H %% kv_heads");
    CHECK(ea_attention(&ctx, NULL, 2, 4, 8, NULL, NULL, 2, 8, 7, 1.0f, NULL) == EA_KERR_ARG, "capacity");
    ea_kctx_release(&ctx);
}

/* Prefill-sized SiLU and RMSNorm: the SIMD exp, the ragged tail and the split over a pool
 * against float64 math (exp polynomial ~2e-7 relative, so 1e-6). */
static void test_wide_elementwise(ea_isa isa) {
    enum { N = 40000 + 13, R = 61, DIM = 1001 };
    ea_pool *pool = ea_pool_create(2);
    ea_kctx ctx;
    ea_kctx_init(&ctx, isa, pool);
    float *g = malloc(sizeof(float) * N), *u = malloc(sizeof(float) * N), *o = malloc(sizeof(float) * N);
    static const float edge[] = {0.0f, -0.0f, 88.0f, -88.0f, 1e-30f, -1e-30f, 100.0f, -100.0f, 20.0f, -20.0f};
    for (int i = 0; i < N; i++) {
        g[i] = i < 10 ? edge[i] : rndf() * 30.0f;
        u[i] = rndf() * 2.0f;
    }
    ea_silu_mul(&ctx, g, u, N, o);
    int bad = -1;
    for (int i = 0; i < N && bad < 0; i++) {
        const double ref = g[i] / (1.0 + exp(-(double)g[i])) * u[i];
        if (!(fabs(o[i] - ref) <= 1e-6 * fabs(g[i] * u[i]) + 1e-37)) bad = i;
    }
    CHECK(bad < 0, "silu %s wide: i=%d g=%g got %.9g", ea_isa_name(isa), bad, bad < 0 ? 0.0 : g[bad],
          bad < 0 ? 0.0 : o[bad]);
    ea_silu_mul(&ctx, g, NULL, N, o); /* SiLU alone */
    bad = -1;
    for (int i = 0; i < N && bad < 0; i++) {
        const double ref = g[i] / (1.0 + exp(-(double)g[i]));
        if (!(fabs(o[i] - ref) <= 1e-6 * fabs(g[i]) + 1e-37)) bad = i;
    }
    CHECK(bad < 0, "silu alone %s wide: i=%d g=%g got %.9g", ea_isa_name(isa), bad, bad < 0 ? 0.0 : g[bad],
          bad < 0 ? 0.0 : o[bad]);
    float *x = malloc(sizeof(float) * R * DIM), *w = malloc(sizeof(float) * DIM), *y = malloc(sizeof(float) * R * DIM);
    for (int i = 0; i < R * DIM; i++) x[i] = rndf() * (i % 97 == 0 ? 50.0f : 1.0f);
    for (int i = 0; i < DIM; i++) w[i] = rndf();
    ea_rmsnorm(&ctx, x, w, R, DIM, 1e-6f, y);
    for (int r = 0; r < R; r++) {
        double ss = 0;
        for (int i = 0; i < DIM; i++) ss += (double)x[r * DIM + i] * x[r * DIM + i];
        const double inv = 1.0 / sqrt(ss / DIM + 1e-6);
        for (int i = 0; i < DIM; i++)
            CHECK(fabs(y[r * DIM + i] - x[r * DIM + i] * inv * w[i]) <= 1e-5 * (1 + fabs(x[r * DIM + i] * inv)),
                  "rmsnorm wide r=%d i=%d", r, i);
    }
    free(g); free(u); free(o); free(x); free(w); free(y);
    ea_kctx_release(&ctx);
    ea_pool_destroy(pool);
}

static void test_small_ops(ea_isa isa) {
    ea_kctx ctx;
    ea_kctx_init(&ctx, isa, NULL);
    enum { R = 3, D = 45, S = 3, H = 2, HD = 10, MAXP = 9 };
    float x[R * D], w[D], y[R * D];
    for (int i = 0; i < R * D; i++) x[i] = rndf() * 3;
    for (int i = 0; i < D; i++) w[i] = rndf();
    ea_rmsnorm(&ctx, x, w, R, D, 1e-5f, y);
    for (int r = 0; r < R; r++) {
        double ss = 0;
        for (int i = 0; i < D; i++) ss += (double)x[r * D + i] * x[r * D + i];
        for (int i = 0; i < D; i++) {
            double ref = x[r * D + i] / sqrt(ss / D + 1e-5) * w[i];
            CHECK(fabs(y[r * D + i] - ref) <= 1e-5 * (1 + fabs(ref)), "rmsnorm");
        }
    }
    float q[S * H * HD], q0[S * H * HD], cs[MAXP * HD / 2], sn[MAXP * HD / 2];
    for (int i = 0; i < S * H * HD; i++) q[i] = q0[i] = rndf();
    for (int p = 0; p < MAXP; p++)
        for (int i = 0; i < HD / 2; i++) {
            double th = p * pow(10000.0, -2.0 * i / HD);
            cs[p * HD / 2 + i] = (float)cos(th);
            sn[p * HD / 2 + i] = (float)sin(th);
        }
    CHECK(ea_rope(&ctx, q, S, H, HD, cs, sn, MAXP, 4) == 0, "rope rc");
    for (int s = 0; s < S; s++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < HD; i++) {
                const float *v = q0 + (s * H + h) * HD;
                const int p = 4 + s, j = i % (HD / 2);
                double rot = i < HD / 2 ? -v[i + HD / 2] : v[i - HD / 2];
                double ref = v[i] * cos(p * pow(10000.0, -2.0 * j / HD)) + rot * sin(p * pow(10000.0, -2.0 * j / HD));
                CHECK(fabs(q[(s * H + h) * HD + i] - ref) <= 1e-5, "rope s=%d h=%d i=%d", s, h, i);
            }
    CHECK(ea_rope(&ctx, q, S, H, HD, cs, sn, MAXP, 7) == EA_KERR_ARG, "rope past the cache");
    float g[D], u[D], o[D];
    for (int i = 0; i < D; i++) { g[i] = rndf() * 8; u[i] = rndf(); }
    ea_silu_mul(&ctx, g, u, D, o);
    for (int i = 0; i < D; i++) CHECK(fabs(o[i] - g[i] / (1 + exp(-(double)g[i])) * u[i]) <= 1e-6 * (1 + fabs(g[i])), "silu");
    ea_add(&ctx, g, u, D, o);
    for (int i = 0; i < D; i++) CHECK(o[i] == g[i] + u[i], "add");
    test_wide_elementwise(isa);
    uint16_t t16[5 * 7];
    float t32[5 * 7], e[3 * 7];
    for (int i = 0; i < 35; i++) { t16[i] = ea_f32_to_f16(rndf()); t32[i] = ea_f16_to_f32(t16[i]); }
    const int64_t ids[3] = {4, 0, 2}, bad[1] = {5};
    CHECK(ea_embed_f16(&ctx, t16, 5, 7, ids, 3, e) == 0 && memcmp(e, t32 + 28, 7 * 4) == 0 &&
              memcmp(e + 7, t32, 7 * 4) == 0 && memcmp(e + 14, t32 + 14, 7 * 4) == 0, "embed f16");
    CHECK(ea_embed_f32(&ctx, t32, 5, 7, ids, 3, e) == 0 && memcmp(e + 7, t32, 7 * 4) == 0, "embed f32");
    CHECK(ea_embed_f32(&ctx, t32, 5, 7, bad, 1, e) == EA_KERR_ARG, "embed id out of range");
    ea_kctx_release(&ctx);
}

/* ---- thread pool ------------------------------------------------------- */
typedef struct {
    _Atomic int hits[64];
    _Atomic long sum;
} pool_probe;

static void probe_task(void *arg, int task, int thread) {
    pool_probe *p = arg;
    (void)thread;
    atomic_fetch_add(&p->hits[task], 1);
    atomic_fetch_add(&p->sum, task);
}

/* Every 8-channel keep pattern once (pattern p at channels 8p..8p+7; kept lanes sit on
 * their threshold exactly, dropped ones just above it), against the scalar rule. */
static void test_sparsify_patterns(ea_kctx *ctx) {
    enum { N = 256 * 8 + 5 };
    float x[N], thr[N], cs[N], y[N], yr[N];
    int32_t act[N], ar[N];
    for (int k = 0; k < N; k++) {
        const int keep = (k / 8 < 256) ? ((k / 8) >> (k % 8)) & 1 : k & 1;
        x[k] = (k & 2 ? -1.0f : 1.0f) * (0.25f + (float)(k % 13));
        cs[k] = 0.5f + (float)(k % 3);
        thr[k] = fabsf(x[k]) * cs[k];
        if (!keep) thr[k] = nextafterf(thr[k], INFINITY);
    }
    const int nr = ea_sparsify_scalar(x, thr, 1, cs, 0, N, yr, ar);
    const int na = ea_sparsify(ctx, x, thr, 1, cs, N, y, act);
    CHECK(nr == 256 * 4 + 2, "sparsify patterns: scalar kept %d", nr);
    CHECK(na == nr && !memcmp(y, yr, sizeof y) && !memcmp(act, ar, sizeof(int32_t) * (size_t)nr),
          "sparsify %s: the 256 keep patterns differ from scalar (%d vs %d kept)", ea_isa_name(ctx->isa), na, nr);
}

/* Sparsify against the scalar rule on per-channel arrays, bit for bit (y and the active
 * list): lengths around the vector widths, ties |x|*c == thr on random lanes, NaN,
 * infinities and signed zeros; with one threshold (thr_step 0) and without col_scale
 * (NULL: ones) as well, which must equal the arrays filled with that threshold and ones. */
static void test_sparsify(ea_isa isa) {
    enum { NMAX = 2048 + 13 };
    ea_kctx ctx;
    ea_kctx_init(&ctx, isa, NULL);
    float *x = malloc(sizeof(float) * NMAX), *thr = malloc(sizeof(float) * NMAX), *cs = malloc(sizeof(float) * NMAX);
    float *y = malloc(sizeof(float) * NMAX), *yr = malloc(sizeof(float) * NMAX);
    int32_t *act = malloc(sizeof(int32_t) * NMAX), *ar = malloc(sizeof(int32_t) * NMAX);
    static const float edge[] = {NAN, -NAN, INFINITY, -INFINITY, 0.0f, -0.0f, 1e-40f, -1e-40f};
    static const int lens[] = {0, 1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 64, 577, NMAX};
    for (int mode = 0; mode < 4; mode++) {
        const int uthr = mode & 1, ones = mode >> 1;
        for (size_t li = 0; li < sizeof lens / sizeof lens[0]; li++) {
            const int n = lens[li];
            for (int i = 0; i < n; i++) {
                x[i] = rnd() % 13 == 0 ? edge[rnd() % 8] : rndf() * 4.0f;
                cs[i] = ones || rnd() % 7 == 0 ? 1.0f : fabsf(rndf()) * 2.0f;
                /* a quarter of the thresholds are the score itself: the tie keeps the channel */
                thr[i] = rnd() % 4 == 0 ? fabsf(x[i]) * cs[i] : fabsf(rndf());
                if (i % 29 == 0) thr[i] = 0.0f;
            }
            if (uthr) { /* one threshold: the score of a middle channel, so ties occur */
                const float t = n > 1 ? fabsf(x[n / 2]) * cs[n / 2] : thr[0];
                for (int i = 0; i < n; i++) thr[i] = t;
            }
            const int nr = ea_sparsify_scalar(x, thr, 1, cs, 0, n, yr, ar);
            memset(act, 0xff, sizeof(int32_t) * NMAX);
            const int na = ea_sparsify(&ctx, x, thr, !uthr, ones ? NULL : cs, n, y, act);
            CHECK(na == nr, "sparsify %s mode %d n=%d: %d kept, scalar %d", ea_isa_name(isa), mode, n, na, nr);
            CHECK(!memcmp(y, yr, sizeof(float) * (size_t)n), "sparsify %s mode %d n=%d: y differs from scalar",
                  ea_isa_name(isa), mode, n);
            CHECK(na != nr || !memcmp(act, ar, sizeof(int32_t) * (size_t)nr), "sparsify %s mode %d n=%d: active list differs",
                  ea_isa_name(isa), mode, n);
            int monotone = 1, kept_ok = 1;
            for (int i = 0; i < nr; i++) monotone &= i == 0 || ar[i] > ar[i - 1];
            for (int i = 0; i < n; i++) kept_ok &= (yr[i] == 0.0f && !signbit(yr[i])) || yr[i] == x[i];
            CHECK(monotone && kept_ok, "sparsify scalar n=%d: list not increasing or y not x-or-zero", n);
            /* in place (y aliases x) gives the same */
            memcpy(y, x, sizeof(float) * (size_t)n);
            const int ni = ea_sparsify(&ctx, y, thr, !uthr, ones ? NULL : cs, n, y, act);
            CHECK(ni == nr && !memcmp(y, yr, sizeof(float) * (size_t)n) && !memcmp(act, ar, sizeof(int32_t) * (size_t)nr),
                  "sparsify %s mode %d n=%d in place differs", ea_isa_name(isa), mode, n);
        }
    }
    test_sparsify_patterns(&ctx);
    free(x); free(thr); free(cs); free(y); free(yr); free(act); free(ar);
}

static void test_pool(int n) {
    ea_pool *pool = ea_pool_create(n);
    CHECK(pool && ea_pool_size(pool) == n, "pool create %d", n);
    pool_probe p;
    for (int round = 0; round < 2000; round++) {
        const int tasks = 1 + round % 64;
        for (int i = 0; i < 64; i++) atomic_init(&p.hits[i], 0);
        atomic_init(&p.sum, 0);
        ea_pool_run(pool, probe_task, &p, tasks);
        int ok = atomic_load(&p.sum) == (long)tasks * (tasks - 1) / 2;
        for (int i = 0; i < 64; i++) ok &= atomic_load(&p.hits[i]) == (i < tasks);
        CHECK(ok, "pool of %d: round %d with %d tasks ran each task once", n, round, tasks);
        if (!ok) break;
    }
    ea_pool_destroy(pool);
}

static void test_isa_names(void) {
    ea_isa isa;
    CHECK(ea_isa_parse("avx512", &isa) == EA_KERR_ISA_UNKNOWN, "unknown ISA name");
    CHECK(ea_isa_parse("scalar", &isa) == 0 && isa == EA_ISA_SCALAR, "scalar always available");
#if defined(__x86_64__)
    CHECK(ea_isa_parse("neon", &isa) == EA_KERR_ISA_UNAVAILABLE, "neon on x86");
#else
    CHECK(ea_isa_parse("avx2", &isa) == EA_KERR_ISA_UNAVAILABLE, "avx2 on arm");
#endif
    ea_kctx ctx;
    CHECK(ea_kctx_init(&ctx, (ea_isa)99, NULL) == EA_KERR_ISA_UNAVAILABLE, "ctx with a bogus ISA");
    ea_qweight w;
    uint8_t d[16] = {0};
    float s[1] = {1};
    CHECK(ea_qweight_init(&w, EA_ISA_SCALAR, 32, 1, 3, 32, d, s, NULL) == EA_KERR_ARG, "bits=3 rejected");
    CHECK(ea_qweight_init(&w, EA_ISA_SCALAR, 32, 1, 4, 16, d, s, NULL) == EA_KERR_ARG, "block 16 rejected");
}

/* ---- file mode --------------------------------------------------------- */
static int read_exact(FILE *f, void *p, size_t n) { return fread(p, 1, n, f) == n; }

static int run_qmatmul_file(const char *in, const char *out) {
    FILE *f = fopen(in, "rb");
    if (!f) { fprintf(stderr, "cannot open %s\n", in); return 2; }
    int32_t h[7];
    if (!read_exact(f, h, sizeof h)) { fprintf(stderr, "%s: short header\n", in); return 2; }
    const int M = h[0], K = h[1], N = h[2], bits = h[3], bs = h[4], has_zp = h[5], threads = h[6];
    if (M <= 0 || K <= 0 || N <= 0 || (bits != 4 && bits != 8) || bs <= 0 || has_zp < 0 || has_zp > 2) {
        fprintf(stderr, "bad header\n");
        return 2;
    }
    const int nb = (K + bs - 1) / bs;
    const size_t dbytes = (size_t)N * nb * bs * bits / 8;
    const size_t zbytes = has_zp == 1 ? (bits == 8 ? (size_t)N * nb : (size_t)N * ((nb + 1) / 2)) : 0;
    float *x = malloc(sizeof(float) * M * K), *scales = malloc(sizeof(float) * N * nb), *y = malloc(sizeof(float) * M * N);
    float *mins = has_zp == 2 ? malloc(sizeof(float) * N * nb) : NULL;
    uint8_t *data = malloc(dbytes), *zp = has_zp == 1 ? malloc(zbytes) : NULL;
    if (!read_exact(f, x, sizeof(float) * M * K) || !read_exact(f, data, dbytes) ||
        !read_exact(f, scales, sizeof(float) * N * nb) || (zp && !read_exact(f, zp, zbytes)) ||
        (mins && !read_exact(f, mins, sizeof(float) * N * nb))) {
        fprintf(stderr, "%s: truncated\n", in);
        return 2;
    }
    fclose(f);
    ea_isa isa;
    int rc = ea_isa_select(&isa);
    if (rc) { fprintf(stderr, "EDGEACT_ISA: %s\n", ea_kernels_strerror(rc)); return 3; }
    ea_pool *pool = threads > 1 ? ea_pool_create(threads) : NULL;
    ea_kctx ctx;
    ea_qweight w;
    ea_kctx_init(&ctx, isa, pool);
    rc = mins ? ea_qweight_init_min(&w, isa, K, N, bits, bs, data, scales, mins)
              : ea_qweight_init(&w, isa, K, N, bits, bs, data, scales, zp);
    if (!rc) rc = ea_qmatmul(&ctx, &w, x, M, y);
    if (rc) { fprintf(stderr, "qmatmul: %s\n", ea_kernels_strerror(rc)); return 3; }
    f = fopen(out, "wb");
    if (!f || fwrite(y, sizeof(float), (size_t)M * N, f) != (size_t)M * N) { fprintf(stderr, "cannot write %s\n", out); return 2; }
    fclose(f);
    fprintf(stderr, "isa=%s threads=%d\n", ea_isa_name(isa), ea_pool_size(pool));
    ea_qweight_release(&w);
    ea_kctx_release(&ctx);
    ea_pool_destroy(pool);
    free(x); free(scales); free(y); free(data); free(zp); free(mins);
    return 0;
}

static int run_sparse_file(const char *in, const char *out) {
    FILE *f = fopen(in, "rb");
    if (!f) { fprintf(stderr, "cannot open %s\n", in); return 2; }
    int32_t h[6];
    if (!read_exact(f, h, sizeof h)) { fprintf(stderr, "%s: short header\n", in); return 2; }
    const int K = h[0], N = h[1], bs = h[2], has_zp = h[3], threads = h[4], n_active = h[5];
    if (K <= 0 || N <= 0 || bs <= 0 || n_active < 0 || n_active > K) { fprintf(stderr, "bad header\n"); return 2; }
    const int nb = (K + bs - 1) / bs;
    const size_t dbytes = (size_t)N * nb * bs / 2, zbytes = has_zp ? (size_t)N * ((nb + 1) / 2) : 0;
    float *x = malloc(sizeof(float) * K), *scales = malloc(sizeof(float) * N * nb), *y = malloc(sizeof(float) * N);
    uint8_t *data = malloc(dbytes), *zp = has_zp ? malloc(zbytes) : NULL;
    int32_t *active = malloc(sizeof(int32_t) * (n_active + 1));
    if (!read_exact(f, x, sizeof(float) * K) || !read_exact(f, data, dbytes) ||
        !read_exact(f, scales, sizeof(float) * N * nb) || (has_zp && !read_exact(f, zp, zbytes)) ||
        !read_exact(f, active, sizeof(int32_t) * n_active)) {
        fprintf(stderr, "%s: truncated\n", in);
        return 2;
    }
    fclose(f);
    ea_isa isa;
    int rc = ea_isa_select(&isa);
    if (rc) { fprintf(stderr, "EDGEACT_ISA: %s\n", ea_kernels_strerror(rc)); return 3; }
    ea_pool *pool = threads > 1 ? ea_pool_create(threads) : NULL;
    ea_kctx ctx;
    ea_qweight w;
    ea_qweight_cm cm;
    ea_kctx_init(&ctx, isa, pool);
    rc = ea_qweight_init(&w, isa, K, N, 4, bs, data, scales, zp);
    if (!rc) rc = ea_qweight_cm_init(&cm, isa, &w);
    if (!rc) rc = ea_sparse_qgemv(&ctx, &cm, NULL, x, active, n_active, y);
    if (rc) { fprintf(stderr, "sparse_qgemv: %s\n", ea_kernels_strerror(rc)); return 3; }
    f = fopen(out, "wb");
    if (!f || fwrite(y, sizeof(float), (size_t)N, f) != (size_t)N) { fprintf(stderr, "cannot write %s\n", out); return 2; }
    fclose(f);
    fprintf(stderr, "isa=%s threads=%d\n", ea_isa_name(isa), ea_pool_size(pool));
    ea_qweight_cm_release(&cm);
    ea_qweight_release(&w);
    ea_kctx_release(&ctx);
    ea_pool_destroy(pool);
    free(x); free(scales); free(y); free(data); free(zp); free(active);
    return 0;
}

/* GELU, tanh form: each ISA's variant (and its split over a pool) gives the scalar reference's
 * bits, and the reference holds float64 math within 1e-6 of |x| (exp polynomial ~2e-7). */
static void test_gelu(ea_isa isa) {
    enum { N = 40000 + 13 };
    ea_pool *pool = ea_pool_create(2);
    ea_kctx ctx;
    ea_kctx_init(&ctx, isa, pool);
    float *x = malloc(sizeof(float) * N), *y = malloc(sizeof(float) * N), *r = malloc(sizeof(float) * N);
    static const float edge[] = {0.0f, -0.0f, 1e-30f, -1e-30f, 1e-4f, -1e-4f, 3.0f, -3.0f, 10.0f, -10.0f, 50.0f, -50.0f,
                                 1e10f, -1e10f, 1e20f, -1e20f, 5.6f, -5.6f, 1e-45f};
    const int n_edge = (int)(sizeof edge / sizeof edge[0]);
    for (int i = 0; i < N; i++) x[i] = i < n_edge ? edge[i] : rndf() * (i % 7 ? 4.0f : 20.0f);
    ea_gelu_tanh(&ctx, x, N, y);
    ea_gelu_tanh_scalar(x, N, r);
    int bad = -1;
    for (int i = 0; i < N && bad < 0; i++) {
        const double v = x[i], ref = 0.5 * v * (1.0 + tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)));
        const double tol = 1e-6 * (1.0 + fabs(v));
        if (memcmp(&y[i], &r[i], sizeof(float)) || !(fabs(r[i] - ref) <= tol)) bad = i;
    }
    CHECK(bad < 0, "gelu %s: i=%d x=%g got %.9g scalar %.9g", ea_isa_name(isa), bad, bad < 0 ? 0.0 : x[bad],
          bad < 0 ? 0.0 : y[bad], bad < 0 ? 0.0 : r[bad]);
    x[0] = NAN;
    ea_gelu_tanh(&ctx, x, 17, y); /* a vector and a tail */
    CHECK(isnan(y[0]), "gelu %s: NaN in, NaN out", ea_isa_name(isa));
    free(x); free(y); free(r);
    ea_kctx_release(&ctx);
    ea_pool_destroy(pool);
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "--qmatmul") == 0) return run_qmatmul_file(argv[2], argv[3]);
    if (argc == 4 && strcmp(argv[1], "--sparse") == 0) return run_sparse_file(argv[2], argv[3]);
    if (argc != 1) { fprintf(stderr, "usage: %s [--qmatmul IN OUT | --sparse IN OUT]\n", argv[0]); return 2; }
    /* every kernel table this CPU runs (EDGEACT_ISA: that one only; EDGEACT_NO_AVX512 and
     * EDGEACT_NO_VNNI leave those variants out), each against the scalar reference */
    ea_isa isas[8];
    int n_isas = 0;
    const char *forced = getenv("EDGEACT_ISA");
    if (forced && *forced) {
        int rc = ea_isa_parse(forced, &isas[0]);
        if (rc) { fprintf(stderr, "EDGEACT_ISA: %s\n", ea_kernels_strerror(rc)); return 3; }
        n_isas = 1;
    } else {
        const int no_avx512 = getenv("EDGEACT_NO_AVX512") != NULL, no_vnni = getenv("EDGEACT_NO_VNNI") != NULL;
        ea_isa all[8];
        const int n_all = ea_isa_list(all, 8);
        for (int i = 0; i < n_all; i++)
            if (all[i] != EA_ISA_SCALAR && ea_isa_available(all[i]) && !(no_avx512 && all[i] == EA_ISA_AVX512_VNNI) &&
                !(no_vnni && (all[i] == EA_ISA_AVX512_VNNI || all[i] == EA_ISA_AVX2_VNNI)))
                isas[n_isas++] = all[i];
        if (!n_isas) isas[n_isas++] = EA_ISA_SCALAR;
    }
    test_isa_names();
    test_pool(2);
    test_pool(3);
    test_f16();
    test_sparse_pf();
#if EA_X86
    test_sparse_prep();
#endif
    ea_pool *pool = ea_pool_create(2);
    for (int v = 0; v < n_isas; v++) {
        const ea_isa isa = isas[v];
        printf("testing isa %s against scalar\n", ea_isa_name(isa));
        fflush(stdout);
        test_quantize(isa);
        test_quantize_nonfinite(isa);
        ea_pool *pools[2] = {NULL, pool};
        for (int p = 0; p < 2; p++) {
            test_qmatmul(isa, pools[p]);
            test_fmatmul(isa, pools[p], 0);
            test_fmatmul(isa, pools[p], 1);
            test_attention(isa, pools[p]);
            test_sparse(isa, pools[p]);
            static const int ragged[3] = {37, 128, 100}, even[3] = {40, 150, 66}; /* 265 rows, 256 */
            for (int zpm = 1; zpm <= 2; zpm++) {
                test_sparse_concat(isa, pools[p], ragged, zpm);
                test_sparse_concat(isa, pools[p], even, zpm);
            }
        }
        test_small_ops(isa);
        test_gelu(isa);
        test_sparsify(isa);
    }
    ea_pool_destroy(pool);
    printf("%s: %d failure(s)\n", failures ? "FAILED" : "ok", failures);
    return failures ? 1 : 0;
}
