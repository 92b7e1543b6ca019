/* Activation-sparse MatMulNBits: the channel-major repack and the threaded
 * drivers (the kernels: the context's table; references in ref/sparse.c).
 *
 * Input sparsity (ea_sparse_qgemv): for each block holding active channels,
 * the channels' N-wide weight columns are combined in integers, then the
 * block is scaled into the N accumulators exactly as the dense kernel does
 * (fma(sx*sw, idot, acc), blocks in ascending order), then, for a weight with
 * float minimums, fma(min, sx*sumx, acc) as the dense kernel's second step. A
 * block without an active channel contributes fma(0, 0, acc) = acc in the
 * dense kernel, and fma(min, 0, acc) = acc for the minimum (its sumx is 0), so
 * skipping it changes nothing and the results are bit-identical. (Both hold
 * while acc is not -0: a sum of fmas from +0 only gets there when a minimum's
 * product underflows, |min*sx*sumx| < 2^-150; a skipped block may then turn the
 * dense -0 into +0, an exactly-zero output of another sign.) */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

int ea_qweight_cm_init(ea_qweight_cm *cm, ea_isa isa, const ea_qweight *w) {
    return ea_qweight_cm_init_concat(cm, isa, &w, 1);
}

int ea_qweight_cm_init_concat(ea_qweight_cm *cm, ea_isa isa, const ea_qweight *const *ws, int n_w) {
    memset(cm, 0, sizeof *cm);
    if (!ws || n_w < 1) return EA_KERR_ARG;
    long total = 0;
    int f16 = 1, mf16 = 1;
    const int mins = ws[0] && ws[0]->has_minimums;
    for (int i = 0; i < n_w; i++) {
        const ea_qweight *w = ws[i];
        if (!w || !w->data || w->bits != 4 || w->K != ws[0]->K || w->block_size != ws[0]->block_size ||
            !w->zero_points != !ws[0]->zero_points || !w->has_minimums != !mins ||
            (mins && !w->minimums && !w->packed))
            return EA_KERR_ARG;
        total += w->N;
        /* w's repack found its scales exact in fp16 (the scalar isa has no repack: it checks here) */
        f16 &= w->packed ? w->packed_f16 : ea_scales_exact_in_f16(w->scales, (size_t)w->N * w->n_blocks);
        if (mins) mf16 &= w->packed ? w->packed_min_f16 : ea_scales_exact_in_f16(w->minimums, (size_t)w->N * w->n_blocks);
    }
    if (total > (1L << 30)) return EA_KERR_ARG;
    if (!ea_isa_available(isa)) return EA_KERR_ISA_UNAVAILABLE;
    const int N = (int)total, np = (N + EA_CM_TILE - 1) / EA_CM_TILE * EA_CM_TILE, nb = ws[0]->n_blocks;
    const size_t kp = (size_t)nb * ws[0]->block_size;
    const size_t ssize = f16 ? sizeof(uint16_t) : sizeof(float), msize = mf16 ? sizeof(uint16_t) : sizeof(float);
    const size_t dbytes = kp * np / 2, sbytes = ssize * (size_t)nb * np;
    const size_t zbytes = ws[0]->zero_points ? (size_t)nb * np : 0, mbytes = mins ? msize * (size_t)nb * np : 0;
    uint8_t *data = ea_alloc_weights(dbytes);
    uint8_t *scales = calloc((size_t)nb * np, ssize);
    uint8_t *zp = zbytes ? calloc(zbytes, 1) : NULL;
    uint8_t *mn = mins ? calloc((size_t)nb * np, msize) : NULL;
    float *row_mn = mins ? malloc(sizeof(float) * (size_t)nb) : NULL;
    int *src_w = malloc(sizeof(int) * (size_t)N), *src_r = malloc(sizeof(int) * (size_t)N);
    if (!data || !scales || (zbytes && !zp) || (mins && (!mn || !row_mn)) || !src_w || !src_r) {
        free(data); free(scales); free(zp); free(mn); free(row_mn); free(src_w); free(src_r);
        return EA_KERR_NOMEM;
    }
    for (int i = 0, n = 0; i < n_w; i++) /* output row n of the concatenation: row src_r[n] of ws[src_w[n]] */
        for (int r = 0; r < ws[i]->N; r++, n++) {
            src_w[n] = i;
            src_r[n] = r;
        }
    const size_t row_bytes = kp / 2, stride = (size_t)np / 2;
    /* nibbles stay in natural n order (n even low, odd high): rows n and n+1 make the byte n/2
     * of every channel row, two channels per source byte. A byte-wise transpose in tiles of 128
     * rows x 64 channels, whose source and destination lines stay in L1 (the nibble-wise,
     * untiled one took most of a sparse folder's load time) */
    for (int n0 = 0; n0 < N; n0 += 128)
        for (size_t j0 = 0; j0 < row_bytes; j0 += 32) {
            const size_t j1 = j0 + 32 < row_bytes ? j0 + 32 : row_bytes;
            for (int n = n0; n < n0 + 128 && n < N; n += 2) {
                const uint8_t *s0 = ws[src_w[n]]->data + (size_t)src_r[n] * row_bytes;
                const uint8_t *s1 = n + 1 < N ? ws[src_w[n + 1]]->data + (size_t)src_r[n + 1] * row_bytes : NULL;
                uint8_t *dst = data + n / 2;
                for (size_t j = j0; j < j1; j++) {
                    const uint8_t lo = s0[j], hi = s1 ? s1[j] : 0; /* channels 2j (low nibbles), 2j+1 (high) */
                    dst[2 * j * stride] = (uint8_t)((lo & 15) | (hi << 4));
                    dst[(2 * j + 1) * stride] = (uint8_t)((lo >> 4) | (hi & 0xF0));
                }
            }
        }
    for (int t = 0; t < np / EA_CM_TILE; t++) {
        for (int lane = 0; lane < EA_CM_TILE; lane++) {
            /* the per-(block, n) scale and zero point follow the kernel's lane order */
            const int ln = t * EA_CM_TILE + ea_cm_lane_n(isa, lane);
            if (ln >= N) continue;
            const ea_qweight *w = ws[src_w[ln]];
            const int r = src_r[ln];
            if (mins) ea_qweight_row_minimums(w, r, row_mn); /* checked above: it has them */
            for (int b = 0; b < nb; b++) {
                const size_t i = (size_t)b * np + t * EA_CM_TILE + lane;
                const float s = w->scales[(size_t)r * nb + b];
                if (f16) ((uint16_t *)scales)[i] = ea_f32_to_f16(s);
                else ((float *)scales)[i] = s;
                if (zp) zp[i] = (uint8_t)ea_qweight_zp(w, r, b);
                if (mn && mf16) ((uint16_t *)mn)[i] = ea_f32_to_f16(row_mn[b]);
                else if (mn) ((float *)mn)[i] = row_mn[b];
            }
        }
    }
    free(row_mn);
    free(src_w);
    free(src_r);
    cm->K = ws[0]->K;
    cm->N = N;
    cm->n_pad = np;
    cm->block_size = ws[0]->block_size;
    cm->n_blocks = nb;
    cm->isa = isa;
    cm->data = data;
    cm->scales = scales;
    cm->scales_f16 = f16;
    cm->zero_points = zp;
    cm->minimums = mn;
    cm->minimums_f16 = mins && mf16;
    cm->bytes = dbytes + sbytes + zbytes + mbytes;
    return EA_KOK;
}

void ea_qweight_cm_release(ea_qweight_cm *cm) {
    free(cm->data);
    free(cm->scales);
    free(cm->zero_points);
    free(cm->minimums);
    memset(cm, 0, sizeof *cm);
}

static int strictly_increasing(const int32_t *idx, int n, int limit) {
    for (int i = 0; i < n; i++)
        if (idx[i] < 0 || idx[i] >= limit || (i && idx[i] <= idx[i - 1])) return 0;
    return 1;
}

typedef struct {
    const ea_kctx *ctx;
    const ea_qweight_cm *cm;
    const ea_sparse_act *a;
    float *y;
    int tiles, n_tasks;
    float *const *outs; /* ea_sparse_qgemv_split: the members' outputs, ns[i] rows each */
    const int *ns;
    int n_outs;
} sjob;

/* Rows [r0, r1) of y to the member outputs that hold them. */
static void deliver_rows(const sjob *j, int r0, int r1) {
    for (int i = 0, off = 0; i < j->n_outs && off < r1; off += j->ns[i], i++) {
        const int lo = r0 > off ? r0 : off, hi = r1 < off + j->ns[i] ? r1 : off + j->ns[i];
        if (lo < hi) memcpy(j->outs[i] + (lo - off), j->y + lo, sizeof(float) * (size_t)(hi - lo));
    }
}

static void sparse_task(void *arg, int task, int thread) {
    (void)thread;
    const sjob *j = arg;
    /* even tile boundaries: the AVX-512 kernel works on tile pairs */
    const int pairs = (j->tiles + 1) / 2;
    const int t0 = 2 * (int)((long)pairs * task / j->n_tasks);
    int t1 = 2 * (int)((long)pairs * (task + 1) / j->n_tasks);
    if (t1 > j->tiles) t1 = j->tiles;
    if (t0 >= t1) return;
    j->ctx->k->sparse_tiles(j->cm, j->a, j->y, t0, t1);
    /* while the rows are still in this core's cache: copied later by the caller's thread,
     * the other core's half would cross between cores */
    if (j->n_outs) deliver_rows(j, t0 * EA_CM_TILE, t1 * EA_CM_TILE < j->cm->N ? t1 * EA_CM_TILE : j->cm->N);
}


int ea_sparsify(const ea_kctx *ctx, const float *x, const float *thr, int thr_step, const float *col_scale, int n,
                float *y, int32_t *active) {
    return ctx->k->sparsify(x, thr, thr_step != 0, col_scale, n, y, active);
}

int ea_sparse_prefers_dense(const ea_qweight_cm *cm, int n_active) {
    const float crossover = cm->N < EA_SPARSE_LONG_N ? EA_SPARSE_SHORT_CROSSOVER : EA_SPARSE_DENSE_CROSSOVER;
    return n_active > crossover * cm->K || cm->N < EA_SPARSE_MIN_N;
}

int ea_masked_qgemv(ea_kctx *ctx, const ea_qweight *w, const float *x, const int32_t *active, int n_active, float *y) {
    if (!w || n_active < 0 || !strictly_increasing(active, n_active, w->K)) return EA_KERR_ARG;
    /* the buffer stays zero between calls: only the active entries are written and cleared,
     * no K-wide clear per call */
    if (ctx->masked_cap < (size_t)w->K) {
        float *p = calloc((size_t)w->K, sizeof(float));
        if (!p) return EA_KERR_NOMEM;
        free(ctx->masked);
        ctx->masked = p;
        ctx->masked_cap = (size_t)w->K;
    }
    float *xm = ctx->masked;
    for (int i = 0; i < n_active; i++) xm[active[i]] = x[active[i]];
    const int rc = ea_qmatmul(ctx, w, xm, 1, y);
    for (int i = 0; i < n_active; i++) xm[active[i]] = 0.0f;
    return rc;
}

static int sparse_qgemv(ea_kctx *ctx, const ea_qweight_cm *cm, const ea_qweight *dense, const float *x,
                        const int32_t *active, int n_active, float *y, float *const *outs, const int *ns, int n_outs) {
    if (!cm || !cm->data || n_active < 0 || !strictly_increasing(active, n_active, cm->K)) return EA_KERR_ARG;
    /* the scalar kernel reads any lane order; SIMD kernels need their own */
    const ea_isa isa = ctx->isa;
    if (isa != EA_ISA_SCALAR && ea_isa_layout(cm->isa) != ea_isa_layout(isa)) return EA_KERR_LAYOUT;
    if (dense && ea_sparse_prefers_dense(cm, n_active)) return ea_masked_qgemv(ctx, dense, x, active, n_active, y);
    const int nb = cm->n_blocks;
    const size_t acc_bytes = 2 * sizeof(float) * (size_t)cm->n_pad; /* acc, dacc */
    const size_t max_quads = (size_t)n_active / 4 + nb + 1;
    const size_t quad_bytes = max_quads * (4 * sizeof(size_t) + sizeof(int32_t)) + (size_t)(nb + 1) * sizeof(int32_t);
    const size_t need = acc_bytes + quad_bytes + (size_t)n_active * (sizeof(int32_t) + 1) +
                        (size_t)(nb + 1) * 4 * sizeof(int32_t) + 64;
    uint8_t *s = ea_scratch(ctx, need);
    if (!s) return EA_KERR_NOMEM;
    ea_sparse_act a;
    a.acc = (float *)s;
    a.dacc = (int32_t *)(s + acc_bytes / 2);
    a.qoff = (size_t *)(s + acc_bytes); /* acc_bytes is a multiple of 128 */
    a.qx = (int32_t *)(a.qoff + 4 * max_quads);
    a.qstart = a.qx + max_quads;
    a.ch = a.qstart + nb + 1;
    a.blk = a.ch + n_active;
    a.start = a.blk + nb + 1;
    a.sumx = a.start + nb + 1;
    a.sx = (float *)(a.sumx + nb + 1);
    a.q = (int8_t *)(a.sx + nb + 1);
    ctx->k->sparse_prep(x, cm->block_size, active, n_active, (size_t)cm->n_pad / 2, &a);
    const int tiles = cm->n_pad / EA_CM_TILE;
    int n_tasks = ea_pool_size(ctx->pool);
    if (n_tasks > (tiles + 1) / 2) n_tasks = (tiles + 1) / 2;
    sjob j = {ctx, cm, &a, y, tiles, n_tasks, outs, ns, n_outs};
    ea_pool_run(ctx->pool, sparse_task, &j, n_tasks);
    return EA_KOK;
}

int ea_sparse_qgemv(ea_kctx *ctx, const ea_qweight_cm *cm, const ea_qweight *dense, const float *x,
                    const int32_t *active, int n_active, float *y) {
    return sparse_qgemv(ctx, cm, dense, x, active, n_active, y, NULL, NULL, 0);
}

int ea_sparse_qgemv_split(ea_kctx *ctx, const ea_qweight_cm *cm, const float *x, const int32_t *active,
                          int n_active, float *scratch, float *const *outs, const int *ns, int n_outs) {
    if (!cm || !outs || !ns || n_outs < 1) return EA_KERR_ARG;
    long total = 0;
    for (int i = 0; i < n_outs; i++) {
        if (!outs[i] || ns[i] < 0) return EA_KERR_ARG;
        total += ns[i];
    }
    if (total != cm->N) return EA_KERR_ARG;
    return sparse_qgemv(ctx, cm, NULL, x, active, n_active, scratch, outs, ns, n_outs);
}

/* ---- output-row subset (gated FFN) ---------------------------------------- */
typedef struct {
    const ea_kctx *ctx;
    const ea_qweight *w;
    const ea_qact *a;
    const int32_t *rows;
    float *y;
    int n_rows, n_tasks;
} rjob;

static void rows_task(void *arg, int task, int thread) {
    (void)thread;
    const rjob *j = arg;
    /* whole quads of rows per task so the SIMD kernel's 4-row steps stay intact */
    const int quads = (j->n_rows + 3) / 4;
    const int q0 = (int)((long)quads * task / j->n_tasks), q1 = (int)((long)quads * (task + 1) / j->n_tasks);
    const int r0 = q0 * 4, r1 = q1 * 4 < j->n_rows ? q1 * 4 : j->n_rows;
    if (r0 >= r1) return;
    j->ctx->k->qgemv_rows(j->w, j->a, j->rows + r0, r1 - r0, j->y);
}

int ea_qgemv_rows(ea_kctx *ctx, const ea_qweight *w, const float *x, const int32_t *rows, int n_rows, float *y) {
    if (!w || !w->data || (w->has_minimums && !w->minimums) || n_rows < 0 || !strictly_increasing(rows, n_rows, w->N)) return EA_KERR_ARG;
    if (n_rows == 0) return EA_KOK;
    const int nb = w->n_blocks, kp = nb * w->block_size;
    const size_t xq_bytes = ((size_t)kp + 63) & ~(size_t)63;
    uint8_t *s = ea_scratch(ctx, xq_bytes + (size_t)nb * (sizeof(float) + sizeof(int32_t)));
    if (!s) return EA_KERR_NOMEM;
    ea_qact a = {1, w->K, w->block_size, nb, (int8_t *)s, (float *)(s + xq_bytes),
                 (int32_t *)(s + xq_bytes + (size_t)nb * sizeof(float))};
    const int interleave = ea_is_simd(ctx->isa) && w->bits == 4;
    ctx->k->quantize_row(x, w->K, w->block_size, a.xq, a.sx, a.sumx, interleave);
    int n_tasks = ea_pool_size(ctx->pool);
    const int quads = (n_rows + 3) / 4;
    if (n_tasks > quads) n_tasks = quads;
    rjob j = {ctx, w, &a, rows, y, n_rows, n_tasks};
    ea_pool_run(ctx->pool, rows_task, &j, n_tasks);
    return EA_KOK;
}
