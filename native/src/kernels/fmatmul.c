/* fp32 and fp16 matmuls with ONNX MatMul weights W [K, N]: y = x @ W.
 * Threads split N in 16-column (64-byte) chunks; SIMD kernels keep a 4x16
 * tile of y in registers and stream W rows, each W row reused by 4 x rows. */
#include <string.h>

#include "internal.h"

void ea_f16_to_f32_row(const ea_kctx *ctx, const uint16_t *src, float *dst, size_t n) {
    (ctx ? ctx->k->f16_row : ea_f16_row_scalar)(src, dst, n);
}

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
    if (j->W16) j->ctx->k->matmul_f16(j->x, j->M, j->K, j->W16, j->N, j->y, n0, n1);
    else j->ctx->k->matmul_f32(j->x, j->M, j->K, j->W, j->N, j->y, n0, n1);
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
