/* com.microsoft.GroupQueryAttention with the session's KV cache: rotary (non-interleaved)
 * on q and k, the new keys and values appended at positions pos0.., causal attention. The
 * past/present tensors of the graph are the cache itself; seqlens_k and
 * total_sequence_length come from the session's position. */
#include <math.h>
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
    if (win != -1) NODE_FAIL("local_window_size (sliding window) is not supported");
    if (smooth != 0) NODE_FAIL("smooth_softmax is not supported");
    if (softcap != 0.0f) NODE_FAIL("softcap is not supported");
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

static int run(ea_exec *x) {
    const step *st = x->st;
    ea_session *ss = x->ss;
    ea_kctx *ctx = &ss->kctx;
    const ea_model *m = ss->m;
    const int S = x->S, pos0 = x->pos0;
    const float *k = ss->slots[m->values[st->in[1]].slot], *v = ss->slots[m->values[st->in[2]].slot];
    const int qw = st->H * st->D, kw = st->KVH * st->D;
    float *kc = ss->k_cache[st->layer], *vc = ss->v_cache[st->layer];
    memcpy(ss->qbuf, x->a, sizeof(float) * (size_t)S * qw);
    memcpy(ss->kbuf, k, sizeof(float) * (size_t)S * kw);
    int rc = EA_KOK;
    if (st->rotary) {
        rc = ea_rope(ctx, ss->qbuf, S, st->H, st->D, st->cos, st->sin, st->max_pos, pos0);
        if (!rc) rc = ea_rope(ctx, ss->kbuf, S, st->KVH, st->D, st->cos, st->sin, st->max_pos, pos0);
    }
    if (rc) return rc;
    for (int s = 0; s < S; s++)
        for (int h = 0; h < st->KVH; h++) {
            size_t dst = ((size_t)h * ss->n_ctx + (size_t)(pos0 + s)) * st->D;
            memcpy(kc + dst, ss->kbuf + (size_t)s * kw + (size_t)h * st->D, sizeof(float) * st->D);
            memcpy(vc + dst, v + (size_t)s * kw + (size_t)h * st->D, sizeof(float) * st->D);
        }
    x->bytes = (uint64_t)(pos0 + S) * kw * 2 * sizeof(float);
    return ea_attention(ctx, ss->qbuf, S, st->H, st->D, kc, vc, st->KVH, ss->n_ctx, pos0, st->scale, x->y);
}

const ea_op ea_op_gqa = {"com.microsoft", "GroupQueryAttention", plan, run, 0};
