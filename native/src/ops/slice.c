/* Slice of an activation along its last axis from 0 (the shared table's rows, padded to
 * whole blocks, cut back to hidden): starts [0], ends [k], axes [-1], no steps. */
#include <string.h>

#include "../weights.h"
#include "ops.h"

static int one_int(ea_planner *b, const onnx_node *nd, int k, int64_t *out) {
    int v;
    if (ea_get_input(b, nd, k, 1, &v)) return -1;
    const onnx_tensor *t = ea_need_const(b, nd, k, v, ONNX_INT64, 1);
    if (!t) return -1;
    if (ea_numel(t) != 1) NODE_FAIL("input %d must hold one value (one axis sliced)", k);
    *out = *(const int64_t *)t->data;
    return 0;
}

static int plan(ea_planner *b, const onnx_node *nd, step *st) {
    ea_model *m = b->m;
    const int si = (int)(st - m->steps);
    static const char *const known[] = {NULL};
    int64_t start, end, axis = -1, step1 = 1;
    if (ea_check_attrs(b, nd, known) || ea_get_input(b, nd, 0, 1, &st->in[0]) || ea_need_act(b, nd, 0, st->in[0]) ||
        one_int(b, nd, 1, &start) || one_int(b, nd, 2, &end) || ea_only_outputs(b, nd, 1))
        return -1;
    if (nd->n_inputs > 3 && *nd->inputs[3] && one_int(b, nd, 3, &axis)) return -1;
    if (nd->n_inputs > 4 && *nd->inputs[4] && one_int(b, nd, 4, &step1)) return -1;
    const int width = m->values[st->in[0]].width;
    if ((axis != -1 && axis != 2) || start != 0 || step1 != 1 || end < 1 || end > width)
        NODE_FAIL("only a slice [0, k) of the last axis is supported (k <= %d)", width);
    st->op = OP_SLICE;
    st->K = width;
    st->N = (int)end;
    st->out = ea_add_output(b, nd, 0, V_ACT, ONNX_FLOAT, st->N, si);
    return st->out < 0 ? -1 : 0;
}

static int run(ea_exec *x) {
    for (int r = 0; r < x->S; r++)
        memmove(x->y + (size_t)r * x->st->N, x->a + (size_t)r * x->st->K, sizeof(float) * (size_t)x->st->N);
    return EA_KOK;
}

const ea_op ea_op_slice = {"", "Slice", plan, run, 1};
