/* The executor: runs the plan over chunks of new tokens with the KV cache,
 * steering, hidden-state capture and the profiler living in the session.
 * All buffers are sized at session creation, so decoding does not allocate. */
#define _GNU_SOURCE
#include "session.h"
#include "weights.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int ea_physical_cores(void) {
    /* distinct (package, core) pairs; SMT siblings share a core and its SIMD units */
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    if (online < 1) online = 1;
    int seen[1024][2], n = 0;
    for (long c = 0; c < online && c < 1024; c++) {
        char path[128];
        int ids[2] = {-1, -1};
        const char *names[2] = {"physical_package_id", "core_id"};
        for (int k = 0; k < 2; k++) {
            snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%ld/topology/%s", c, names[k]);
            FILE *f = fopen(path, "r");
            if (!f) return (int)online;
            if (fscanf(f, "%d", &ids[k]) != 1) ids[k] = -1;
            fclose(f);
        }
        int dup = 0;
        for (int i = 0; i < n && !dup; i++) dup = seen[i][0] == ids[0] && seen[i][1] == ids[1];
        if (!dup) {
            seen[n][0] = ids[0];
            seen[n][1] = ids[1];
            n++;
        }
    }
    return n > 0 ? n : (int)online;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void steer_rows(const ea_session *ss, const step *st, float *h, int S, int width) {
    const float *add = ss->steer_add[st->layer], *abl = ss->steer_ablate[st->layer];
    int R = ss->steer_R[st->layer];
    if (!add && !st->def_add_zero) add = st->def_add;
    if (!abl && !st->def_ablate_zero) abl = st->def_ablate, R = st->def_R;
    for (int s = 0; s < S; s++) {
        float *x = h + (size_t)s * width;
        if (abl) { /* y = h - (h A^T) A: coefficients from the unmodified row */
            for (int r = 0; r < R; r++) {
                const float *a = abl + (size_t)r * width;
                float c = 0.0f;
                for (int k = 0; k < width; k++) c += x[k] * a[k];
                ss->coef[r] = c;
            }
            for (int r = 0; r < R; r++) {
                const float *a = abl + (size_t)r * width;
                const float c = ss->coef[r];
                for (int k = 0; k < width; k++) x[k] -= c * a[k];
            }
        }
        if (add)
            for (int k = 0; k < width; k++) x[k] += add[k];
    }
}

/* The k-th largest of x[0..n) (1 <= k <= n, x >= 0), using tmp[n]. Non-negative floats order
 * like their bit patterns: one histogram of the top 12 bits (sign, exponent, 3 mantissa bits)
 * finds the bin holding the answer, and only that bin's few values go through a quickselect,
 * whose data-dependent branches over all n values cost ~4x as much. */
static float kth_largest(const float *x, int n, int k, float *tmp) {
    uint32_t hist[4096] = {0};
    for (int i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], sizeof u);
        hist[u >> 20]++;
    }
    int b = 4095;
    while (b > 0 && (int)hist[b] < k) k -= (int)hist[b--];
    int m = 0;
    for (int i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], sizeof u);
        if ((int)(u >> 20) == b) tmp[m++] = x[i];
    }
    int lo = 0, hi = m - 1; /* quickselect for the k-th largest of tmp[0..m) */
    const int want = k - 1;
    while (lo < hi) {
        const float pivot = tmp[lo + (hi - lo) / 2];
        int a = lo, c = hi;
        while (a <= c) {
            while (tmp[a] > pivot) a++;
            while (tmp[c] < pivot) c--;
            if (a <= c) {
                const float t = tmp[a];
                tmp[a++] = tmp[c];
                tmp[c--] = t;
            }
        }
        if (want <= c) hi = c;
        else if (want >= a) lo = a;
        else break;
    }
    return tmp[want];
}

/* y = h * mask. While the caller has not fixed a mask (the prompt), count per channel the rows
 * where |h| reaches the row's token_k-th largest: the same rule as the function body. */
static void neuron_mask(ea_session *ss, const step *st, int si, int e, const float *a, float *y, int S, int w) {
    const int L = st->layer;
    const float *mask = ss->nmask[L] ? ss->nmask[L] : st->def_mask;
    for (int r = 0; r < S; r++) {
        const float *hr = a + (size_t)r * w;
        float *yr = y + (size_t)r * w;
        for (int k = 0; k < w; k++) yr[k] = hr[k] * mask[k];
        if (ss->nmask[L]) continue;
        float *ah = ss->sel, *tmp = ss->sel + w;
        for (int k = 0; k < w; k++) ah[k] = fabsf(hr[k]);
        const float kth = kth_largest(ah, w, st->token_k, tmp);
        float *score = ss->nscore[L];
        for (int k = 0; k < w; k++) score[k] += ah[k] >= kth ? 1.0f : 0.0f;
    }
    /* active[si] holds the kept channels (set with the mask), which down_proj's input-sparse GEMV reads */
    if (__builtin_expect(ss->profile, 0)) {
        ss->prof_active[e] += (uint64_t)S * (uint64_t)ss->n_active[si];
        ss->prof_total[e] += (uint64_t)S * (uint64_t)w;
    }
}

/* The path of a decode GEMV behind a Sparsify (sparse_tune.h): measured per unit, unless a
 * setting fixes it (static_sparse: the fixed rule's answer, for EDGEACT_SPARSE_STATIC). Both
 * paths give the same bits. */
static int pick_path(const ea_session *ss, ea_sparse_tune *t, int n_active, int static_sparse) {
    const ea_model *m = ss->m;
    if (m->sparse_always) return 1;
    if (m->sparse_static) return static_sparse;
    return ea_tune_pick(t, n_active);
}

static int pick_sparse(ea_session *ss, const ea_qweight_cm *cm, int unit, int n_active) {
    return pick_path(ss, &ss->tune[unit], n_active, !ea_sparse_prefers_dense(cm, n_active));
}

static void tune_record(const ea_session *ss, ea_sparse_tune *t, int sparse, int n_active, uint64_t ns) {
    if (!ss->m->sparse_always && !ss->m->sparse_static) ea_tune_record(t, sparse, n_active, ns);
}

/* A prompt chunk's rows of a matmul behind a Sparsify, with both copies loaded: the dense GEMM,
 * or each thread taking whole rows on the channel-major copy (sparse_rows), which gives the same
 * bits. Where one matmul's active rows stay in the last-level cache from row to row the rows
 * win at high sparsity (TinyLlama shape, 32 MB L3, teal 0.7: pp128 1.5x); where they do not,
 * each row reads them from memory. So it is measured, per unit, as decode's choice is, on the
 * time per row (ea_sparse_tune with one "channel"). Chunks shorter than EA_PREFILL_ROWS_MIN
 * rows or two rows per thread run the GEMM and are not timed: the GEMM's time per row grows as
 * chunks shrink (it reads the weights once per chunk), and a prompt's short tail chunk would
 * otherwise skew the average of the full ones. Among the eligible chunks EDGEACT_SPARSE_STATIC
 * keeps the GEMM, EDGEACT_SPARSE_ALWAYS takes the rows (pick_path). */
#define EA_PREFILL_ROWS_MIN 16
static int prefill_rows_eligible(const ea_session *ss, const step *st, int rows) {
    if (!ss->row_ctx || !st->sparse_src || st->dense_dropped || !(st->cm_ready || st->fuse) ||
        rows < 2 * ss->n_threads || rows < EA_PREFILL_ROWS_MIN)
        return 0;
    /* only a copy that can stay in the last-level cache: elsewhere each explored chunk would read
     * it from memory once per row (on a small-cache board, seconds for a TinyLlama-sized layer) */
    const ea_qweight_cm *cm = st->fuse ? &ss->m->fused[st->fuse - 1].cm : &st->cm;
    return cm->bytes <= ss->llc_bytes / 2;
}

/* The last-level cache's size as the C library reports it (glibc: sysconf), else 1 MiB: an
 * unknown cache keeps the rows path to small matmuls. */
static size_t llc_bytes(void) {
    long b = -1;
#ifdef _SC_LEVEL3_CACHE_SIZE
    b = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (b <= 0) b = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return b > 0 ? (size_t)b : (size_t)1 << 20;
}

/* After a decode GEMV behind a Sparsify (exec step e): the profile's path counts; returns the
 * weight bytes it read (on the sparse path the share n_active of `of`, the input channels or the
 * output rows it skips along; all on the dense one). */
static uint64_t gemv_path_done(ea_session *ss, int e, const step *st, int sparse, int n_active, int of) {
    if (__builtin_expect(ss->profile, 0)) {
        ss->prof_sparse[e] += (uint64_t)sparse;
        ss->prof_eligible[e]++;
    }
    return sparse ? (uint64_t)((double)st->weight_bytes * n_active / (of ? of : 1)) : st->weight_bytes;
}

/* A prompt's rows of a sparse matmul on the channel-major copy (low memory, whose dense repack
 * is gone, or the measured prefill choice), each on the input-sparse GEMV over its own nonzero
 * channels (the input is the Sparsify's masked output, so those are the channels it kept; the
 * result is the dense GEMM's on that input, bit for bit). With
 * enough rows each thread takes whole rows, one kernel call each on its own context: the
 * weights of one matmul sit in the last-level cache after the first row, and splitting every
 * row's outputs between the threads (as decode does) cost a pool dispatch and a wait per row
 * per matmul, and left the nonzero scan serial (TinyLlama shape, teal 0.5: pp128 131 t/s that
 * way on 2 threads, 98 on one). A stacked group writes every member's rows, into their
 * outputs when they have their own (g->direct), else into rows_fused. */
/* Row r of each member's own output, for a stacked group written in place (g->direct). */
static void group_outputs(const ea_session *ss, const fused_gemv *g, int r, float **outs, int *ns) {
    const ea_model *m = ss->m;
    for (int i = 0; i < g->n; i++) {
        const step *mi = &m->steps[g->step[i]];
        outs[i] = ss->slots[m->values[mi->out].slot] + (size_t)r * mi->N;
        ns[i] = mi->N;
    }
}

typedef struct {
    ea_session *ss;
    const fused_gemv *g;
    const ea_qweight_cm *cm;
    const float *a;
    float *y; /* lone matmul: its output; group: rows_fused when not direct */
    int rows, n_tasks, N;
    int rc[EA_ROW_THREADS_MAX];
    uint64_t active[EA_ROW_THREADS_MAX];
} sparse_rows_job;

static void sparse_rows_task(void *arg, int task, int thread) {
    sparse_rows_job *j = arg;
    ea_session *ss = j->ss;
    ea_model *m = ss->m;
    /* one context per pool thread (no pool: the kernel runs on this thread); the caller's own
     * context when the rows run unsplit */
    ea_kctx *ctx = j->n_tasks > 1 ? &ss->row_ctx[thread] : &ss->kctx;
    int32_t *act = ss->rows_active + (size_t)thread * ((size_t)m->max_act_width + 1);
    float *scratch = ss->fused_y + (size_t)thread * ((size_t)m->max_fused_n + 1);
    const int K = j->cm->K, r0 = (int)((long)task * j->rows / j->n_tasks), r1 = (int)((long)(task + 1) * j->rows / j->n_tasks);
    int rc = EA_KOK;
    uint64_t active = 0;
    for (int r = r0; r < r1 && !rc; r++) {
        const float *x = j->a + (size_t)r * K;
        int na = 0;
        for (int k = 0; k < K; k++)
            if (x[k] != 0.0f) act[na++] = k;
        active += (uint64_t)na;
        if (j->g && j->g->direct) {
            float *outs[EA_FUSE_MAX];
            int ns[EA_FUSE_MAX];
            group_outputs(ss, j->g, r, outs, ns);
            rc = ea_sparse_qgemv_split(ctx, j->cm, x, act, na, scratch, outs, ns, j->g->n);
        } else {
            rc = ea_sparse_qgemv(ctx, j->cm, NULL, x, act, na, j->y + (size_t)r * j->N);
        }
    }
    j->rc[task] = rc;
    j->active[task] = active;
}

/* *read: the weight bytes read (the active channels' rows). A stacked group's first member to
 * run computes every member's rows; the others only copy their slice when not direct. */
static int sparse_rows(ea_session *ss, const step *st, const float *a, int rows, float *y, uint64_t *read) {
    ea_model *m = ss->m;
    const fused_gemv *g = st->fuse ? &m->fused[st->fuse - 1] : NULL;
    const ea_qweight_cm *cm = g ? &g->cm : &st->cm;
    *read = 0;
    if (g && !g->direct) {
        const size_t need = (size_t)rows * (size_t)cm->N;
        if (need > ss->rows_fused_cap) {
            float *p = realloc(ss->rows_fused, sizeof(float) * need);
            if (!p) return EA_KERR_NOMEM;
            ss->rows_fused = p;
            ss->rows_fused_cap = need;
            ss->rows_owner = 0;
        }
    }
    int rc = EA_KOK;
    if (!g || ss->rows_owner != st->fuse) {
        const int threads = ss->row_ctx ? ss->n_threads : 1;
        sparse_rows_job j = {ss, g, cm, a, g ? ss->rows_fused : y, rows, rows >= 2 * threads ? threads : 1,
                             g ? cm->N : st->N, {0}, {0}};
        if (j.n_tasks > 1) ea_pool_run(ss->pool, sparse_rows_task, &j, j.n_tasks);
        else sparse_rows_task(&j, 0, 0);
        uint64_t active = 0;
        for (int t = 0; t < j.n_tasks; t++) {
            if (j.rc[t] && !rc) rc = j.rc[t];
            active += j.active[t];
        }
        if (g) ss->rows_owner = rc ? 0 : st->fuse;
        /* the bytes of the channel rows read, charged to the step that read them */
        *read = (uint64_t)((double)cm->bytes * (double)active / (double)cm->K);
    }
    if (!rc && g && !g->direct)
        for (int r = 0; r < rows; r++)
            memcpy(y + (size_t)r * st->N, ss->rows_fused + (size_t)r * cm->N + st->fuse_off, sizeof(float) * (size_t)st->N);
    return rc;
}

/* Runs S tokens at positions pos0.. ; logits rows go to `logits` (all rows, or the last one
 * when last_only; NULL skips the logits step). Returns an EA_ERR_* code. */
static int run_chunk(ea_session *ss, int S, int pos0, int tok_offset, float *logits, int last_only, ea_err *err) {
    ea_model *m = ss->m;
    ea_kctx *ctx = &ss->kctx;
    ss->fused_owner = 0;
    ss->rows_owner = 0;
    memset(ss->punit_path, -1, (size_t)m->n_fused + 1);
    memset(ss->punit_ns, 0, sizeof(uint64_t) * ((size_t)m->n_fused + 1));
    memset(ss->unit_sparse, -1, (size_t)m->n_fused + 1);
    memset(ss->unit_ns, 0, sizeof(uint64_t) * ((size_t)m->n_fused + 1));
    for (int e = 0; e < ss->n_exec; e++) {
        const int si = ss->exec_steps[e];
        const step *st = &m->steps[si];
        if (si == m->logits_step && !logits) continue;
        uint64_t t0 = 0;
        if (__builtin_expect(ss->profile, 0)) t0 = now_ns();
        const value *ov = st->out >= 0 ? &m->values[st->out] : NULL;
        float *y = ov && ov->kind == V_ACT ? ss->slots[ov->slot] : NULL;
        const float *a = st->in[0] >= 0 && m->values[st->in[0]].kind == V_ACT ? ss->slots[m->values[st->in[0]].slot] : NULL;
        const float *bb = st->in[1] >= 0 && m->values[st->in[1]].kind == V_ACT ? ss->slots[m->values[st->in[1]].slot] : NULL;
        const int w = ov ? ov->width : 0;
        const size_t n = (size_t)S * (size_t)w;
        int rows = S;
        uint64_t bytes = st->weight_bytes;
        int rc = EA_KOK;
        switch (st->op) {
        case OP_GATHER: {
            /* Row by row, handing each row's pages back: a fault in a file mapping maps the
             * whole large folio around the row, so a 128-token prompt made 58 MB of SmolLM2's
             * 56 MB fp16 table resident (peak RSS 1.21x). The window released is the aligned
             * 2 MiB (the largest folio) around the row, clipped to the table. */
            const size_t es = st->table_f16 ? 2 : 4, row = (size_t)st->N * es, tbytes = (size_t)st->vocab * row;
            const uintptr_t t0 = (uintptr_t)st->table, t1 = t0 + tbytes, win = (uintptr_t)2 << 20;
            for (int r = 0; r < S; r++) {
                rc = st->table_f16 ? ea_embed_f16(ctx, st->table, st->vocab, st->N, ss->ids + r, 1, y + (size_t)r * st->N)
                                   : ea_embed_f32(ctx, st->table, st->vocab, st->N, ss->ids + r, 1, y + (size_t)r * st->N);
                if (rc) break;
                const uintptr_t at = (t0 + (uintptr_t)ss->ids[r] * row) & ~(win - 1);
                const uintptr_t lo = at > t0 ? at : t0, hi = at + win < t1 ? at + win : t1;
                ea_release_pages(m, (const void *)lo, hi - lo);
            }
            bytes = (uint64_t)S * row;
            break;
        }
        case OP_CAST:
            if (!st->inplace) memcpy(y, a, n * sizeof(float));
            break;
        case OP_RMSNORM: ea_rmsnorm(ctx, a, st->w, S, w, st->eps, y); break;
        case OP_MATMUL:
        case OP_QMATMUL:
            if (si == m->logits_step && last_only) { /* decode needs one row of the vocabulary projection */
                a += (size_t)(S - 1) * st->K;
                rows = 1;
            }
            if (st->row_src && rows == 1 && ss->has_kept[si]) {
                /* CoreInfer's fixed neurons: the dense GEMV over the kept rows of gate/up, scattered
                 * (the other rows are 0 and masked later) */
                const int nr = ss->n_active[st->row_src - 1];
                const int32_t *idx = ss->active[st->row_src - 1];
                memset(y, 0, sizeof(float) * (size_t)st->N);
                rc = nr ? ea_qmatmul(ctx, &ss->kept[si], a, 1, ss->kept_y) : EA_KOK;
                for (int r = 0; r < nr && !rc; r++) y[idx[r]] = ss->kept_y[r];
                bytes = (uint64_t)((double)st->weight_bytes * nr / (st->N ? st->N : 1));
                break;
            }
            if (st->fuse && rows == 1) {
                /* a sibling of a stacked GEMV: the first to run picks the path for the group and,
                 * when sparse, computes all of them (the input and its active list are the same)
                 * into their outputs when g->direct, else the others copy their rows. Dense, each
                 * runs its own GEMV on the masked input. */
                const int gi = st->fuse - 1;
                const fused_gemv *g = &m->fused[gi];
                const int src = st->sparse_src - 1, na = ss->n_active[src];
                const uint64_t u0 = now_ns();
                if (ss->unit_sparse[gi] < 0)
                    ss->unit_sparse[gi] = (int8_t)(st->dense_dropped || pick_sparse(ss, &g->cm, gi, na));
                const int sparse = ss->unit_sparse[gi];
                if (!sparse) {
                    rc = ea_masked_qgemv(ctx, &st->qw, a, ss->active[src], na, y);
                } else {
                    if (ss->fused_owner != st->fuse) {
                        if (g->direct) {
                            float *outs[EA_FUSE_MAX];
                            int ns[EA_FUSE_MAX];
                            group_outputs(ss, g, 0, outs, ns);
                            rc = ea_sparse_qgemv_split(ctx, &g->cm, a, ss->active[src], na, ss->fused_y, outs, ns, g->n);
                        } else {
                            rc = ea_sparse_qgemv(ctx, &g->cm, NULL, a, ss->active[src], na, ss->fused_y);
                        }
                        ss->fused_owner = rc ? 0 : st->fuse;
                    }
                    if (!rc && !g->direct) memcpy(y, ss->fused_y + st->fuse_off, sizeof(float) * (size_t)st->N);
                }
                ss->unit_ns[gi] += now_ns() - u0;
                if (si == g->step[g->n - 1]) {
                    if (!rc) tune_record(ss, &ss->tune[gi], sparse, na, ss->unit_ns[gi]);
                    ss->fused_owner = 0;
                    ss->unit_sparse[gi] = -1;
                    ss->unit_ns[gi] = 0;
                }
                bytes = gemv_path_done(ss, e, st, sparse, na, st->K);
                break;
            }
            if (st->sparse_src && rows == 1) {
                /* one row behind a Sparsify: read only the weights of its active channels, or
                 * all of them on the masked input where that measured faster */
                const int src = st->sparse_src - 1, na = ss->n_active[src], unit = m->n_fused + si;
                const uint64_t u0 = now_ns();
                const int sparse = st->dense_dropped || pick_sparse(ss, &st->cm, unit, na);
                rc = sparse ? ea_sparse_qgemv(ctx, &st->cm, NULL, a, ss->active[src], na, y)
                            : ea_masked_qgemv(ctx, &st->qw, a, ss->active[src], na, y);
                if (!rc) tune_record(ss, &ss->tune[unit], sparse, na, now_ns() - u0);
                bytes = gemv_path_done(ss, e, st, sparse, na, st->K);
                break;
            }
            if (st->rowsel_src && rows == 1) {
                /* CATS: the rows whose gate activation the Sparsify dropped are multiplied by 0;
                 * compute only the kept ones from a copy of the file layout (the rest 0), or all
                 * with the dense kernel where that measured faster. Same values either way. */
                const int src = st->rowsel_src - 1, na = ss->n_active[src], unit = m->n_fused + si;
                const uint64_t u0 = now_ns();
                const int sparse = pick_path(ss, &ss->tune[unit], na, st->N >= EA_SPARSE_MIN_N && na < EA_ROWS_STATIC_SHARE * st->N);
                if (sparse) {
                    memset(y, 0, sizeof(float) * (size_t)st->N);
                    rc = ea_qgemv_rows(ctx, st->rows_buf ? &st->rows_qw : &st->qw, a, ss->active[src], na, y);
                } else {
                    rc = ea_qmatmul(ctx, &st->qw, a, 1, y);
                }
                if (!rc) tune_record(ss, &ss->tune[unit], sparse, na, now_ns() - u0);
                bytes = gemv_path_done(ss, e, st, sparse, na, st->N);
                break;
            }
            if (st->dense_dropped) {
                uint64_t read = 0;
                rc = sparse_rows(ss, st, a, rows, y, &read);
                bytes = read;
                break;
            }
            if (prefill_rows_eligible(ss, st, rows)) {
                /* a group decides at its first member to run and is timed over all of them */
                const int gi = st->fuse ? st->fuse - 1 : -1, unit = gi >= 0 ? gi : m->n_fused + si;
                int sparse;
                if (gi < 0) sparse = pick_path(ss, &ss->ptune[unit], 1, 0);
                else {
                    if (ss->punit_path[gi] < 0) ss->punit_path[gi] = (int8_t)pick_path(ss, &ss->ptune[unit], 1, 0);
                    sparse = ss->punit_path[gi];
                }
                const uint64_t u0 = now_ns();
                uint64_t read = st->weight_bytes;
                rc = sparse ? sparse_rows(ss, st, a, rows, y, &read) : ea_qmatmul(ctx, &st->qw, a, rows, y);
                const uint64_t ns = now_ns() - u0;
                if (gi >= 0) ss->punit_ns[gi] += ns;
                const int last = gi < 0 || si == m->fused[gi].step[m->fused[gi].n - 1];
                if (!rc && last)
                    tune_record(ss, &ss->ptune[unit], sparse, 1, (gi >= 0 ? ss->punit_ns[gi] : ns) / (uint64_t)rows);
                bytes = read;
                break;
            }
            rc = st->op == OP_QMATMUL ? (st->f32act ? ea_qmatmul_f32act : ea_qmatmul)(ctx, &st->qw, a, rows, y)
                 : st->Wh ? ea_matmul_f16(ctx, a, rows, st->K, st->Wh, st->N, y)
                          : ea_matmul_f32(ctx, a, rows, st->K, st->Wf, st->N, y);
            break;
        case OP_GQA: {
            const float *k = ss->slots[m->values[st->in[1]].slot], *v = ss->slots[m->values[st->in[2]].slot];
            const int qw = st->H * st->D, kw = st->KVH * st->D;
            float *kc = ss->k_cache[st->layer], *vc = ss->v_cache[st->layer];
            memcpy(ss->qbuf, a, sizeof(float) * (size_t)S * qw);
            memcpy(ss->kbuf, k, sizeof(float) * (size_t)S * kw);
            if (st->rotary) {
                rc = ea_rope(ctx, ss->qbuf, S, st->H, st->D, st->cos, st->sin, st->max_pos, pos0);
                if (!rc) rc = ea_rope(ctx, ss->kbuf, S, st->KVH, st->D, st->cos, st->sin, st->max_pos, pos0);
            }
            if (rc) break;
            for (int s = 0; s < S; s++)
                for (int h = 0; h < st->KVH; h++) {
                    size_t dst = ((size_t)h * ss->n_ctx + (size_t)(pos0 + s)) * st->D;
                    memcpy(kc + dst, ss->kbuf + (size_t)s * kw + (size_t)h * st->D, sizeof(float) * st->D);
                    memcpy(vc + dst, v + (size_t)s * kw + (size_t)h * st->D, sizeof(float) * st->D);
                }
            rc = ea_attention(ctx, ss->qbuf, S, st->H, st->D, kc, vc, st->KVH, ss->n_ctx, pos0, st->scale, y);
            bytes = (uint64_t)(pos0 + S) * kw * 2 * sizeof(float);
            break;
        }
        case OP_ADD: ea_add(ctx, a, bb, n, y); break;
        case OP_ADD_BIAS:
            for (int s = 0; s < S; s++)
                for (int k = 0; k < w; k++) y[(size_t)s * w + k] = a[(size_t)s * w + k] + st->w[k];
            break;
        case OP_MUL:
            for (size_t i = 0; i < n; i++) y[i] = a[i] * bb[i];
            break;
        case OP_SIGMOID:
            for (size_t i = 0; i < n; i++) y[i] = 1.0f / (1.0f + expf(-a[i]));
            break;
        case OP_SILU_MUL: ea_silu_mul(ctx, a, bb, n, y); break;
        case OP_SILU: ea_silu_mul(ctx, a, NULL, n, y); break;
        case OP_STEER:
            if (!st->inplace) memcpy(y, a, n * sizeof(float));
            if (ss->steer_add[st->layer] || ss->steer_ablate[st->layer] || !st->def_add_zero || !st->def_ablate_zero)
                steer_rows(ss, st, y, S, w);
            break;
        case OP_SPARSIFY: {
            int na = 0;
            for (int r = 0; r < S; r++) {
                const float *xr = a + (size_t)r * w;
                float *yr = y + (size_t)r * w;
                /* same rule as the function body: keep when |x|·col_scale >= threshold */
                na = ea_sparsify(ctx, xr, st->thr, st->thr_step, st->colsc, w, yr, ss->active[si]);
                if (__builtin_expect(ss->profile, 0)) {
                    ss->prof_active[e] += (uint64_t)na;
                    ss->prof_total[e] += (uint64_t)w;
                }
            }
            ss->n_active[si] = na;
            break;
        }
        case OP_NEURON_MASK: neuron_mask(ss, st, si, e, a, y, S, w); break;
        case OP_NOP: break;
        }
        if (rc) {
            ea_fail(err, "node '%s' (%s): kernel error: %s", st->name, st->op_type, ea_kernels_strerror(rc));
            return EA_ERR_KERNEL;
        }
        if (ov && ov->hidden_layer >= 0 && ss->capture && ov->hidden_layer < m->n_hidden)
            memcpy(ss->hidden_buf + ((size_t)ov->hidden_layer * ss->hidden_tokens + tok_offset) * w, y,
                   n * sizeof(float));
        if (si == m->logits_step) {
            if (last_only) memcpy(logits, y + (size_t)(rows - 1) * w, sizeof(float) * w);
            else memcpy(logits, y, sizeof(float) * n);
        }
        if (__builtin_expect(ss->profile, 0)) {
            ss->prof_ns[e] += now_ns() - t0;
            ss->prof_calls[e]++;
            ss->prof_bytes[e] += bytes;
        }
    }
    return EA_OK;
}

int ea_session_run(ea_session *ss, const int64_t *ids, int n, float *logits, int all_logits, ea_err *err) {
    ea_model *m = ss->m;
    if (n <= 0) return ea_fail(err, "forward needs at least one token (got %d)", n), EA_ERR_ARG;
    if (!ids || !logits) return ea_fail(err, "forward: ids and logits must not be NULL"), EA_ERR_ARG;
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= m->vocab)
            return ea_fail(err, "token id %lld at position %d is outside the vocabulary [0, %d)", (long long)ids[i], i,
                           m->vocab), EA_ERR_ARG;
    if (n > ss->n_ctx - ss->n_past)
        return ea_fail(err, "context overflow: %d cached + %d new tokens exceed the session's n_ctx %d "
                            "(reset the session or create it with a larger n_ctx, max %d)",
                       ss->n_past, n, ss->n_ctx, m->max_context), EA_ERR_CONTEXT;
    if (ss->capture && m->n_hidden) {
        size_t need = (size_t)m->n_hidden * (size_t)n * (size_t)m->hidden;
        if (need > ss->hidden_cap) {
            float *p = realloc(ss->hidden_buf, need * sizeof(float));
            if (!p) return ea_fail(err, "out of memory for %d tokens of hidden-state capture", n), EA_ERR_NOMEM;
            ss->hidden_buf = p;
            ss->hidden_cap = need;
        }
        ss->hidden_tokens = n;
    }
    for (int L = 0; L < m->n_nmask; L++) memset(ss->nscore[L], 0, sizeof(float) * (size_t)m->nmask_width);
    const int start = ss->n_past;
    for (int c = 0; c < n; c += ss->max_chunk) {
        const int S = n - c < ss->max_chunk ? n - c : ss->max_chunk;
        const int last = c + S == n;
        memcpy(ss->ids, ids + c, sizeof(int64_t) * S);
        float *out = all_logits ? logits + (size_t)c * m->vocab : last ? logits : NULL;
        int rc = run_chunk(ss, S, ss->n_past, c, out, !all_logits, err);
        if (rc) {
            ss->n_past = start; /* the cache rows past `start` are simply overwritten next time */
            return rc;
        }
        ss->n_past += S;
    }
    return EA_OK;
}

void ea_session_drop_kept(ea_session *ss, int si) {
    if (!ss->has_kept[si]) return;
    ea_qweight_release(&ss->kept[si]);
    free(ss->kept_src[si]);
    ss->kept_src[si] = NULL;
    ss->has_kept[si] = 0;
}

/* After a NeuronMask layer's mask changed: a copy of each gate/up weight holding only the kept rows
 * (file layout gathered, then prepared like any weight), or none when too many rows are kept to
 * pay. Returns an EA_ERR_* code. */
int ea_session_prepare_kept(ea_session *ss, int layer) {
    ea_model *m = ss->m;
    for (int si = 0; si < m->n_steps; si++) {
        const step *st = &m->steps[si];
        if (!st->row_src || m->steps[st->row_src - 1].layer != layer) continue;
        const int nr = ss->n_active[st->row_src - 1];
        const int32_t *idx = ss->active[st->row_src - 1];
        ea_session_drop_kept(ss, si);
        /* the GEMV on the kept rows costs in proportion to them: it pays unless nearly all are kept */
        if (!ss->nmask[layer] || nr > 0.9 * st->N || nr == 0) continue;
        const ea_qweight *w = &st->qw;
        const size_t row = (size_t)w->n_blocks * w->block_size * w->bits / 8, sc = (size_t)w->n_blocks;
        const size_t zrow = w->zero_points ? (w->bits == 4 ? (sc + 1) / 2 : sc) : 0;
        uint8_t *src = malloc((size_t)nr * (row + sc * sizeof(float) + zrow) + 64);
        if (!src) return EA_ERR_NOMEM;
        float *scales = (float *)(src + (((size_t)nr * row + 15) & ~(size_t)15));
        uint8_t *zp = zrow ? (uint8_t *)(scales + (size_t)nr * sc) : NULL;
        for (int r = 0; r < nr; r++) {
            memcpy(src + (size_t)r * row, w->data + (size_t)idx[r] * row, row);
            memcpy(scales + (size_t)r * sc, w->scales + (size_t)idx[r] * sc, sc * sizeof(float));
            if (zp) memcpy(zp + (size_t)r * zrow, w->zero_points + (size_t)idx[r] * zrow, zrow);
        }
        if (ea_qweight_init(&ss->kept[si], m->isa, w->K, nr, w->bits, w->block_size, src, scales, zp)) {
            free(src);
            return EA_ERR_NOMEM;
        }
        if (ss->kept[si].packed) { /* the SIMD kernels read only the repack: keep scales and zero points */
            const size_t tail = (size_t)nr * (sc * sizeof(float) + zrow);
            uint8_t *small = malloc(tail);
            if (small) {
                memcpy(small, scales, tail);
                free(src);
                src = small;
                ss->kept[si].data = NULL;
                ss->kept[si].scales = (const float *)small;
                ss->kept[si].zero_points = zrow ? small + (size_t)nr * sc * sizeof(float) : NULL;
            }
        }
        ss->kept_src[si] = src;
        ss->has_kept[si] = 1;
    }
    return EA_OK;
}

void ea_session_destroy(ea_session *ss) {
    ea_model *m = ss->m;
    if (ss->slots)
        for (int i = 0; i < m->n_slots; i++) free(ss->slots[i]);
    if (ss->k_cache)
        for (int i = 0; i < m->n_gqa; i++) free(ss->k_cache[i]), free(ss->v_cache[i]);
    if (ss->steer_add)
        for (int i = 0; i < m->n_steer; i++) free(ss->steer_add[i]), free(ss->steer_ablate[i]);
    free(ss->slots);
    free(ss->k_cache);
    free(ss->v_cache);
    free(ss->steer_add);
    free(ss->steer_ablate);
    free(ss->steer_R);
    free(ss->coef);
    free(ss->ids);
    free(ss->qbuf);
    free(ss->kbuf);
    free(ss->hidden_buf);
    free(ss->exec_steps);
    free(ss->prof_ns);
    free(ss->prof_calls);
    free(ss->prof_bytes);
    free(ss->prof_active);
    free(ss->prof_total);
    free(ss->prof_sparse);
    free(ss->prof_eligible);
    free(ss->tune);
    free(ss->ptune);
    free(ss->punit_path);
    free(ss->punit_ns);
    free(ss->unit_sparse);
    free(ss->unit_ns);
    if (ss->active)
        for (int s = 0; s < ss->m->n_steps; s++) free(ss->active[s]);
    free(ss->active);
    free(ss->n_active);
    for (int L = 0; L < m->n_nmask; L++) {
        if (ss->nmask) free(ss->nmask[L]);
        if (ss->nscore) free(ss->nscore[L]);
    }
    free(ss->nmask);
    free(ss->nscore);
    free(ss->sel);
    for (int st = 0; ss->has_kept && ss->kept && st < m->n_steps; st++) ea_session_drop_kept(ss, st);
    free(ss->kept);
    free(ss->kept_src);
    free(ss->has_kept);
    free(ss->kept_y);
    free(ss->fused_y);
    free(ss->rows_active);
    free(ss->rows_fused);
    if (ss->row_ctx)
        for (int t = 0; t < ss->n_threads; t++) ea_kctx_release(&ss->row_ctx[t]);
    free(ss->row_ctx);
    ea_kctx_release(&ss->kctx);
    if (ss->pool) ea_pool_destroy(ss->pool);
    free(ss);
}

int ea_session_init(ea_session *ss, ea_model *m, int n_threads, int n_ctx, int max_chunk, ea_err *err) {
    ss->m = m;
    ss->n_threads = n_threads > 0 ? n_threads : ea_physical_cores();
    ss->n_ctx = n_ctx > 0 ? n_ctx : (m->max_context < 4096 ? m->max_context : 4096);
    ss->max_chunk = max_chunk > 0 ? max_chunk : 64;
    if (ss->n_threads > EA_ROW_THREADS_MAX) return ea_fail(err, "n_threads %d is too large", n_threads), EA_ERR_ARG;
    if (ss->n_ctx > m->max_context)
        return ea_fail(err, "n_ctx %d exceeds the model's max_context %d", ss->n_ctx, m->max_context), EA_ERR_ARG;
    if (ss->max_chunk > 4096) return ea_fail(err, "max_chunk %d is too large (at most 4096)", max_chunk), EA_ERR_ARG;
    if (ss->max_chunk > ss->n_ctx) ss->max_chunk = ss->n_ctx;
    if (ss->n_threads > 1) {
        ss->pool = ea_pool_create(ss->n_threads);
        if (!ss->pool) return ea_fail(err, "cannot start %d threads", ss->n_threads), EA_ERR_NOMEM;
    }
    int rc = ea_kctx_init(&ss->kctx, m->isa, ss->pool);
    if (rc) return ea_fail(err, "kernel context: %s", ea_kernels_strerror(rc)), EA_ERR_KERNEL;
    ss->llc_bytes = llc_bytes();
    int has_cm = m->n_fused > 0;
    for (int s = 0; s < m->n_steps && !has_cm; s++) has_cm = m->steps[s].cm_ready;
    if (has_cm && ss->pool) {
        if (!(ss->row_ctx = calloc((size_t)ss->n_threads, sizeof(ea_kctx))))
            return ea_fail(err, "out of memory creating the session"), EA_ERR_NOMEM;
        for (int t = 0; t < ss->n_threads; t++)
            if ((rc = ea_kctx_init(&ss->row_ctx[t], m->isa, NULL)))
                return ea_fail(err, "kernel context: %s", ea_kernels_strerror(rc)), EA_ERR_KERNEL;
    }
    const size_t C = (size_t)ss->max_chunk;
    ss->slots = calloc((size_t)m->n_slots + 1, sizeof(float *));
    ss->k_cache = calloc((size_t)m->n_gqa, sizeof(float *));
    ss->v_cache = calloc((size_t)m->n_gqa, sizeof(float *));
    ss->steer_add = calloc((size_t)m->n_steer + 1, sizeof(float *));
    ss->steer_ablate = calloc((size_t)m->n_steer + 1, sizeof(float *));
    ss->steer_R = calloc((size_t)m->n_steer + 1, sizeof(int));
    ss->ids = malloc(sizeof(int64_t) * C);
    ss->qbuf = malloc(sizeof(float) * C * (size_t)m->max_q_width);
    ss->kbuf = malloc(sizeof(float) * C * (size_t)m->max_kv_width);
    ss->exec_steps = malloc(sizeof(int) * (size_t)(m->n_steps + 1));
    ss->prof_ns = calloc((size_t)m->n_steps + 1, sizeof(uint64_t));
    ss->prof_calls = calloc((size_t)m->n_steps + 1, sizeof(uint64_t));
    ss->prof_bytes = calloc((size_t)m->n_steps + 1, sizeof(uint64_t));
    ss->prof_active = calloc((size_t)m->n_steps + 1, sizeof(uint64_t));
    ss->prof_total = calloc((size_t)m->n_steps + 1, sizeof(uint64_t));
    ss->prof_sparse = calloc((size_t)m->n_steps + 1, sizeof(uint64_t));
    ss->prof_eligible = calloc((size_t)m->n_steps + 1, sizeof(uint64_t));
    ss->tune = calloc((size_t)(m->n_fused + m->n_steps) + 1, sizeof(ea_sparse_tune));
    ss->ptune = calloc((size_t)(m->n_fused + m->n_steps) + 1, sizeof(ea_sparse_tune));
    ss->punit_path = malloc((size_t)m->n_fused + 1);
    ss->punit_ns = calloc((size_t)m->n_fused + 1, sizeof(uint64_t));
    ss->unit_sparse = malloc((size_t)m->n_fused + 1);
    ss->unit_ns = calloc((size_t)m->n_fused + 1, sizeof(uint64_t));
    ss->active = calloc((size_t)m->n_steps + 1, sizeof(int32_t *));
    ss->n_active = calloc((size_t)m->n_steps + 1, sizeof(int));
    if (!ss->prof_active || !ss->prof_total || !ss->prof_sparse || !ss->prof_eligible || !ss->tune || !ss->ptune ||
        !ss->punit_path || !ss->punit_ns || !ss->unit_sparse || !ss->unit_ns || !ss->active || !ss->n_active)
        return ea_fail(err, "out of memory creating the session"), EA_ERR_NOMEM;
    for (int s = 0; s < m->n_steps; s++)
        if ((m->steps[s].op == OP_SPARSIFY || m->steps[s].op == OP_NEURON_MASK) &&
            !(ss->active[s] = malloc(sizeof(int32_t) * (size_t)m->values[m->steps[s].out].width)))
            return ea_fail(err, "out of memory creating the session"), EA_ERR_NOMEM;
    const size_t nm = (size_t)m->n_nmask + 1, nw = (size_t)m->nmask_width + 1;
    ss->nmask = calloc(nm, sizeof(float *));
    ss->nscore = calloc(nm, sizeof(float *));
    ss->sel = malloc(sizeof(float) * 2 * nw);
    ss->kept = calloc((size_t)m->n_steps + 1, sizeof(ea_qweight));
    ss->kept_src = calloc((size_t)m->n_steps + 1, sizeof(uint8_t *));
    ss->has_kept = calloc((size_t)m->n_steps + 1, sizeof(int));
    ss->kept_y = malloc(sizeof(float) * nw);
    /* one per pool thread for prompt rows on the channel-major copy (sparse_rows); decode uses the first */
    const size_t row_threads = ss->row_ctx ? (size_t)ss->n_threads : 1;
    ss->fused_y = malloc(sizeof(float) * ((size_t)m->max_fused_n + 1) * row_threads);
    ss->rows_active = malloc(sizeof(int32_t) * ((size_t)m->max_act_width + 1) * row_threads);
    if (!ss->nmask || !ss->nscore || !ss->sel || !ss->kept || !ss->kept_src ||
        !ss->has_kept || !ss->kept_y || !ss->fused_y || !ss->rows_active)
        return ea_fail(err, "out of memory creating the session"), EA_ERR_NOMEM;
    for (int L = 0; L < m->n_nmask; L++)
        if (!(ss->nscore[L] = calloc(nw, sizeof(float))))
            return ea_fail(err, "out of memory creating the session"), EA_ERR_NOMEM;
    for (int s = 0; s < m->n_steps; s++) { /* default mask: every channel kept */
        if (m->steps[s].op != OP_NEURON_MASK) continue;
        for (int k = 0; k < m->nmask_width; k++) ss->active[s][k] = k;
        ss->n_active[s] = m->nmask_width;
    }
    int max_R = 1;
    for (int s = 0; s < m->n_steps; s++)
        if (m->steps[s].op == OP_STEER && m->steps[s].def_R > max_R) max_R = m->steps[s].def_R;
    ss->coef = malloc(sizeof(float) * (size_t)(max_R > m->hidden ? max_R : m->hidden + 1));
    if (!ss->slots || !ss->k_cache || !ss->v_cache || !ss->steer_add || !ss->steer_ablate || !ss->steer_R ||
        !ss->ids || !ss->qbuf || !ss->kbuf || !ss->exec_steps || !ss->prof_ns || !ss->prof_calls || !ss->prof_bytes ||
        !ss->coef)
        return ea_fail(err, "out of memory creating the session"), EA_ERR_NOMEM;
    for (int i = 0; i < m->n_slots; i++)
        if (!(ss->slots[i] = malloc(sizeof(float) * C * (size_t)m->slot_width[i])))
            return ea_fail(err, "out of memory for activation buffers"), EA_ERR_NOMEM;
    for (int s = 0; s < m->n_steps; s++) {
        const step *st = &m->steps[s];
        if (st->op != OP_NOP) ss->exec_steps[ss->n_exec++] = s;
        if (st->op != OP_GQA) continue;
        size_t kvn = (size_t)st->KVH * (size_t)ss->n_ctx * (size_t)st->D;
        ss->k_cache[st->layer] = calloc(kvn, sizeof(float));
        ss->v_cache[st->layer] = calloc(kvn, sizeof(float));
        if (!ss->k_cache[st->layer] || !ss->v_cache[st->layer])
            return ea_fail(err, "out of memory for the KV cache (n_ctx %d)", ss->n_ctx), EA_ERR_NOMEM;
    }
    return EA_OK;
}
