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
    const ea_kernel_table *k = j->ctx->k;
    for (int n = n0; n < n1; n++) {
        k->dequant_row(w, n, wf);
        for (int m = 0; m < j->M; m++) j->y[(size_t)m * w->N + n] = k->dot(wf, j->x + (size_t)m * w->K, w->K);
    }
}

int ea_qmatmul_f32act(ea_kctx *ctx, const ea_qweight *w, const float *x, int M, float *y) {
    if (M <= 0 || !w || !w->data || !w->scales || (w->has_minimums && !w->minimums) || !x || !y) return EA_KERR_ARG;
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
