/* com.microsoft.GroupQueryAttention with the session's KV cache: rotary (non-interleaved)
 * on q and k, the new keys and values appended at positions pos0.., causal attention. The
 * past/present tensors of the graph are the cache itself; seqlens_k and
 * total_sequence_length come from the session's position.
 *
 * local_window_size W (a sliding layer): a query sees itself and the W - 1 positions before
 * it, and the layer's cache holds W + 2 EA_WINDOW_SLACK - 1 rows, so its memory stops growing
 * at the window. softcap c: scores become c tanh(score / c) before the softmax. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../sparse/sparse.h"
#include "../weights.h"
#include "ops.h"

static int plan(ea_planner *b, const onnx_node *nd, step *st) {
    ea_model *m = b->m;
    const int si = (int)(st - m->steps);
    static const char *const known[] = {"num_heads", "kv_num_heads", "do_rotary", "rotary_interleaved", "scale",
                                        "softcap", "local_window_size", "smooth_softmax", NULL};
    int64_t H = 0, KVH = 0, rot = 0, inter = 0, win = -1, smooth = 0;
    float softcap;
    if (ea_check_attrs(b, nd, known) || ea_attr_int(b, nd, "num_heads", 0, 1, &H) ||
        ea_attr_int(b, nd, "kv_num_heads", 0, 1, &KVH) || ea_attr_int(b, nd, "do_rotary", 0, 0, &rot) ||
        ea_attr_int(b, nd, "rotary_interleaved", 0, 0, &inter) || ea_attr_int(b, nd, "local_window_size", -1, 0, &win) ||
        ea_attr_int(b, nd, "smooth_softmax", 0, 0, &smooth) || ea_attr_float(b, nd, "softcap", 0.0f, &softcap))
        return -1;
    if (ea_check_dim(b, nd, H, "num_heads") || ea_check_dim(b, nd, KVH, "kv_num_heads")) return -1;
    if (H % KVH) NODE_FAIL("num_heads %lld is not a multiple of kv_num_heads %lld", (long long)H, (long long)KVH);
    if (rot != 0 && rot != 1) NODE_FAIL("do_rotary must be 0 or 1");
    if (inter != 0) NODE_FAIL("rotary_interleaved=1 is not supported");
    if (win != -1 && (win < 1 || win > (1 << 24))) NODE_FAIL("local_window_size %lld is out of range", (long long)win);
    if (smooth != 0) NODE_FAIL("smooth_softmax is not supported");
    if (softcap < 0.0f) NODE_FAIL("softcap must be non-negative");
    st->window = win > 0 ? (int)win : 0;
    st->softcap = softcap;
    for (int k = 9; k < nd->n_inputs; k++)
        if (*nd->inputs[k]) NODE_FAIL("input %d ('%s') is not supported", k, nd->inputs[k]);
    int in[9];
    for (int k = 0; k < 9; k++)
        if (ea_get_input(b, nd, k, k < 7 || rot, &in[k])) return -1;
    for (int k = 0; k < 3; k++)
        if (ea_need_act(b, nd, k, in[k])) return -1;
    if (m->values[in[3]].kind != V_PAST || m->values[in[4]].kind != V_PAST)
        NODE_FAIL("past key/value must be the graph inputs past_key_values.*");
    if (m->values[in[5]].kind != V_POSINFO || m->values[in[6]].kind != V_POSINFO)
        NODE_FAIL("inputs 5 and 6 must be the graph inputs seqlens_k and total_sequence_length");
    const int qw = m->values[in[0]].width;
    if (qw % H) NODE_FAIL("query width %d is not a multiple of num_heads %lld", qw, (long long)H);
    const int D = qw / (int)H;
    if (D % 2) NODE_FAIL("head size %d is odd", D);
    if (m->values[in[1]].width != KVH * D || m->values[in[2]].width != KVH * D)
        NODE_FAIL("key/value widths %d/%d do not match kv_num_heads %lld x head size %d", m->values[in[1]].width,
                  m->values[in[2]].width, (long long)KVH, D);
    for (int k = 3; k < 5; k++) {
        const value *pv = &m->values[in[k]];
        const onnx_value_info *vi = NULL;
        for (int g = 0; g < m->onnx.n_inputs; g++)
            if (!strcmp(m->onnx.inputs[g].name, pv->name)) vi = &m->onnx.inputs[g];
        if (vi && vi->ndim == 4 && ((vi->dims[1] >= 0 && vi->dims[1] != KVH) || (vi->dims[3] >= 0 && vi->dims[3] != D)))
            NODE_FAIL("graph input '%s' shape [1, %lld, P, %lld] does not match kv_num_heads %lld, head size %d",
                      pv->name, (long long)vi->dims[1], (long long)vi->dims[3], (long long)KVH, D);
    }
    st->rotary = (int)rot;
    if (rot) {
        const onnx_tensor *c = ea_need_const(b, nd, 7, in[7], ONNX_FLOAT, 2);
        const onnx_tensor *s = c ? ea_need_const(b, nd, 8, in[8], ONNX_FLOAT, 2) : NULL;
        if (!s) return -1;
        if (c->dims[1] != D / 2 || s->dims[1] != D / 2 || s->dims[0] != c->dims[0] || c->dims[0] < 1)
            NODE_FAIL("cos/sin caches must be [max_context, %d] (head size / 2), got [%lld, %lld] and [%lld, %lld]",
                      D / 2, (long long)c->dims[0], (long long)c->dims[1], (long long)s->dims[0],
                      (long long)s->dims[1]);
        if (c->dims[0] > (1 << 24)) NODE_FAIL("cos/sin caches have too many rows");
        st->cos = (const float *)c->data;
        st->sin = (const float *)s->data;
        st->max_pos = (int)c->dims[0];
    } else {
        st->max_pos = 1 << 20;
    }
    if (ea_attr_float(b, nd, "scale", 1.0f / sqrtf((float)D), &st->scale)) return -1;
    if (st->scale == 0.0f) st->scale = 1.0f / sqrtf((float)D); /* onnxruntime: 0 means default */
    st->op = OP_GQA;
    st->H = (int)H;
    st->KVH = (int)KVH;
    st->D = D;
    st->layer = m->n_gqa++;
    for (int k = 0; k < 3; k++) st->in[k] = in[k];
    st->out = ea_add_output(b, nd, 0, V_ACT, ONNX_FLOAT, qw, si);
    if (st->out < 0) return -1;
    for (int k = 1; k < 3 && k < nd->n_outputs; k++)
        if (*nd->outputs[k] && ea_add_output(b, nd, k, V_PRESENT, ONNX_FLOAT, 0, si) < 0) return -1;
    if (ea_only_outputs(b, nd, 3)) return -1;
    if (!m->n_heads) {
        m->n_heads = st->H;
        m->n_kv_heads = st->KVH;
        m->head_dim = D;
    }
    if (!m->max_context || st->max_pos < m->max_context) m->max_context = st->max_pos;
    if (qw > m->max_q_width) m->max_q_width = qw;
    if (KVH * D > m->max_kv_width) m->max_kv_width = (int)KVH * D;
    return 0;
}

/* Rows of the layer's cache: a sliding layer keeps its window and 2 * EA_WINDOW_SLACK - 1
 * rows more (ea_session_init sizes it; ea_session_truncate may go back EA_WINDOW_SLACK). */
int ea_gqa_capacity(const step *st, int n_ctx) {
    const int64_t c = st->window > 0 ? (int64_t)st->window + 2 * EA_WINDOW_SLACK - 1 : n_ctx;
    return c < n_ctx ? (int)c : n_ctx;
}

/* One query row over L cached rows with the soft-cap; sc: L floats. Scalar: only Gemma 2
 * configs have one. */
static void attend_softcap(const step *st, const float *q, const float *kc, const float *vc, int cap, int L,
                           float *sc, float *out) {
    const int D = st->D, group = st->H / st->KVH;
    for (int h = 0; h < st->H; h++) {
        const float *qh = q + (size_t)h * D;
        const float *kh = kc + (size_t)(h / group) * cap * D, *vh = vc + (size_t)(h / group) * cap * D;
        float mx = -INFINITY, sum = 0.0f;
        for (int t = 0; t < L; t++) {
            float d = 0.0f;
            for (int i = 0; i < D; i++) d += qh[i] * kh[(size_t)t * D + i];
            sc[t] = st->softcap * tanhf(d * st->scale / st->softcap);
            if (sc[t] > mx) mx = sc[t];
        }
        for (int t = 0; t < L; t++) sum += sc[t] = expf(sc[t] - mx);
        float *oh = out + (size_t)h * D;
        memset(oh, 0, sizeof(float) * (size_t)D);
        for (int t = 0; t < L; t++)
            for (int i = 0; i < D; i++) oh[i] += sc[t] * vh[(size_t)t * D + i];
        for (int i = 0; i < D; i++) oh[i] /= sum;
    }
}

static void put_row(const step *st, float *kc, float *vc, int cap, int row, const float *k, const float *v) {
    for (int h = 0; h < st->KVH; h++) {
        size_t dst = ((size_t)h * cap + (size_t)row) * st->D;
        memcpy(kc + dst, k + (size_t)h * st->D, sizeof(float) * st->D);
        memcpy(vc + dst, v + (size_t)h * st->D, sizeof(float) * st->D);
    }
}

static int run(ea_exec *x) {
    const step *st = x->st;
    ea_session *ss = x->ss;
    ea_kctx *ctx = &ss->kctx;
    const ea_model *m = ss->m;
    const int S = x->S, pos0 = x->pos0, cap = ea_gqa_capacity(st, ss->n_ctx);
    const float *k = ss->slots[m->values[st->in[1]].slot], *v = ss->slots[m->values[st->in[2]].slot];
    const int qw = st->H * st->D, kw = st->KVH * st->D;
    float *kc = ss->k_cache[st->layer], *vc = ss->v_cache[st->layer];
    int *base = &ss->kv_base[st->layer]; /* the position of cache row 0 */
    if (pos0 == 0) *base = 0;
    memcpy(ss->qbuf, x->a, sizeof(float) * (size_t)S * qw);
    memcpy(ss->kbuf, k, sizeof(float) * (size_t)S * kw);
    int rc = EA_KOK;
    if (st->rotary) {
        rc = ea_rope(ctx, ss->qbuf, S, st->H, st->D, st->cos, st->sin, st->max_pos, pos0);
        if (!rc) rc = ea_rope(ctx, ss->kbuf, S, st->KVH, st->D, st->cos, st->sin, st->max_pos, pos0);
    }
    if (rc) return rc;
    const int W = st->window > 0 ? st->window : pos0 + S; /* positions a query sees, itself included */
    const int seen = pos0 + S < W ? pos0 + S : W;
    x->bytes = (uint64_t)seen * kw * 2 * sizeof(float);
    if (pos0 + S <= W && *base == 0 && st->softcap == 0.0f) { /* every query sees all positions: one call */
        for (int s = 0; s < S; s++)
            put_row(st, kc, vc, cap, pos0 + s, ss->kbuf + (size_t)s * kw, v + (size_t)s * kw);
        return ea_attention(ctx, ss->qbuf, S, st->H, st->D, kc, vc, st->KVH, cap, pos0, st->scale, x->y);
    }
    /* Row by row: rows hold positions base.. in order. A full cache keeps its last
     * W - 1 + EA_WINDOW_SLACK rows (moved to the front), so the rows a query needs stay
     * contiguous and the move costs a few rows per token. */
    float *sc = NULL;
    if (st->softcap != 0.0f && !(sc = malloc(sizeof(float) * (size_t)cap))) return EA_KERR_NOMEM;
    for (int s = 0; s < S && !rc; s++) {
        const int p = pos0 + s;
        if (p - *base == cap) {
            const int keep = W - 1 + EA_WINDOW_SLACK; /* < cap: only a sliding layer's cache fills up */
            for (int h = 0; h < st->KVH; h++) {
                const size_t to = (size_t)h * cap * st->D, from = to + (size_t)(cap - keep) * st->D;
                memmove(kc + to, kc + from, sizeof(float) * (size_t)keep * st->D);
                memmove(vc + to, vc + from, sizeof(float) * (size_t)keep * st->D);
            }
            *base = p - keep;
        }
        put_row(st, kc, vc, cap, p - *base, ss->kbuf + (size_t)s * kw, v + (size_t)s * kw);
        const int L = p + 1 < W ? p + 1 : W, first = p - L + 1 - *base;
        const size_t off = (size_t)first * st->D;
        if (sc)
            attend_softcap(st, ss->qbuf + (size_t)s * qw, kc + off, vc + off, cap, L, sc, x->y + (size_t)s * qw);
        else
            rc = ea_attention(ctx, ss->qbuf + (size_t)s * qw, 1, st->H, st->D, kc + off, vc + off, st->KVH, cap, L - 1,
                              st->scale, x->y + (size_t)s * qw); /* rows first.. of each head (stride cap) */
    }
    free(sc);
    return rc;
}

const ea_op ea_op_gqa = {"com.microsoft", "GroupQueryAttention", plan, run, 0};
