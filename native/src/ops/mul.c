/* Mul of two activations of one width, or of an activation by a scalar initializer (Gemma's
 * embedding scale, a soft-cap). Inside a SiLU it is fused away (passes.c). */
#include <string.h>

#include "ops.h"

static int plan(ea_planner *b, const onnx_node *nd, step *st) {
    ea_model *m = b->m;
    const int si = (int)(st - m->steps);
    static const char *const known[] = {NULL};
    if (ea_check_attrs(b, nd, known) || ea_get_input(b, nd, 0, 1, &st->in[0]) || ea_get_input(b, nd, 1, 1, &st->in[1]) ||
        ea_only_outputs(b, nd, 1) || ea_need_act(b, nd, 0, st->in[0]))
        return -1;
    const int width = m->values[st->in[0]].width;
    const value *o = &m->values[st->in[1]];
    if (o->kind == V_CONST) {
        const onnx_tensor *t = ea_need_const(b, nd, 1, st->in[1], ONNX_FLOAT, -1);
        if (!t) return -1;
        if (ea_numel(t) != 1) NODE_FAIL("initializer operand '%s' must be a scalar", o->name);
        st->w = (const float *)t->data;
        st->op = OP_MUL;
        st->out = ea_add_output(b, nd, 0, V_ACT, ONNX_FLOAT, width, si);
        return st->out < 0 ? -1 : 0;
    }
    if (o->kind != V_ACT) NODE_FAIL("operand '%s' must be an activation", o->name);
    if (o->width != width) NODE_FAIL("operand widths %d and %d differ", width, o->width);
    st->op = OP_MUL;
    st->out = ea_add_output(b, nd, 0, V_ACT, ONNX_FLOAT, width, si);
    return st->out < 0 ? -1 : 0;
}

static int run(ea_exec *x) {
    if (x->st->w) {
        const float c = *x->st->w;
        for (size_t i = 0; i < x->n; i++) x->y[i] = x->a[i] * c;
        return EA_KOK;
    }
    for (size_t i = 0; i < x->n; i++) x->y[i] = x->a[i] * x->b[i];
    return EA_KOK;
}

const ea_op ea_op_mul = {"", "Mul", plan, run, 1};
