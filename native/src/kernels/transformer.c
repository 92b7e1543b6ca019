/* The non-matmul pieces of a decoder layer: RMSNorm, rotary, GQA attention
 * over the KV cache, SiLU gating, residual add and embedding gathers.
 * They are a small share of a decode step, so they are plain C that the
 * compiler vectorizes; attention is threaded over heads. */
#include <math.h>
#include <string.h>

#include "internal.h"

/* Prefill rows (and long SiLU vectors) are split over the pool above this
 * many elements; a decode step's single row stays on the caller. */
#define EA_ELEMWISE_PARALLEL 32768

typedef struct {
    const float *x, *w, *u;
    float *y;
    int rows, dim;
    float eps;
    size_t n;
    const ea_kernel_table *k;
    int n_tasks;
} ew_job;

static void rmsnorm_rows(const float *x, const float *w, int r0, int r1, int dim, float eps, float *y) {
    for (int r = r0; r < r1; r++) {
        const float *xr = x + (size_t)r * dim;
        float *yr = y + (size_t)r * dim;
        /* double: dim up to ~8k squares summed without drift; four chains, not one serial add */
        double ss[4] = {0, 0, 0, 0};
        int i = 0;
        for (; i + 4 <= dim; i += 4)
            for (int l = 0; l < 4; l++) ss[l] += (double)xr[i + l] * xr[i + l];
        for (; i < dim; i++) ss[0] += (double)xr[i] * xr[i];
        const float inv = (float)(1.0 / sqrt(((ss[0] + ss[1]) + (ss[2] + ss[3])) / dim + eps));
        for (i = 0; i < dim; i++) yr[i] = xr[i] * inv * w[i];
    }
}

static void rmsnorm_task(void *arg, int task, int thread) {
    (void)thread;
    const ew_job *j = arg;
    rmsnorm_rows(j->x, j->w, j->rows * task / j->n_tasks, j->rows * (task + 1) / j->n_tasks, j->dim, j->eps, j->y);
}

void ea_rmsnorm(const ea_kctx *ctx, const float *x, const float *w, int rows, int dim, float eps, float *y) {
    if ((size_t)rows * dim < EA_ELEMWISE_PARALLEL || rows < 2) {
        rmsnorm_rows(x, w, 0, rows, dim, eps, y);
        return;
    }
    ew_job j = {x, w, NULL, y, rows, dim, eps, 0, ctx->k, rows < 8 ? rows : 8};
    ea_pool_run(ctx->pool, rmsnorm_task, &j, j.n_tasks);
}

int ea_rope(const ea_kctx *ctx, float *x, int S, int H, int head_dim, const float *cos_cache,
            const float *sin_cache, int max_pos, int pos0) {
    (void)ctx;
    if (head_dim <= 0 || head_dim % 2 || S < 0 || H <= 0 || pos0 < 0 || pos0 + S > max_pos) return EA_KERR_ARG;
    const int half = head_dim / 2;
    for (int s = 0; s < S; s++) {
        const float *c = cos_cache + (size_t)(pos0 + s) * half;
        const float *sn = sin_cache + (size_t)(pos0 + s) * half;
        for (int h = 0; h < H; h++) {
            float *v = x + ((size_t)s * H + h) * head_dim;
            for (int i = 0; i < half; i++) {
                const float a = v[i], b = v[i + half];
                v[i] = a * c[i] - b * sn[i];
                v[i + half] = b * c[i] + a * sn[i];
            }
        }
    }
    return EA_KOK;
}

typedef struct {
    const float *q, *k, *v;
    float *out, *scores; /* scores: capacity floats per thread */
    int S, H, hd, kv_heads, capacity, pos0;
    float scale;
    const ea_kernel_table *kern;
} attn_job;

static void attention_head(void *arg, int task, int thread) {
    const attn_job *j = arg;
    float *sc = j->scores + (size_t)thread * j->capacity;
    /* tasks go round the kv heads (head kvh * group + task / kv_heads): threads starting
     * together read different caches from memory, not the same one at once */
    const int group = j->H / j->kv_heads, kvh = task % j->kv_heads, h = kvh * group + task / j->kv_heads;
    const float *kc = j->k + (size_t)kvh * j->capacity * j->hd;
    const float *vc = j->v + (size_t)kvh * j->capacity * j->hd;
    for (int s = 0; s < j->S; s++) {
        const float *qv = j->q + ((size_t)s * j->H + h) * j->hd;
        float *o = j->out + ((size_t)s * j->H + h) * j->hd;
        const int L = j->pos0 + s + 1; /* causal: positions 0 .. pos0+s */
        j->kern->attention_row(qv, kc, vc, j->hd, L, j->scale, sc, o);
    }
}

/* Below this many multiply-adds (q.k plus p.v over all heads) one thread
 * finishes sooner than a pool dispatch and its join (a decode step over a
 * short cache). */
#define EA_ATTN_PARALLEL_MACS 65536

int ea_attention(ea_kctx *ctx, const float *q, int S, int H, int hd, const float *k_cache,
                 const float *v_cache, int kv_heads, int capacity, int pos0, float scale, float *out) {
    if (S <= 0 || H <= 0 || hd <= 0 || kv_heads <= 0 || H % kv_heads || pos0 < 0 || pos0 + S > capacity)
        return EA_KERR_ARG;
    const int threads = ea_pool_size(ctx->pool);
    float *scores = ea_scratch(ctx, sizeof(float) * (size_t)capacity * threads);
    if (!scores) return EA_KERR_NOMEM;
    attn_job j = {q, k_cache, v_cache, out, scores, S, H, hd, kv_heads, capacity, pos0, scale, ctx->k};
    const double macs = 2.0 * H * hd * ((double)S * pos0 + (double)S * (S + 1) / 2);
    ea_pool_run(macs >= EA_ATTN_PARALLEL_MACS ? ctx->pool : NULL, attention_head, &j, H);
    return EA_KOK;
}

static void silu_task(void *arg, int task, int thread) {
    (void)thread;
    const ew_job *j = arg;
    const size_t a = j->n * task / j->n_tasks, b = j->n * (task + 1) / j->n_tasks;
    j->k->silu_mul(j->x + a, j->u ? j->u + a : NULL, b - a, j->y + a);
}

void ea_silu_mul(const ea_kctx *ctx, const float *g, const float *u, size_t n, float *y) {
    if (n < EA_ELEMWISE_PARALLEL) {
        ctx->k->silu_mul(g, u, n, y);
        return;
    }
    ew_job j = {g, NULL, u, y, 0, 0, 0.0f, n, ctx->k, 8};
    ea_pool_run(ctx->pool, silu_task, &j, j.n_tasks);
}

static void gelu_task(void *arg, int task, int thread) {
    (void)thread;
    const ew_job *j = arg;
    const size_t a = j->n * task / j->n_tasks, b = j->n * (task + 1) / j->n_tasks;
    j->k->gelu_tanh(j->x + a, b - a, j->y + a);
}

void ea_gelu_tanh(const ea_kctx *ctx, const float *x, size_t n, float *y) {
    if (n < EA_ELEMWISE_PARALLEL) {
        ctx->k->gelu_tanh(x, n, y);
        return;
    }
    ew_job j = {x, NULL, NULL, y, 0, 0, 0.0f, n, ctx->k, 8};
    ea_pool_run(ctx->pool, gelu_task, &j, j.n_tasks);
}

void ea_add(const ea_kctx *ctx, const float *a, const float *b, size_t n, float *y) {
    (void)ctx;
    for (size_t i = 0; i < n; i++) y[i] = a[i] + b[i];
}

static int ids_valid(const int64_t *ids, int n, int vocab) {
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= vocab) return 0;
    return 1;
}

int ea_embed_f32(const ea_kctx *ctx, const float *table, int vocab, int dim, const int64_t *ids, int n, float *out) {
    (void)ctx;
    if (vocab <= 0 || dim <= 0 || n < 0 || !ids_valid(ids, n, vocab)) return EA_KERR_ARG;
    for (int i = 0; i < n; i++)
        memcpy(out + (size_t)i * dim, table + (size_t)ids[i] * dim, sizeof(float) * (size_t)dim);
    return EA_KOK;
}

int ea_embed_f16(const ea_kctx *ctx, const uint16_t *table, int vocab, int dim, const int64_t *ids, int n, float *out) {
    if (vocab <= 0 || dim <= 0 || n < 0 || !ids_valid(ids, n, vocab)) return EA_KERR_ARG;
    for (int i = 0; i < n; i++)
        ea_f16_to_f32_row(ctx, table + (size_t)ids[i] * dim, out + (size_t)i * dim, (size_t)dim);
    return EA_KOK;
}
