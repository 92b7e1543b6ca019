/* ai.edgeact.NeuronMask (CoreInfer): y = h * mask, the session's mask for its layer or the
 * folder's default (all ones); while no mask is set it counts, per channel, the rows where
 * |h| reaches the row's token_k-th largest (the ffn_score output). Gate/up behind it compute
 * only the kept rows once a mask is set (sparse/kept.c). */
#include <math.h>
#include <string.h>

#include "../sparse/sparse.h"
#include "../weights.h"
#include "ops.h"

static int plan(ea_planner *b, const onnx_node *nd, step *st) {
    ea_model *m = b->m;
    const int si = (int)(st - m->steps);
    static const char *const known[] = {NULL};
    if (ea_check_attrs(b, nd, known) || ea_get_input(b, nd, 0, 1, &st->in[0]) || ea_get_input(b, nd, 1, 1, &st->in[1]) ||
        ea_get_input(b, nd, 2, 1, &st->in[2]) || ea_need_act(b, nd, 0, st->in[0]) || ea_only_outputs(b, nd, 2))
        return -1;
    if (nd->n_outputs < 2 || !*nd->outputs[1]) NODE_FAIL("%s", "needs both outputs (y, score)");
    const int width = m->values[st->in[0]].width;
    const onnx_tensor *mask = ea_need_const(b, nd, 1, st->in[1], ONNX_FLOAT, 1);
    const onnx_tensor *k = mask ? ea_need_const(b, nd, 2, st->in[2], ONNX_INT64, -1) : NULL;
    if (!k) return -1;
    if (mask->dims[0] != width) NODE_FAIL("mask '%s' must have %d elements (the input width)", mask->name, width);
    int64_t kv;
    if (ea_numel(k) != 1) NODE_FAIL("k '%s' must hold one value", k->name);
    memcpy(&kv, k->data, sizeof kv);
    if (kv < 1 || kv > width) NODE_FAIL("k = %lld is outside [1, %d]", (long long)kv, width);
    if (m->nmask_width && m->nmask_width != width)
        NODE_FAIL("width %d differs from the other NeuronMask nodes' %d", width, m->nmask_width);
    int layer;
    if (ea_op_layer(b, nd, si, OP_NEURON_MASK, mask->name, "ffn_mask.%d%c", m->n_nmask, &layer)) return -1;
    st->op = OP_NEURON_MASK;
    st->layer = layer;
    st->def_mask = (const float *)mask->data;
    st->token_k = (int)kv;
    m->nmask_width = width;
    m->n_nmask++;
    st->out = ea_add_output(b, nd, 0, V_ACT, ONNX_FLOAT, width, si);
    if (st->out < 0 || ea_add_output(b, nd, 1, V_SCORE, ONNX_FLOAT, width, si) < 0) return -1;
    return 0;
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

static int run(ea_exec *x) {
    neuron_mask(x->ss, x->st, x->si, x->e, x->a, x->y, x->S, x->w);
    return EA_KOK;
}

const ea_op ea_op_neuron_mask = {"ai.edgeact", "NeuronMask", plan, run, 0};
