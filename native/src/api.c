/* The public C API (include/edgeact.h): argument checks, error strings, and
 * the wiring of model loading, sessions and the benchmark entry. */
#define _GNU_SOURCE
#include <limits.h>
#include <pthread.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "../include/edgeact.h"
#include "../include/edgeact_tools.h"
#include "model.h"
#include "platform.h"
#include "session.h"
#include "weights.h"

int ea_session_run(ea_session *ss, const int64_t *ids, int n, float *logits, int all_logits, ea_err *err);
int ea_session_init(ea_session *ss, ea_model *m, int n_threads, int n_ctx, int max_chunk, ea_err *err);
void ea_session_destroy(ea_session *ss);

static _Thread_local ea_err last_err;

const char *ea_last_error(void) { return last_err.msg; }
const char *ea_default_isa(void) {
    ea_settings set;
    ea_settings_read(&set);
    ea_isa isa;
    return ea_isa_choose(set.isa, set.no_avx512, set.no_vnni, &isa) ? NULL : ea_isa_name(isa);
}

const char *ea_version(void) { return "0.2.0"; } /* 0.2: ea_profile_record gained sparse_calls, sparse_eligible */

static int fail(int code, const char *fmt, const char *arg) {
    snprintf(last_err.msg, sizeof last_err.msg, fmt, arg);
    return code;
}
#define CHECK_PTR(p, what) \
    if (!(p)) return fail(EA_ERR_ARG, "%s must not be NULL", what)

static int load_common(ea_model *m, const char *dir, ea_model **out) {
    ea_err err = {{0}};
    ea_settings set;
    ea_settings_read(&set);
    m->sparse_always = set.sparse_always;
    m->sparse_static = set.sparse_static;
    m->sparse_lowmem = m->sparse_lowmem || set.sparse_lowmem;
    m->no_kept_rows = set.no_kept_rows;
    int rc = ea_isa_choose(set.isa, set.no_avx512, set.no_vnni, &m->isa);
    if (rc) {
        snprintf(last_err.msg, sizeof last_err.msg, "EDGEACT_ISA: %s", ea_kernels_strerror(rc));
        rc = EA_ERR_KERNEL;
    } else if (onnx_parse(m->map, m->map_len, &m->onnx, &err)) {
        rc = EA_ERR_FORMAT;
    } else {
        rc = ea_model_build(m, dir, &err);
    }
    if (rc) {
        if (err.msg[0]) memcpy(last_err.msg, err.msg, sizeof err.msg);
        ea_model_free(m);
        return rc;
    }
    *out = m;
    return EA_OK;
}

int ea_model_load(const char *dir, ea_model **out) {
    return ea_model_load_opts(dir, 0, out);
}

int ea_model_load_opts(const char *dir, unsigned flags, ea_model **out) {
    CHECK_PTR(dir, "dir");
    CHECK_PTR(out, "out");
    *out = NULL;
    if (flags & ~(unsigned)EA_LOAD_SPARSE_LOWMEM) return fail(EA_ERR_ARG, "%s", "unknown load flags (only EA_LOAD_* bits)");
    char path[PATH_MAX];
    if ((size_t)snprintf(path, sizeof path, "%s/model.onnx", dir) >= sizeof path)
        return fail(EA_ERR_ARG, "model folder path too long: %s", dir);
    ea_model *m = calloc(1, sizeof *m);
    if (!m) return fail(EA_ERR_NOMEM, "%s", "out of memory");
    m->sparse_lowmem = (flags & EA_LOAD_SPARSE_LOWMEM) != 0;
    ea_err err = {{0}};
    if (ea_map_file(path, &m->map, &m->map_len, &err)) {
        free(m);
        memcpy(last_err.msg, err.msg, sizeof err.msg);
        return EA_ERR_IO;
    }
    return load_common(m, dir, out);
}

int ea_model_load_buffer(const void *data, size_t n, const char *dir, ea_model **out) {
    CHECK_PTR(out, "out");
    *out = NULL;
    if (!data && n) return fail(EA_ERR_ARG, "%s", "data must not be NULL");
    ea_model *m = calloc(1, sizeof *m);
    if (!m) return fail(EA_ERR_NOMEM, "%s", "out of memory");
    m->map_owned = 1;
    m->map_len = n;
    m->map = malloc(n ? n : 1);
    if (!m->map) {
        free(m);
        return fail(EA_ERR_NOMEM, "%s", "out of memory");
    }
    if (n) memcpy(m->map, data, n);
    return load_common(m, dir, out);
}

void ea_model_free(ea_model *m) {
    if (!m) return;
    ea_model_destroy(m);
    if (m->map_owned) free(m->map);
    else if (m->map) munmap(m->map, m->map_len);
    free(m);
}

int ea_model_get_info(const ea_model *m, ea_model_info *info) {
    CHECK_PTR(m, "model");
    CHECK_PTR(info, "info");
    memset(info, 0, sizeof *info);
    info->n_layers = m->n_gqa;
    info->hidden = m->hidden;
    info->vocab = m->vocab;
    info->max_context = m->max_context;
    info->n_heads = m->n_heads;
    info->n_kv_heads = m->n_kv_heads;
    info->head_dim = m->head_dim;
    info->n_nodes = m->onnx.n_nodes;
    info->n_steer_layers = m->n_steer;
    info->n_mask_layers = m->n_nmask;
    info->mask_width = m->nmask_width;
    info->isa = ea_isa_name(m->isa);
    info->weight_bytes_mapped = m->bytes_mapped;
    info->weight_bytes_copied = m->bytes_copied;
    info->weight_bytes_repacked = m->bytes_repacked;
    return EA_OK;
}

int ea_model_n_op_types(const ea_model *m) { return m ? m->n_op_types : 0; }

int ea_model_op_type(const ea_model *m, int index, const char **op_type, int *count) {
    CHECK_PTR(m, "model");
    if (index < 0 || index >= m->n_op_types) return fail(EA_ERR_ARG, "%s", "op type index out of range");
    if (op_type) *op_type = m->op_types[index];
    if (count) *count = m->op_counts[index];
    return EA_OK;
}

int ea_session_create(ea_model *m, int n_threads, int n_ctx, int max_chunk, ea_session **out) {
    CHECK_PTR(m, "model");
    CHECK_PTR(out, "out");
    *out = NULL;
    ea_session *ss = calloc(1, sizeof *ss);
    if (!ss) return fail(EA_ERR_NOMEM, "%s", "out of memory");
    ea_err err = {{0}};
    int rc = ea_session_init(ss, m, n_threads, n_ctx, max_chunk, &err);
    if (rc) {
        memcpy(last_err.msg, err.msg, sizeof err.msg);
        ea_session_destroy(ss);
        return rc;
    }
    *out = ss;
    return EA_OK;
}

void ea_session_free(ea_session *ss) {
    if (ss) ea_session_destroy(ss);
}

int ea_session_n_ctx(const ea_session *ss) { return ss ? ss->n_ctx : 0; }
int ea_session_n_past(const ea_session *ss) { return ss ? ss->n_past : 0; }
int ea_session_n_threads(const ea_session *ss) { return ss ? ss->n_threads : 0; }

int ea_session_reset(ea_session *ss) {
    CHECK_PTR(ss, "session");
    ss->n_past = 0;
    return EA_OK;
}

int ea_session_truncate(ea_session *ss, int n_past) {
    CHECK_PTR(ss, "session");
    if (n_past < 0 || n_past > ss->n_past) {
        snprintf(last_err.msg, sizeof last_err.msg, "truncate to %d: the cache holds %d tokens", n_past, ss->n_past);
        return EA_ERR_ARG;
    }
    /* a sliding layer's cache holds positions kv_base.. only: the next query needs its window */
    for (int s = 0; s < ss->m->n_steps; s++) {
        const step *st = &ss->m->steps[s];
        if (st->op != OP_GQA || !st->window || n_past == 0) continue;
        const int need = n_past - st->window + 1 > 0 ? n_past - st->window + 1 : 0;
        if (ss->kv_base[st->layer] > need) {
            snprintf(last_err.msg, sizeof last_err.msg,
                     "truncate to %d: a sliding-window layer keeps only positions %d.. of its %d-token window "
                     "(reset instead)", n_past, ss->kv_base[st->layer], st->window);
            return EA_ERR_ARG;
        }
    }
    ss->n_past = n_past; /* rows at and past n_past are overwritten by the next forward */
    return EA_OK;
}

uint64_t ea_session_memory_bytes(const ea_session *ss) {
    if (!ss) return 0;
    const ea_model *m = ss->m;
    uint64_t b = 0, C = (uint64_t)ss->max_chunk;
    for (int s = 0; s < m->n_steps; s++)
        if (m->steps[s].op == OP_GQA)
            b += 2 * sizeof(float) * (uint64_t)m->steps[s].KVH * ea_gqa_capacity(&m->steps[s], ss->n_ctx) * m->steps[s].D;
    for (int i = 0; i < m->n_slots; i++) b += sizeof(float) * C * (uint64_t)m->slot_width[i];
    b += sizeof(float) * C * ((uint64_t)m->max_q_width + m->max_kv_width);
    return b;
}

int ea_session_forward(ea_session *ss, const int64_t *ids, int n, float *logits, int all_logits) {
    CHECK_PTR(ss, "session");
    ea_err err = {{0}};
    int rc = ea_session_run(ss, ids, n, logits, all_logits, &err);
    if (rc) memcpy(last_err.msg, err.msg, sizeof err.msg);
    return rc;
}

static int check_layer(const ea_session *ss, int layer) {
    if (!ss->m->n_steer) return fail(EA_ERR_ARG, "%s", "this model has no steering points (converted without Steer nodes)");
    if (layer < 0 || layer >= ss->m->n_steer) {
        snprintf(last_err.msg, sizeof last_err.msg, "steering layer %d out of range [0, %d)", layer, ss->m->n_steer);
        return EA_ERR_ARG;
    }
    return EA_OK;
}

static int all_finite(const float *v, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(v[i])) return 0;
    return 1;
}

int ea_session_set_steering(ea_session *ss, int layer, const float *add, const float *ablate, int R) {
    CHECK_PTR(ss, "session");
    int rc = check_layer(ss, layer);
    if (rc) return rc;
    const int H = ss->m->hidden;
    if (ablate && (R < 1 || R > H)) {
        snprintf(last_err.msg, sizeof last_err.msg, "ablate needs 1..%d rows of %d floats, got R=%d", H, H, R);
        return EA_ERR_ARG;
    }
    if (add && !all_finite(add, (size_t)H)) return fail(EA_ERR_ARG, "%s", "steering add vector has non-finite values");
    if (ablate && !all_finite(ablate, (size_t)R * H))
        return fail(EA_ERR_ARG, "%s", "steering ablate directions have non-finite values");
    float *na = NULL, *nb = NULL;
    if (add && !(na = malloc(sizeof(float) * (size_t)H))) return fail(EA_ERR_NOMEM, "%s", "out of memory");
    if (ablate && !(nb = malloc(sizeof(float) * (size_t)R * H))) {
        free(na);
        return fail(EA_ERR_NOMEM, "%s", "out of memory");
    }
    if (na) memcpy(na, add, sizeof(float) * (size_t)H);
    if (nb) memcpy(nb, ablate, sizeof(float) * (size_t)R * H);
    free(ss->steer_add[layer]);
    free(ss->steer_ablate[layer]);
    ss->steer_add[layer] = na;
    ss->steer_ablate[layer] = nb;
    ss->steer_R[layer] = nb ? R : 0;
    return EA_OK;
}

int ea_session_clear_steering(ea_session *ss, int layer) {
    CHECK_PTR(ss, "session");
    if (layer == -1) {
        for (int i = 0; i < ss->m->n_steer; i++) ea_session_set_steering(ss, i, NULL, NULL, 0);
        return EA_OK;
    }
    return ea_session_set_steering(ss, layer, NULL, NULL, 0);
}

static int check_mask_layer(const ea_session *ss, int layer, int n) {
    if (!ss->m->n_nmask) return fail(EA_ERR_ARG, "%s", "this model has no NeuronMask nodes (convert with --sparsity-method coreinfer)");
    if (layer < 0 || layer >= ss->m->n_nmask) {
        snprintf(last_err.msg, sizeof last_err.msg, "mask layer %d out of range [0, %d)", layer, ss->m->n_nmask);
        return EA_ERR_ARG;
    }
    if (n != ss->m->nmask_width) {
        snprintf(last_err.msg, sizeof last_err.msg, "mask has %d values, the FFN has %d neurons", n, ss->m->nmask_width);
        return EA_ERR_ARG;
    }
    return EA_OK;
}

int ea_session_set_neuron_mask(ea_session *ss, int layer, const float *mask, int n) {
    CHECK_PTR(ss, "session");
    const int W = ss->m->nmask_width;
    int rc = check_mask_layer(ss, layer, mask ? n : W);
    if (rc) return rc;
    if (mask && !all_finite(mask, (size_t)W)) return fail(EA_ERR_ARG, "%s", "neuron mask has non-finite values");
    float *copy = NULL;
    if (mask && !(copy = malloc(sizeof(float) * (size_t)W))) return fail(EA_ERR_NOMEM, "%s", "out of memory");
    if (copy) memcpy(copy, mask, sizeof(float) * (size_t)W);
    free(ss->nmask[layer]);
    ss->nmask[layer] = copy;
    for (int s = 0; s < ss->m->n_steps; s++) /* the kept channels become the NeuronMask step's active list */
        if (ss->m->steps[s].op == OP_NEURON_MASK && ss->m->steps[s].layer == layer) {
            int nr = 0;
            for (int k = 0; k < W; k++)
                if (!copy || copy[k] != 0.0f) ss->active[s][nr++] = k;
            ss->n_active[s] = nr;
        }
    return ea_session_prepare_kept(ss, layer) ? fail(EA_ERR_NOMEM, "%s", "out of memory for the kept neurons")
                                               : EA_OK;
}

int ea_session_get_neuron_scores(const ea_session *ss, int layer, float *out, int n) {
    CHECK_PTR(ss, "session");
    CHECK_PTR(out, "out");
    int rc = check_mask_layer(ss, layer, n);
    if (rc) return rc;
    memcpy(out, ss->nscore[layer], sizeof(float) * (size_t)n);
    return EA_OK;
}

int ea_session_capture_hidden(ea_session *ss, int on) {
    CHECK_PTR(ss, "session");
    if (on && !ss->m->n_hidden) return fail(EA_ERR_STATE, "%s", "this graph has no hidden.{i} values to capture");
    ss->capture = !!on;
    if (!on) {
        free(ss->hidden_buf);
        ss->hidden_buf = NULL;
        ss->hidden_cap = 0;
        ss->hidden_tokens = 0;
    }
    return EA_OK;
}

int ea_session_hidden_tokens(const ea_session *ss) { return ss && ss->capture ? ss->hidden_tokens : 0; }

int ea_session_get_hidden(const ea_session *ss, float *out, size_t n_floats) {
    CHECK_PTR(ss, "session");
    CHECK_PTR(out, "out");
    if (!ss->capture) return fail(EA_ERR_STATE, "%s", "hidden-state capture is off (ea_session_capture_hidden)");
    if (!ss->hidden_tokens) return fail(EA_ERR_STATE, "%s", "no forward pass since capture was switched on");
    size_t need = (size_t)ss->m->n_hidden * ss->hidden_tokens * ss->m->hidden;
    if (n_floats < need) {
        snprintf(last_err.msg, sizeof last_err.msg, "output holds %zu floats, %zu needed", n_floats, need);
        return EA_ERR_ARG;
    }
    memcpy(out, ss->hidden_buf, need * sizeof(float));
    return EA_OK;
}

int ea_session_profile(ea_session *ss, int on) {
    CHECK_PTR(ss, "session");
    ss->profile = !!on;
    return EA_OK;
}

int ea_session_profile_reset(ea_session *ss) {
    CHECK_PTR(ss, "session");
    memset(ss->prof_ns, 0, sizeof(uint64_t) * (size_t)ss->n_exec);
    memset(ss->prof_calls, 0, sizeof(uint64_t) * (size_t)ss->n_exec);
    memset(ss->prof_bytes, 0, sizeof(uint64_t) * (size_t)ss->n_exec);
    memset(ss->prof_active, 0, sizeof(uint64_t) * (size_t)ss->n_exec);
    memset(ss->prof_total, 0, sizeof(uint64_t) * (size_t)ss->n_exec);
    memset(ss->prof_sparse, 0, sizeof(uint64_t) * (size_t)ss->n_exec);
    memset(ss->prof_eligible, 0, sizeof(uint64_t) * (size_t)ss->n_exec);
    return EA_OK;
}

int ea_session_profile_count(const ea_session *ss) { return ss ? ss->n_exec : 0; }

int ea_session_profile_get(const ea_session *ss, int index, ea_profile_record *out) {
    CHECK_PTR(ss, "session");
    CHECK_PTR(out, "out");
    if (index < 0 || index >= ss->n_exec) return fail(EA_ERR_ARG, "%s", "profile record index out of range");
    const step *st = &ss->m->steps[ss->exec_steps[index]];
    out->name = st->name;
    out->op_type = st->op_type;
    out->calls = ss->prof_calls[index];
    out->ns = ss->prof_ns[index];
    out->weight_bytes = ss->prof_bytes[index];
    out->active = ss->prof_active[index];
    out->total = ss->prof_total[index];
    out->sparse_calls = ss->prof_sparse[index];
    out->sparse_eligible = ss->prof_eligible[index];
    return EA_OK;
}

/* ---- benchmark entry -------------------------------------------------------- */
struct ea_bench_qmatmul {
    ea_qweight w;
    ea_kctx ctx;
    ea_pool *pool;
    uint8_t *B, *zp;
    float *scales;
    size_t bytes; /* what one call reads */
};

/* Bench objects with the same thread count share one pool, as a model's matmuls do: with a pool
 * each, a benchmark cycling through many matrices would wake a sleeping worker on every call and
 * time the wake-up instead of the kernel. */
static pthread_mutex_t shared_mu = PTHREAD_MUTEX_INITIALIZER;
static struct { ea_pool *pool; int threads, refs; } shared_pools[8];

static ea_pool *shared_pool_get(int threads) {
    ea_pool *p = NULL;
    pthread_mutex_lock(&shared_mu);
    for (int i = 0; i < 8 && !p; i++)
        if (shared_pools[i].refs && shared_pools[i].threads == threads) shared_pools[i].refs++, p = shared_pools[i].pool;
    for (int i = 0; i < 8 && !p; i++)
        if (!shared_pools[i].refs && (p = ea_pool_create(threads))) {
            shared_pools[i].pool = p;
            shared_pools[i].threads = threads;
            shared_pools[i].refs = 1;
        }
    pthread_mutex_unlock(&shared_mu);
    return p;
}

static void shared_pool_put(ea_pool *p) {
    pthread_mutex_lock(&shared_mu);
    for (int i = 0; i < 8; i++)
        if (shared_pools[i].refs && shared_pools[i].pool == p && --shared_pools[i].refs == 0) {
            ea_pool_destroy(p);
            shared_pools[i].pool = NULL;
        }
    pthread_mutex_unlock(&shared_mu);
}

void ea_bench_qmatmul_free(ea_bench_qmatmul *b) {
    if (!b) return;
    ea_qweight_release(&b->w);
    ea_kctx_release(&b->ctx);
    if (b->pool) shared_pool_put(b->pool);
    free(b->B);
    free(b->zp);
    free(b->scales);
    free(b);
}

int ea_bench_qmatmul_create(int K, int N, int bits, int block_size, const uint8_t *B, const float *scales,
                            const uint8_t *zero_points, int n_threads, ea_bench_qmatmul **out) {
    CHECK_PTR(B, "B");
    CHECK_PTR(scales, "scales");
    CHECK_PTR(out, "out");
    *out = NULL;
    if (K <= 0 || N <= 0 || (bits != 4 && bits != 8) || (block_size != 32 && block_size != 64 && block_size != 128)) {
        snprintf(last_err.msg, sizeof last_err.msg, "bad MatMulNBits shape K=%d N=%d bits=%d block_size=%d", K, N, bits,
                 block_size);
        return EA_ERR_ARG;
    }
    ea_isa isa;
    int rc = ea_isa_select(&isa);
    if (rc) return fail(EA_ERR_KERNEL, "EDGEACT_ISA: %s", ea_kernels_strerror(rc));
    ea_bench_qmatmul *b = calloc(1, sizeof *b);
    if (!b) return fail(EA_ERR_NOMEM, "%s", "out of memory");
    const ea_qbytes fb = ea_qweight_file_bytes((size_t)N, (size_t)(K + block_size - 1) / block_size, block_size, bits);
    const size_t nB = fb.data, nz = fb.zero_points;
    b->B = malloc(nB);
    b->scales = malloc(fb.scales);
    b->zp = zero_points ? malloc(nz) : NULL;
    if (!b->B || !b->scales || (zero_points && !b->zp)) {
        ea_bench_qmatmul_free(b);
        return fail(EA_ERR_NOMEM, "%s", "out of memory");
    }
    memcpy(b->B, B, nB);
    memcpy(b->scales, scales, fb.scales);
    if (b->zp) memcpy(b->zp, zero_points, nz);
    int threads = n_threads > 0 ? n_threads : ea_platform()->physical_cores;
    if (threads > 1 && !(b->pool = shared_pool_get(threads))) {
        ea_bench_qmatmul_free(b);
        return fail(EA_ERR_NOMEM, "%s", "cannot start threads");
    }
    if ((rc = ea_kctx_init(&b->ctx, isa, b->pool)) ||
        (rc = ea_qweight_init(&b->w, isa, K, N, bits, block_size, b->B, b->scales, b->zp))) {
        ea_bench_qmatmul_free(b);
        return fail(EA_ERR_KERNEL, "%s", ea_kernels_strerror(rc));
    }
    /* SIMD reads only its repack, the scalar path the file layout */
    b->bytes = b->w.packed ? b->w.packed_bytes : nB + fb.scales + (b->zp ? nz : 0);
    *out = b;
    return EA_OK;
}

size_t ea_bench_qmatmul_bytes(const ea_bench_qmatmul *b) { return b ? b->bytes : 0; }

int ea_bench_qmatmul_run(ea_bench_qmatmul *b, const float *x, int M, float *y) {
    CHECK_PTR(b, "bench");
    CHECK_PTR(x, "x");
    CHECK_PTR(y, "y");
    if (M <= 0) return fail(EA_ERR_ARG, "%s", "M must be positive");
    int rc = ea_qmatmul(&b->ctx, &b->w, x, M, y);
    return rc ? fail(EA_ERR_KERNEL, "%s", ea_kernels_strerror(rc)) : EA_OK;
}
