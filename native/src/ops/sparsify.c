/* ai.edgeact.Sparsify (TEAL, CATS, WINA, chess): y[k] = x[k] where |x[k]| * col_scale[k] >=
 * threshold[k], else 0 (the function body's rule). The kept channels of the last row go to
 * the session's active list, which the MatMulNBits reading y use (sparse/). */
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
        ea_get_input(b, nd, 2, 1, &st->in[2]) || ea_need_act(b, nd, 0, st->in[0]) || ea_only_outputs(b, nd, 1))
        return -1;
    int width = m->values[st->in[0]].width;
    const onnx_tensor *thr = ea_need_const(b, nd, 1, st->in[1], ONNX_FLOAT, -1);
    const onnx_tensor *col = thr ? ea_need_const(b, nd, 2, st->in[2], ONNX_FLOAT, -1) : NULL;
    if (!col) return -1;
    if (ea_numel(thr) != width || ea_numel(col) != width)
        NODE_FAIL("threshold and col_scale must have %d elements (the input width)", width);
    st->op = OP_SPARSIFY;
    st->thr = (const float *)thr->data;
    st->colsc = (const float *)col->data;
    /* TEAL's one threshold and unit scales: the kernel then reads x alone */
    int uniform = width > 0, ones = 1;
    for (int k = 1; k < width && uniform; k++) uniform = st->thr[k] == st->thr[0];
    for (int k = 0; k < width && ones; k++) ones = st->colsc[k] == 1.0f;
    st->thr_step = !uniform;
    if (ones) st->colsc = NULL;
    st->out = ea_add_output(b, nd, 0, V_ACT, ONNX_FLOAT, width, si);
    return st->out < 0 ? -1 : 0;
}

static int run(ea_exec *x) {
    const step *st = x->st;
    ea_session *ss = x->ss;
    const int w = x->w;
    int na = 0;
    for (int r = 0; r < x->S; r++) {
        na = ea_sparsify(&ss->kctx, x->a + (size_t)r * w, st->thr, st->thr_step, st->colsc, w, x->y + (size_t)r * w,
                         ss->active[x->si]);
        if (__builtin_expect(ss->profile, 0)) {
            ss->prof_active[x->e] += (uint64_t)na;
            ss->prof_total[x->e] += (uint64_t)w;
        }
    }
    ss->n_active[x->si] = na;
    return EA_KOK;
}

const ea_op ea_op_sparsify = {"ai.edgeact", "Sparsify", plan, run, 0};
