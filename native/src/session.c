/* The executor: runs the plan over chunks of new tokens with the KV cache,
 * steering, hidden-state capture and the profiler living in the session.
 * All buffers are sized at session creation, so decoding does not allocate. */
#define _GNU_SOURCE
#include "../include/edgeact_tools.h"
#include "ops/ops.h"
#include "platform.h"
#include "session.h"
#include "sparse/sparse.h"
#include "weights.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

uint64_t ea_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Value v's rows when it is an activation, else NULL. */
static float *act(const ea_session *ss, int v) {
    return v >= 0 && ss->m->values[v].kind == V_ACT ? ss->slots[ss->m->values[v].slot] : NULL;
}

/* Runs S tokens at positions pos0.. ; logits rows go to `logits` (all rows, or the last one
 * when last_only; NULL skips the logits step). Returns an EA_ERR_* code. */
static int run_chunk(ea_session *ss, int S, int pos0, int tok_offset, float *logits, int last_only, ea_err *err) {
    const ea_model *m = ss->m;
    ea_sparse_chunk_begin(ss);
    for (int e = 0; e < ss->n_exec; e++) {
        const int si = ss->exec_steps[e];
        const step *st = &m->steps[si];
        if (si == m->logits_step && !logits) continue;
        if (__builtin_expect(ss->fail_at > 0, 0) && ++ss->steps_run == ss->fail_at)
            return ea_fail(err, "node '%s' (%s): injected failure (ea_session_inject_failure)", st->name, st->op_type),
                   EA_ERR_KERNEL;
        const uint64_t t0 = __builtin_expect(ss->profile, 0) ? ea_now_ns() : 0;
        const value *ov = st->out >= 0 ? &m->values[st->out] : NULL;
        ea_exec x = {ss, st, si, e, S, pos0, si == m->logits_step && last_only, act(ss, st->in[0]), act(ss, st->in[1]),
                     ov && ov->kind == V_ACT ? ss->slots[ov->slot] : NULL, ov ? ov->width : 0, 0, S, st->weight_bytes};
        x.n = (size_t)S * (size_t)x.w;
        const int rc = ea_ops[st->op]->run(&x);
        if (rc) return ea_fail(err, "node '%s' (%s): kernel error: %s", st->name, st->op_type, ea_kernels_strerror(rc)),
                      EA_ERR_KERNEL;
        if (ov && ov->hidden_layer >= 0 && ss->capture && ov->hidden_layer < m->n_hidden)
            memcpy(ss->hidden_buf + ((size_t)ov->hidden_layer * ss->hidden_tokens + tok_offset) * x.w, x.y,
                   x.n * sizeof(float));
        if (si == m->logits_step) memcpy(logits, last_only ? x.y + (size_t)(x.rows - 1) * x.w : x.y,
                                         sizeof(float) * (last_only ? (size_t)x.w : x.n));
        if (__builtin_expect(ss->profile, 0)) {
            ss->prof_ns[e] += ea_now_ns() - t0;
            ss->prof_calls[e]++;
            ss->prof_bytes[e] += x.bytes;
        }
    }
    return EA_OK;
}

/* After a failed forward the session goes back to its `start` tokens. The rows written past
 * them are overwritten by the next forward, but a sliding layer's cache may have been moved to
 * the front on the way (ops/gqa.c), dropping its oldest rows: it still holds positions
 * kv_base.. in order, enough when the next query's window starts there or later (its base
 * advanced as a truncation's check allows). Otherwise the session refuses every forward but
 * one from position 0, and says so in the error. */
static void failed_forward(ea_session *ss, int start, ea_err *err) {
    const ea_model *m = ss->m;
    ss->n_past = start;
    for (int s = 0; s < m->n_steps && start > 0 && !ss->window_lost; s++) {
        const step *st = &m->steps[s];
        if (st->op == OP_GQA && st->window && ss->kv_base[st->layer] > start - st->window + 1) ss->window_lost = 1;
    }
    if (ss->window_lost && err) {
        const size_t len = strlen(err->msg);
        snprintf(err->msg + len, sizeof err->msg - len, "; its sliding-window cache no longer holds the window "
                                                         "before position %d: reset the session", start);
    }
}

/* Tools (edgeact_tools.h): the next forward fails at its executed step `at` (from 1), for the
 * tests of what a failure leaves behind. */
int ea_session_inject_failure(ea_session *ss, int at) {
    if (!ss || at < 0) return EA_ERR_ARG;
    ss->fail_at = at;
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
    if (ss->window_lost) {
        if (ss->n_past > 0)
            return ea_fail(err, "a failed forward left a sliding-window layer without the rows of its window: "
                                "reset the session (or truncate it to 0)"), EA_ERR_STATE;
        ss->window_lost = 0;
    }
    for (int L = 0; L < m->n_nmask; L++) memset(ss->nscore[L], 0, sizeof(float) * (size_t)m->nmask_width);
    const int start = ss->n_past;
    ss->steps_run = 0;
    int rc = EA_OK;
    for (int c = 0; c < n && !rc; c += ss->max_chunk) {
        const int S = n - c < ss->max_chunk ? n - c : ss->max_chunk;
        const int last = c + S == n;
        memcpy(ss->ids, ids + c, sizeof(int64_t) * S);
        float *out = all_logits ? logits + (size_t)c * m->vocab : last ? logits : NULL;
        rc = run_chunk(ss, S, ss->n_past, c, out, !all_logits, err);
        if (!rc) ss->n_past += S;
    }
    ss->fail_at = 0;
    if (rc) failed_forward(ss, start, err);
    return rc;
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
    free(ss->kv_base);
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
    ss->n_threads = n_threads > 0 ? n_threads : ea_platform()->physical_cores;
    ss->n_ctx = n_ctx > 0 ? n_ctx : (m->max_context < 4096 ? m->max_context : 4096);
    ss->max_chunk = max_chunk > 0 ? max_chunk : 64;
    if (ss->n_threads > EA_ROW_THREADS_MAX) return ea_fail(err, "%d threads is more than a session takes (at most %d)", ss->n_threads, EA_MAX_THREADS), EA_ERR_ARG;
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
    ss->llc_bytes = ea_platform()->llc_bytes;
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
    ss->kv_base = calloc((size_t)m->n_gqa + 1, sizeof(int));
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
    if (!ss->slots || !ss->k_cache || !ss->v_cache || !ss->kv_base || !ss->steer_add || !ss->steer_ablate || !ss->steer_R ||
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
        size_t kvn = (size_t)st->KVH * (size_t)ea_gqa_capacity(st, ss->n_ctx) * (size_t)st->D;
        ss->k_cache[st->layer] = calloc(kvn, sizeof(float));
        ss->v_cache[st->layer] = calloc(kvn, sizeof(float));
        if (!ss->k_cache[st->layer] || !ss->v_cache[st->layer])
            return ea_fail(err, "out of memory for the KV cache (n_ctx %d)", ss->n_ctx), EA_ERR_NOMEM;
    }
    return EA_OK;
}
