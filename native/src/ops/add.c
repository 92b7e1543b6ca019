/* Add: of two activations (the residual stream), or of an activation and a bias initializer
 * along the last axis (OP_ADD_BIAS). */
#include <string.h>

#include "ops.h"

static int plan(ea_planner *b, const onnx_node *nd, step *st) {
    ea_model *m = b->m;
    const int si = (int)(st - m->steps);
    static const char *const known[] = {NULL};
    if (ea_check_attrs(b, nd, known) || ea_get_input(b, nd, 0, 1, &st->in[0]) || ea_get_input(b, nd, 1, 1, &st->in[1]) ||
        ea_only_outputs(b, nd, 1))
        return -1;
    if (m->values[st->in[0]].kind == V_CONST) { /* bias + x */
        int t = st->in[0];
        st->in[0] = st->in[1];
        st->in[1] = t;
    }
    if (ea_need_act(b, nd, 0, st->in[0])) return -1;
    int width = m->values[st->in[0]].width;
    const value *o = &m->values[st->in[1]];
    if (o->kind == V_ACT) {
        if (o->width != width) NODE_FAIL("operand widths %d and %d differ", width, o->width);
        st->op = OP_ADD;
    } else if (o->kind == V_CONST) {
        const onnx_tensor *t = ea_need_const(b, nd, 1, st->in[1], ONNX_FLOAT, -1);
        if (!t) return -1;
        if (ea_numel(t) != width || t->dims[t->ndim - 1] != width)
            NODE_FAIL("bias '%s' must have %d elements along the last axis", t->name, width);
        st->op = OP_ADD_BIAS;
        st->w = (const float *)t->data;
        st->weight_bytes = t->nbytes;
    } else {
        NODE_FAIL("operand '%s' must be an activation or a bias initializer", o->name);
    }
    st->out = ea_add_output(b, nd, 0, V_ACT, ONNX_FLOAT, width, si);
    return st->out < 0 ? -1 : 0;
}

static int run_add(ea_exec *x) {
    ea_add(&x->ss->kctx, x->a, x->b, x->n, x->y);
    return EA_KOK;
}

static int run_bias(ea_exec *x) {
    const float *bias = x->st->w;
    for (int s = 0; s < x->S; s++)
        for (int k = 0; k < x->w; k++) x->y[(size_t)s * x->w + k] = x->a[(size_t)s * x->w + k] + bias[k];
    return EA_KOK;
}

const ea_op ea_op_add = {"", "Add", plan, run_add, 1};
const ea_op ea_op_add_bias = {NULL, NULL, NULL, run_bias, 1};
