/* Tanh, and Div of an activation by a scalar initializer: with Mul by that scalar, Gemma 2's
 * final logit soft-cap cap * tanh(logits / cap). */
#include <math.h>
#include <string.h>

#include "../weights.h"
#include "ops.h"

static int plan_tanh(ea_planner *b, const onnx_node *nd, step *st) {
    ea_model *m = b->m;
    const int si = (int)(st - m->steps);
    static const char *const known[] = {NULL};
    if (ea_check_attrs(b, nd, known) || ea_get_input(b, nd, 0, 1, &st->in[0]) || ea_need_act(b, nd, 0, st->in[0]) ||
        ea_only_outputs(b, nd, 1))
        return -1;
    st->op = OP_TANH;
    st->out = ea_add_output(b, nd, 0, V_ACT, ONNX_FLOAT, m->values[st->in[0]].width, si);
    return st->out < 0 ? -1 : 0;
}

static int run_tanh(ea_exec *x) {
    for (size_t i = 0; i < x->n; i++) x->y[i] = tanhf(x->a[i]);
    return EA_KOK;
}

const ea_op ea_op_tanh = {"", "Tanh", plan_tanh, run_tanh, 1};

static int plan_div(ea_planner *b, const onnx_node *nd, step *st) {
    ea_model *m = b->m;
    const int si = (int)(st - m->steps);
    static const char *const known[] = {NULL};
    if (ea_check_attrs(b, nd, known) || ea_get_input(b, nd, 0, 1, &st->in[0]) || ea_get_input(b, nd, 1, 1, &st->in[1]) ||
        ea_need_act(b, nd, 0, st->in[0]) || ea_only_outputs(b, nd, 1))
        return -1;
    const onnx_tensor *t = ea_need_const(b, nd, 1, st->in[1], ONNX_FLOAT, -1);
    if (!t) return -1;
    if (ea_numel(t) != 1) NODE_FAIL("the divisor must be a scalar initializer");
    st->op = OP_DIV;
    st->w = (const float *)t->data;
    st->out = ea_add_output(b, nd, 0, V_ACT, ONNX_FLOAT, m->values[st->in[0]].width, si);
    return st->out < 0 ? -1 : 0;
}

static int run_div(ea_exec *x) {
    const float d = *x->st->w;
    for (size_t i = 0; i < x->n; i++) x->y[i] = x->a[i] / d;
    return EA_KOK;
}

const ea_op ea_op_div = {"", "Div", plan_div, run_div, 1};
