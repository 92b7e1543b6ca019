/* Gather (axis 0) of the embedding table by input_ids, float32 or float16 rows. */
#include <math.h>
#include <string.h>

#include "../weights.h"
#include "ops.h"

static int plan(ea_planner *b, const onnx_node *nd, step *st) {
    ea_model *m = b->m;
    const int si = (int)(st - m->steps);
    static const char *const known[] = {"axis", NULL};
    int64_t axis = 0;
    if (ea_check_attrs(b, nd, known) || ea_attr_int(b, nd, "axis", 0, 0, &axis)) return -1;
    if (axis != 0) NODE_FAIL("axis %lld is not supported (only 0)", (long long)axis);
    if (ea_get_input(b, nd, 0, 1, &st->in[0]) || ea_get_input(b, nd, 1, 1, &st->in[1])) return -1;
    const onnx_tensor *t = ea_need_const(b, nd, 0, st->in[0], 0, 2);
    if (!t) return -1;
    if (t->dtype != ONNX_FLOAT && t->dtype != ONNX_FLOAT16)
        NODE_FAIL("table '%s' is %s (float32 or float16 expected)", t->name, onnx_dtype_name(t->dtype));
    if (m->values[st->in[1]].kind != V_IDS) NODE_FAIL("indices must be the graph input input_ids");
    if (ea_check_dim(b, nd, t->dims[0], "vocabulary size") || ea_check_dim(b, nd, t->dims[1], "embedding width"))
        return -1;
    st->op = OP_GATHER;
    st->table = t->data;
    st->table_f16 = t->dtype == ONNX_FLOAT16;
    st->vocab = (int)t->dims[0];
    st->N = (int)t->dims[1];
    if (m->vocab && m->vocab != st->vocab) NODE_FAIL("a second embedding table with another vocabulary size");
    m->vocab = st->vocab;
    if (ea_only_outputs(b, nd, 1)) return -1;
    st->out = ea_add_output(b, nd, 0, V_ACT, t->dtype, st->N, si);
    return st->out < 0 ? -1 : 0;
}

/* Row by row, giving each row's pages back: a fault in a file mapping maps the whole large
 * folio around the row, so without this a prompt makes most of a float16 table resident
 * (docs/performance.md, "embedding pages"). The window released is the aligned 2 MiB (the
 * largest folio) around the row, clipped to the table. */
static int run(ea_exec *x) {
    const step *st = x->st;
    ea_session *ss = x->ss;
    ea_kctx *ctx = &ss->kctx;
    const size_t es = st->table_f16 ? 2 : 4, row = (size_t)st->N * es, tbytes = (size_t)st->vocab * row;
    const uintptr_t t0 = (uintptr_t)st->table, t1 = t0 + tbytes, win = (uintptr_t)2 << 20;
    int rc = EA_KOK;
    for (int r = 0; r < x->S; r++) {
        float *yr = x->y + (size_t)r * st->N;
        rc = st->table_f16 ? ea_embed_f16(ctx, st->table, st->vocab, st->N, ss->ids + r, 1, yr)
                           : ea_embed_f32(ctx, st->table, st->vocab, st->N, ss->ids + r, 1, yr);
        if (rc) break;
        const uintptr_t at = (t0 + (uintptr_t)ss->ids[r] * row) & ~(win - 1);
        const uintptr_t lo = at > t0 ? at : t0, hi = at + win < t1 ? at + win : t1;
        ea_release_pages(ss->m, (const void *)lo, hi - lo);
    }
    x->bytes = (uint64_t)x->S * row;
    return rc;
}

const ea_op ea_op_gather = {"", "Gather", plan, run, 0};
