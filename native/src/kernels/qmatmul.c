/* MatMulNBits (accuracy_level 4): weight preparation (the SIMD repack), activation
 * quantization and the threaded driver; the kernels are the context's table (the reference
 * and its arithmetic: ref/qmatmul.c). */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static int valid_shape(int K, int N, int bits, int block_size) {
    return K > 0 && N > 0 && (bits == 4 || bits == 8) &&
           (block_size == 32 || block_size == 64 || block_size == 128);
}

/* Scales are kept as fp16 when that loses nothing (converters round them to
 * fp16 at quantization, as llama.cpp's formats do): exact, and 10% fewer bytes. */
int ea_scales_exact_in_f16(const float *s, size_t n) {
    for (size_t i = 0; i < n; i++) {
        const float r = ea_f16_to_f32(ea_f32_to_f16(s[i]));
        if (memcmp(&r, &s[i], sizeof r) != 0) return 0;
    }
    return 1;
}

/* Eight floats at p, as fp16 when f16 (each value exact in fp16) */
static void put8(uint8_t *p, const float v[EA_QROWS], int f16) {
    if (f16) {
        uint16_t h[EA_QROWS];
        for (int lane = 0; lane < EA_QROWS; lane++) h[lane] = ea_f32_to_f16(v[lane]);
        memcpy(p, h, sizeof h);
    } else {
        memcpy(p, v, sizeof(float) * EA_QROWS);
    }
}

/* Interleaves EA_QROWS rows per group in 16-byte pieces and puts each
 * block's scales and zero points (or minimums) right after its data (layout:
 * internal.h), so a group streams as one sequence. */
/* Rows of the file layout repacked between two calls of the release callback: ~4 MiB of data. */
static int release_rows(const ea_qweight *w) {
    const size_t row = (size_t)w->n_blocks * ((size_t)w->block_size * (size_t)w->bits / 8);
    const size_t n = ((size_t)4 << 20) / row / EA_QROWS * EA_QROWS;
    return n < EA_QROWS ? EA_QROWS : n > (size_t)w->N ? w->N : (int)n;
}

/* The file layout's rows [n0, n1), read for the last time. */
static void release_range(const ea_qweight *w, ea_qweight_release_fn release, void *ctx, int n0, int n1) {
    if (!release || n1 <= n0) return;
    const ea_qbytes r = ea_qweight_file_bytes(1, (size_t)w->n_blocks, w->block_size, w->bits);
    release(ctx, w->data + (size_t)n0 * r.data, (size_t)(n1 - n0) * r.data);
    release(ctx, (const uint8_t *)w->scales + (size_t)n0 * r.scales, (size_t)(n1 - n0) * r.scales);
    if (w->zero_points) release(ctx, w->zero_points + (size_t)n0 * r.zero_points, (size_t)(n1 - n0) * r.zero_points);
}

static int repack(ea_qweight *w, ea_qweight_release_fn release, void *rctx) {
    const size_t bpb = (size_t)w->block_size * (size_t)w->bits / 8, subs = bpb / 16;
    const int step = release_rows(w);
    w->packed_f16 = 1;
    for (int n0 = 0; n0 < w->N; n0 += step) { /* the scan pages the scales in: give them back as it goes */
        const int n1 = n0 + step < w->N ? n0 + step : w->N;
        const size_t nb = (size_t)w->n_blocks;
        w->packed_f16 = w->packed_f16 && ea_scales_exact_in_f16(w->scales + (size_t)n0 * nb, (size_t)(n1 - n0) * nb);
        if (release) release(rctx, w->scales + (size_t)n0 * nb, sizeof(float) * (size_t)(n1 - n0) * nb);
    }
    w->packed_min_f16 = w->has_minimums && ea_scales_exact_in_f16(w->minimums, (size_t)w->N * w->n_blocks);
    const size_t stride = ea_qpack_block_stride(w), zoff = ea_qpack_zp_offset(w);
    const int groups = (w->N + EA_QROWS - 1) / EA_QROWS;
    const size_t bytes = (size_t)groups * (size_t)w->n_blocks * stride;
    uint8_t *p = ea_alloc_weights(bytes);
    if (!p) return EA_KERR_NOMEM;
    for (int g = 0; g < groups; g++) {
        if (g && g * EA_QROWS % step == 0) release_range(w, release, rctx, g * EA_QROWS - step, g * EA_QROWS);
        for (int b = 0; b < w->n_blocks; b++) {
            uint8_t *blk = p + ((size_t)g * w->n_blocks + b) * stride;
            float sc[EA_QROWS] = {0}, mn[EA_QROWS] = {0};
            for (int lane = 0; lane < EA_QROWS; lane++) {
                const int r = ea_qpack_lane_row(w->isa, lane), n = g * EA_QROWS + r;
                if (n >= w->N) continue; /* padding rows stay zero with scale and minimum 0 */
                const uint8_t *src = w->data + ((size_t)n * w->n_blocks + b) * bpb;
                for (size_t j = 0; j < subs; j++) memcpy(blk + (j * EA_QROWS + r) * 16, src + j * 16, 16);
                sc[lane] = w->scales[(size_t)n * w->n_blocks + b];
                if (w->zero_points) blk[zoff + lane] = (uint8_t)ea_qweight_zp(w, n, b);
                if (w->has_minimums) mn[lane] = w->minimums[(size_t)n * w->n_blocks + b];
            }
            put8(blk + EA_QROWS * bpb, sc, w->packed_f16);
            if (w->has_minimums) put8(blk + zoff, mn, w->packed_min_f16);
        }
    }
    w->packed = p;
    w->packed_bytes = bytes;
    return EA_KOK;
}

static int init(ea_qweight *w, ea_isa isa, int K, int N, int bits, int block_size, const uint8_t *data,
                const float *scales, const uint8_t *zero_points, const float *minimums,
                ea_qweight_release_fn release, void *rctx) {
    memset(w, 0, sizeof *w);
    if (!valid_shape(K, N, bits, block_size) || !data || !scales) return EA_KERR_ARG;
    if (!ea_isa_available(isa)) return EA_KERR_ISA_UNAVAILABLE;
    w->K = K;
    w->N = N;
    w->bits = bits;
    w->block_size = block_size;
    w->n_blocks = (K + block_size - 1) / block_size;
    w->data = data;
    w->scales = scales;
    w->zero_points = zero_points;
    w->minimums = minimums;
    w->has_minimums = minimums != NULL;
    w->isa = isa;
    return ea_is_simd(isa) ? repack(w, release, rctx) : EA_KOK;
}

int ea_qweight_init(ea_qweight *w, ea_isa isa, int K, int N, int bits, int block_size,
                    const uint8_t *data, const float *scales, const uint8_t *zero_points) {
    return init(w, isa, K, N, bits, block_size, data, scales, zero_points, NULL, NULL, NULL);
}

int ea_qweight_init_min(ea_qweight *w, ea_isa isa, int K, int N, int bits, int block_size,
                        const uint8_t *data, const float *scales, const float *minimums) {
    if (!minimums) return memset(w, 0, sizeof *w), EA_KERR_ARG;
    return init(w, isa, K, N, bits, block_size, data, scales, NULL, minimums, NULL, NULL);
}

int ea_qweight_init_releasing(ea_qweight *w, ea_isa isa, int K, int N, int bits, int block_size,
                              const uint8_t *data, const float *scales, const uint8_t *zero_points,
                              ea_qweight_release_fn release, void *ctx) {
    return init(w, isa, K, N, bits, block_size, data, scales, zero_points, NULL, release, ctx);
}

void ea_qweight_release(ea_qweight *w) {
    free(w->packed);
    w->packed = NULL;
    w->packed_bytes = 0;
    w->packed_f16 = 0;
    w->packed_min_f16 = 0;
}

int ea_qweight_row_minimums(const ea_qweight *w, int n, float *out) {
    if (!w || !w->has_minimums || n < 0 || n >= w->N || (!w->minimums && !w->packed)) return EA_KERR_ARG;
    const int nb = w->n_blocks;
    if (w->minimums) {
        memcpy(out, w->minimums + (size_t)n * nb, sizeof(float) * (size_t)nb);
        return EA_KOK;
    }
    int lane = 0; /* the repack's lane of row n within its group */
    while (ea_qpack_lane_row(w->isa, lane) != n % EA_QROWS) lane++;
    const size_t stride = ea_qpack_block_stride(w), msize = ea_qpack_scale_size(w->packed_min_f16);
    const uint8_t *p = (const uint8_t *)w->packed + (size_t)(n / EA_QROWS) * nb * stride + ea_qpack_zp_offset(w) +
                       lane * msize;
    for (int b = 0; b < nb; b++, p += stride) {
        if (w->packed_min_f16) {
            uint16_t h;
            memcpy(&h, p, sizeof h);
            out[b] = ea_f16_to_f32(h);
        } else {
            memcpy(&out[b], p, sizeof(float));
        }
    }
    return EA_KOK;
}

int ea_quantize_act(ea_kctx *ctx, const float *x, int K, int block_size,
                    int8_t *xq, float *sx, int32_t *sumx) {
    if (K <= 0 || (block_size != 32 && block_size != 64 && block_size != 128)) return EA_KERR_ARG;
    ctx->k->quantize_row(x, K, block_size, xq, sx, sumx, 0);
    return EA_KOK;
}

typedef struct {
    const ea_kctx *ctx;
    const ea_qweight *w;
    const ea_qact *a;
    float *y;
    int units, n_tasks; /* units of EA_NCHUNK rows, split evenly over tasks */
} qjob;

static void qmatmul_task(void *arg, int task, int thread) {
    (void)thread;
    const qjob *j = arg;
    const int u0 = (int)((long)j->units * task / j->n_tasks);
    const int u1 = (int)((long)j->units * (task + 1) / j->n_tasks);
    int n0 = u0 * EA_NCHUNK, n1 = u1 * EA_NCHUNK;
    if (n1 > j->w->N) n1 = j->w->N;
    if (n0 >= n1) return;
    j->ctx->k->qmatmul(j->w, j->a, j->y, n0, n1);
}

int ea_qmatmul(ea_kctx *ctx, const ea_qweight *w, const float *x, int M, float *y) {
    const int simd = ea_is_simd(ctx->isa);
    /* SIMD reads the repack only */
    if (M <= 0 || !w || (!w->data && !(simd && w->packed)) || (!simd && w->has_minimums && !w->minimums))
        return EA_KERR_ARG;
    if (simd && (!w->packed || ea_isa_layout(w->isa) != ea_isa_layout(ctx->isa))) return EA_KERR_LAYOUT;
    const int nb = w->n_blocks, kp = nb * w->block_size;
    const size_t xq_bytes = ((size_t)M * kp + 63) & ~(size_t)63;
    const size_t per_row = (size_t)nb * (sizeof(float) + sizeof(int32_t));
    uint8_t *s = ea_scratch(ctx, xq_bytes + (size_t)M * per_row);
    if (!s) return EA_KERR_NOMEM;
    ea_qact a = {M, w->K, w->block_size, nb, (int8_t *)s, (float *)(s + xq_bytes),
                 (int32_t *)(s + xq_bytes + (size_t)M * nb * sizeof(float))};
    /* the int4 SIMD kernels unpack nibbles as [even | odd] per 32 elements */
    const int interleave = simd && w->bits == 4;
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * w->K;
        int8_t *q = a.xq + (size_t)m * kp;
        ctx->k->quantize_row(xr, w->K, w->block_size, q, a.sx + (size_t)m * nb, a.sumx + (size_t)m * nb, interleave);
    }
    const int units = (w->N + EA_NCHUNK - 1) / EA_NCHUNK;
    /* a few tasks per thread, claimed dynamically: when a teammate's process
     * preempts one of our threads, the others take over its share instead of
     * spinning until it is scheduled again */
    const int threads = ea_pool_size(ctx->pool);
    int n_tasks = threads > 1 ? threads * EA_TASKS_PER_THREAD : 1;
    if (n_tasks > units) n_tasks = units;
    qjob j = {ctx, w, &a, y, units, n_tasks};
    ea_pool_run(ctx->pool, qmatmul_task, &j, n_tasks);
    return EA_KOK;
}
