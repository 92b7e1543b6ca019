/* The sparse paths of a MatMulNBits: which path a row takes behind a Sparsify (input-sparse
 * GEMV or dense on the masked input), behind a CATS gate (output rows), behind a CoreInfer
 * mask (kept rows), for a stacked q/k/v or gate/up group, and for prompt rows (the GEMM or
 * rows on the channel-major copy). Every path gives the dense GEMM's bits on the same input;
 * the choice is only about time, measured per unit (tune.h) unless a setting fixes it. */
#include <stdlib.h>
#include <string.h>

#include "../ops/ops.h"
#include "sparse.h"

/* The path of a decode GEMV behind a Sparsify (tune.h): measured per unit, unless a
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
 * win at high sparsity (docs/performance.md, "prompt rows"); where they do not, each row reads
 * them from memory. So it is measured, per unit, as decode's choice is, on the
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
     * it from memory once per row */
    const ea_qweight_cm *cm = st->fuse ? &ss->m->fused[st->fuse - 1].cm : &st->cm;
    return cm->bytes <= ss->llc_bytes / 2;
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

/* A prompt's rows of a sparse matmul on the channel-major copy (low memory, whose dense repack
 * is gone, or the measured prefill choice), each on the input-sparse GEMV over its own nonzero
 * channels (the input is the Sparsify's masked output, so those are the channels it kept; the
 * result is the dense GEMM's on that input, bit for bit). With enough rows each thread takes
 * whole rows, one kernel call each on its own context: the weights of one matmul sit in the
 * last-level cache after the first row, and splitting every row's outputs between the threads
 * (as decode does) costs a pool dispatch and a wait per row per matmul and leaves the nonzero
 * scan serial (docs/performance.md, "prompt rows"). A stacked group writes every member's
 * rows, into their outputs when they have their own (g->direct), else into rows_fused.
 * *read: the weight bytes read (the active channels' rows). A stacked group's first member to
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


void ea_sparse_chunk_begin(ea_session *ss) {
    const ea_model *m = ss->m;
    ss->fused_owner = 0;
    ss->rows_owner = 0;
    memset(ss->punit_path, -1, (size_t)m->n_fused + 1);
    memset(ss->punit_ns, 0, sizeof(uint64_t) * ((size_t)m->n_fused + 1));
    memset(ss->unit_sparse, -1, (size_t)m->n_fused + 1);
    memset(ss->unit_ns, 0, sizeof(uint64_t) * ((size_t)m->n_fused + 1));
}

/* CoreInfer's fixed neurons: the dense GEMV over the kept rows of gate/up, scattered (the
 * other rows are 0 and masked later). */
static int kept_rows(ea_exec *x, const float *a) {
    ea_session *ss = x->ss;
    const step *st = x->st;
    const int nr = ss->n_active[st->row_src - 1];
    const int32_t *idx = ss->active[st->row_src - 1];
    memset(x->y, 0, sizeof(float) * (size_t)st->N);
    const int rc = nr ? ea_qmatmul(&ss->kctx, &ss->kept[x->si], a, 1, ss->kept_y) : EA_KOK;
    for (int r = 0; r < nr && !rc; r++) x->y[idx[r]] = ss->kept_y[r];
    x->bytes = (uint64_t)((double)st->weight_bytes * nr / (st->N ? st->N : 1));
    return rc;
}

/* A member of a stacked group, one row: the first to run picks the path for the group and,
 * when sparse, computes all of them (the input and its active list are the same) into their
 * outputs when g->direct, else the others copy their rows. Dense, each runs its own GEMV on
 * the masked input. */
static int stacked_gemv(ea_exec *x, const float *a) {
    ea_session *ss = x->ss;
    const ea_model *m = ss->m;
    const step *st = x->st;
    ea_kctx *ctx = &ss->kctx;
    const int gi = st->fuse - 1;
    const fused_gemv *g = &m->fused[gi];
    const int src = st->sparse_src - 1, na = ss->n_active[src];
    const uint64_t u0 = ea_now_ns();
    int rc = EA_KOK;
    if (ss->unit_sparse[gi] < 0) ss->unit_sparse[gi] = (int8_t)(st->dense_dropped || pick_sparse(ss, &g->cm, gi, na));
    const int sparse = ss->unit_sparse[gi];
    if (!sparse) {
        rc = ea_masked_qgemv(ctx, &st->qw, a, ss->active[src], na, x->y);
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
        if (!rc && !g->direct) memcpy(x->y, ss->fused_y + st->fuse_off, sizeof(float) * (size_t)st->N);
    }
    ss->unit_ns[gi] += ea_now_ns() - u0;
    if (x->si == g->step[g->n - 1]) {
        if (!rc) tune_record(ss, &ss->tune[gi], sparse, na, ss->unit_ns[gi]);
        ss->fused_owner = 0;
        ss->unit_sparse[gi] = -1;
        ss->unit_ns[gi] = 0;
    }
    x->bytes = gemv_path_done(ss, x->e, st, sparse, na, st->K);
    return rc;
}

/* One row behind a Sparsify: read only the weights of its active channels, or all of them on
 * the masked input where that measured faster. */
static int lone_gemv(ea_exec *x, const float *a) {
    ea_session *ss = x->ss;
    const step *st = x->st;
    ea_kctx *ctx = &ss->kctx;
    const int src = st->sparse_src - 1, na = ss->n_active[src], unit = ss->m->n_fused + x->si;
    const uint64_t u0 = ea_now_ns();
    const int sparse = st->dense_dropped || pick_sparse(ss, &st->cm, unit, na);
    const int rc = sparse ? ea_sparse_qgemv(ctx, &st->cm, NULL, a, ss->active[src], na, x->y)
                          : ea_masked_qgemv(ctx, &st->qw, a, ss->active[src], na, x->y);
    if (!rc) tune_record(ss, &ss->tune[unit], sparse, na, ea_now_ns() - u0);
    x->bytes = gemv_path_done(ss, x->e, st, sparse, na, st->K);
    return rc;
}

/* CATS, one row: the rows whose gate activation the Sparsify dropped are multiplied by 0;
 * compute only the kept ones from a copy of the file layout (the rest 0), or all with the
 * dense kernel where that measured faster. Same values either way. */
static int cats_rows(ea_exec *x, const float *a) {
    ea_session *ss = x->ss;
    const step *st = x->st;
    ea_kctx *ctx = &ss->kctx;
    const int src = st->rowsel_src - 1, na = ss->n_active[src], unit = ss->m->n_fused + x->si;
    const uint64_t u0 = ea_now_ns();
    const int sparse = pick_path(ss, &ss->tune[unit], na, st->N >= EA_SPARSE_MIN_N && na < EA_ROWS_STATIC_SHARE * st->N);
    int rc;
    if (sparse) {
        memset(x->y, 0, sizeof(float) * (size_t)st->N);
        rc = ea_qgemv_rows(ctx, st->rows_buf ? &st->rows_qw : &st->qw, a, ss->active[src], na, x->y);
    } else {
        rc = ea_qmatmul(ctx, &st->qw, a, 1, x->y);
    }
    if (!rc) tune_record(ss, &ss->tune[unit], sparse, na, ea_now_ns() - u0);
    x->bytes = gemv_path_done(ss, x->e, st, sparse, na, st->N);
    return rc;
}

/* Prompt rows with both copies loaded: the GEMM or sparse_rows, measured per unit; a group
 * decides at its first member to run and is timed over all of them. */
static int prefill(ea_exec *x, const float *a) {
    ea_session *ss = x->ss;
    const ea_model *m = ss->m;
    const step *st = x->st;
    const int rows = x->rows, gi = st->fuse ? st->fuse - 1 : -1, unit = gi >= 0 ? gi : m->n_fused + x->si;
    int sparse;
    if (gi < 0) sparse = pick_path(ss, &ss->ptune[unit], 1, 0);
    else {
        if (ss->punit_path[gi] < 0) ss->punit_path[gi] = (int8_t)pick_path(ss, &ss->ptune[unit], 1, 0);
        sparse = ss->punit_path[gi];
    }
    const uint64_t u0 = ea_now_ns();
    uint64_t read = st->weight_bytes;
    const int rc = sparse ? sparse_rows(ss, st, a, rows, x->y, &read) : ea_qmatmul(&ss->kctx, &st->qw, a, rows, x->y);
    const uint64_t ns = ea_now_ns() - u0;
    if (gi >= 0) ss->punit_ns[gi] += ns;
    const int last = gi < 0 || x->si == m->fused[gi].step[m->fused[gi].n - 1];
    if (!rc && last) tune_record(ss, &ss->ptune[unit], sparse, 1, (gi >= 0 ? ss->punit_ns[gi] : ns) / (uint64_t)rows);
    x->bytes = read;
    return rc;
}

int ea_sparse_matmul(ea_exec *x, const float *a, int *rc) {
    const step *st = x->st;
    ea_session *ss = x->ss;
    const int one = x->rows == 1;
    if (st->row_src && one && ss->has_kept[x->si]) *rc = kept_rows(x, a);
    else if (st->fuse && one) *rc = stacked_gemv(x, a);
    else if (st->sparse_src && one) *rc = lone_gemv(x, a);
    else if (st->rowsel_src && one) *rc = cats_rows(x, a);
    else if (st->dense_dropped) { /* low memory: no dense repack, every row on the channel-major copy */
        uint64_t read = 0;
        *rc = sparse_rows(ss, st, a, x->rows, x->y, &read);
        x->bytes = read;
    } else if (prefill_rows_eligible(ss, st, x->rows)) *rc = prefill(x, a);
    else return 0;
    return 1;
}
